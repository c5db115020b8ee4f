#!/usr/bin/env bash
# The GPU check, run on the GPU machine (one H200, no network): install the carried wheels (.whl/, made by
# bench/gpu_wheels.sh) into /tmp/site without network, keep the machine's own torch, run the GPU tests
# (tests/gpu and the CUDA cases of tests/unit/test_device.py, on the embedded default: SQLite ledger, in
# process) and the throughput benchmarks in random-weights mode (SmolLM2-135M shapes, bench/_shapes.py).
# Everything lands in one folder: $OUT when set (the device tool brings it back), else bench/results/gpu/:
#   gpu_check.log   every command's output, in order
#   results.json    the machine, the tests' outcome and each benchmark's JSON and headline ratio
# Budget: about 8 minutes on an H200 (each step has its own timeout; later steps are skipped when the
# budget is spent). On a machine without CUDA it says so, runs the checks that need no GPU (imports,
# device unit tests, the random-weights model the benchmarks build, the GPU tests collected and skipped)
# and exits 0.
#
#     bash bench/gpu_check.sh                  # here: proves the no-GPU path
#     device run, carry [".whl"]:  bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=${OUT:-$ROOT/bench/results/gpu}
mkdir -p "$DEST"
LOG=$DEST/gpu_check.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
PY=${PYTHON:-python3}
# here (no GPU), python3 may be a bare interpreter: the project's venv then stands in (the GPU machine has none)
if [ -z "${PYTHON:-}" ] && ! python3 -c "import torch" >/dev/null 2>&1 && [ -x .venv/bin/python ]; then
  PY=$ROOT/.venv/bin/python
fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
T0=$(date +%s)
STEPS=$(mktemp -d)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

# GPU_CHECK_STEPS="gpu-tests review_batching ...": only those steps (default: all)
ONLY=${GPU_CHECK_STEPS:-}
want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
elapsed() { echo $(( $(date +%s) - T0 )); }
# step NAME TIMEOUT_S CMD...: run with a timeout, record "NAME rc seconds" for the summary
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - $(elapsed) ))
  if [ "$left" -lt 20 ]; then echo "== $name: skipped (budget of ${BUDGET_S}s spent)"; echo "$name skipped 0" >> "$STEPS/steps"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s, at $(elapsed)s): $*"
  local s=$(date +%s)
  timeout -k 10 "$limit" "$@"
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - s ))s"
  echo "$name $rc $(( $(date +%s) - s ))" >> "$STEPS/steps"
}

echo "== GPU check at $(date -u +%FT%TZ) on $(hostname)"
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$PYVER" != 3.12 ]; then
  export PYTHONPATH=$ROOT
  echo "this python is $PYVER; the carried wheels are for the GPU machine's 3.12: using the installed packages"
elif ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf /tmp/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$ROOT
  echo "installed $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
else
  export PYTHONPATH=$ROOT
  echo "no .whl/ here (bench/gpu_wheels.sh makes it): using the installed packages"
fi
"$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| bf16", torch.cuda.is_bf16_supported(),
          "| GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "sqlalchemy", "alembic", "pydantic", "pydantic_settings"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"  {name} MISSING ({type(exc).__name__}: {exc})")
EOF
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

step imports 120 "$PY" -c "import domain.jobs, domain.device, domain.data_parallel, domain.adapters.distributed, domain.adapters.retrain, domain.quantization, domain.distillation, domain.review.service, bench._shapes; print('domain imports ok')"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers")

if [ "$CUDA" != 1 ]; then
  echo "== no CUDA device on this machine: the GPU tests are collected and skipped, no GPU benchmarks run"
  step device-unit-tests 300 "${PYTEST[@]}" tests/unit/test_device.py tests/unit/test_bench_shapes.py
  step gpu-tests-skipped 120 "${PYTEST[@]}" -m gpu tests/gpu tests/unit/test_device.py
else
  export FOUNDRY_DEVICE=cuda FOUNDRY_DATA_DIR=/tmp/foundry-gpu
  mkdir -p "$FOUNDRY_DATA_DIR"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>/dev/null || true
  # sizes from the first GPU run (2026-12-04, docs/benchmarks.md): 32 requests x 64 tokens x 2 rounds of review
  # batching and 20 swaps did not finish in 90 and 60 s (the naive baseline is HF generate, one request at a time)
  want gpu-tests && step gpu-tests 150 "${PYTEST[@]}" -m gpu tests/gpu tests/unit/test_device.py
  want review_batching && step review_batching 120 "$PY" bench/review_batching.py --random-weights --device cuda --requests 16 --batch-size 16 --max-new-tokens 32 --rounds 1
  # greedy rows equal to the naive path's are expected in fp32 only (bf16 kernels differ by batch shape, and the
  # random weights' near-flat logits turn any difference into another token): the identity check in fp32
  want review_batching_fp32 && FOUNDRY_COMPUTE_DTYPE=fp32 step review_batching_fp32 60 "$PY" bench/review_batching.py --random-weights --device cuda --requests 8 --batch-size 8 --max-new-tokens 16 --rounds 1 --tag fp32
  want adapter_switch && step adapter_switch 100 "$PY" bench/adapter_switch.py --random-weights --device cuda --max-new-tokens 16 --swaps 8 --warm-runs 2 --profile
  # 8 steps of batch 4 last about a second on the H200 (repeats 1.84x, 1.53x, 0.92x in one run): 32 steps;
  # --compare-loop: a fourth run with the per-sample loop forced, to show what torch's varlen kernel gives
  want retrain_throughput && step retrain_throughput 120 "$PY" bench/retrain_throughput.py --random-weights --device cuda --samples 128 --steps 32 --repeats 3 --compare-loop
  want quantize && FOUNDRY_COMPUTE_DTYPE=fp32 step quantize 60 "$PY" bench/quantize.py --random-weights --methods nf4,int8 --eval-tokens 1024
  want distill && step distill 80 "$PY" bench/distill.py --random-weights --steps 150 --eval-tokens 1024
fi

"$PY" - "$STEPS/steps" "$DEST/results.json" "$T0" "$CUDA" "$LOG" <<'EOF'
import glob, json, os, platform, sys, time
steps_file, out, t0, cuda, log = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
steps = {}
for line in open(steps_file):
    name, rc, secs = line.split()
    steps[name] = {"rc": rc if rc == "skipped" else int(rc), "seconds": int(secs)}
bench = {}
for path in sorted(glob.glob("bench/results/*-random.json")):
    if os.path.getmtime(path) >= t0:  # written by this run
        data = json.load(open(path))
        bench[os.path.basename(path).removesuffix(".json")] = data
text = open(log, errors="replace").read()
tests = [l for l in text.splitlines() if (" passed" in l or " skipped" in l or " failed" in l) and " in " in l]
try:
    import torch
    machine = {"torch": torch.__version__, "cuda": torch.version.cuda,
               "device": torch.cuda.get_device_name(0) if cuda else "no CUDA device"}
except Exception:  # noqa: BLE001
    machine = {}
summary = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
           "machine": machine, "cuda": cuda, "seconds": round(time.time() - t0), "steps": steps,
           "pytest": tests, "ratios": {k: v.get("ratio") for k, v in bench.items()}, "benchmarks": bench}
json.dump(summary, open(out, "w"), indent=1, default=str)
print("== summary:", json.dumps({"cuda": cuda, "seconds": summary["seconds"], "steps": steps, "ratios": summary["ratios"]}))
EOF
echo "== done in $(elapsed)s; results in $DEST"
failed=$(awk '$2 != 0 && $2 != "skipped"' "$STEPS/steps" | wc -l)
rm -rf "$STEPS"
[ "$failed" = 0 ] || { echo "$failed step(s) failed"; exit 1; }
exit 0
