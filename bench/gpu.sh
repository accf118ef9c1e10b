#!/usr/bin/env bash
# The GPU benchmark in one go (issue 16): see bench/gpu_bench.py for what each section measures.
#
#   bash bench/gpu.sh                       # full run on CUDA: base MED at 384 px, bf16 (under 8 minutes on an H200)
#   bash bench/gpu.sh --device cpu --quick  # the CPU smoke run (tiny preset; about a minute on 2 cores)
#   PY=/path/to/python OUT=/tmp/g bash bench/gpu.sh --device cpu --quick
#
# Writes $OUT/gpu.json and $OUT/gpu.md (OUT: $OUT when set, else bench/out/) and prints the table last.
# Needs only what the GPU image has (torch, transformers, safetensors, tokenizers, pyarrow, numpy,
# pillow, tqdm): nothing is installed, the script checks those imports first and stops with a message.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false NO_ALBUMENTATIONS_UPDATE=1
OUT_DIR="${OUT:-bench/out}"

args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) args+=(--device "$2"); shift 2 ;;
    --device=*) args+=(--device "${1#*=}"); shift ;;
    --quick) args+=(--quick); shift ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --sections) shift; args+=(--sections); while [[ $# -gt 0 && "$1" != --* ]]; do args+=("$1"); shift; done ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (use --device cpu|cuda, --quick, --out DIR, --sections NAME...)" >&2; exit 2 ;;
  esac
done

"$PY" - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "transformers", "safetensors", "tokenizers", "pyarrow", "numpy", "PIL", "tqdm")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: missing Python packages {missing}; this script installs nothing")
PY

mkdir -p "$OUT_DIR"
start=$(date +%s)
"$PY" bench/gpu_bench.py "${args[@]}" --out "$OUT_DIR"
echo "gpu.sh: wrote $OUT_DIR/gpu.json and $OUT_DIR/gpu.md in $(( $(date +%s) - start )) s" >&2
