#!/usr/bin/env bash
# GPU checks before the full benchmark: the GPU tests, the CPU suite's fast tests on this torch/transformers,
# a 4-layer smoke run of every bench method, and exact-mode decode speed per page size. Outputs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"; mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
python -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
echo "== GPU tests"; timeout 120 python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -5
echo "== fast tests"; timeout 200 python -m pytest -q -x -m "not slow and not gpu" -p no:cacheprovider tests 2>&1 | tail -5
echo "== bench smoke (4 layers, 8K)"
timeout 120 python -m offload.cli bench --model-shape llama3-8b --layers 4 --dtype bfloat16 --device cuda \
    --context 8192 --new-tokens 8 --repeats 1 --out "$OUT_DIR/smoke.json" 2>&1 | tail -8
echo "== page size (offload-exact, 8 layers, 32K, 15% on the GPU)"
for p in 32 64 128 256; do
    timeout 60 python -m offload.cli bench --model-shape llama3-8b --layers 8 --dtype bfloat16 --device cuda \
        --context 32768 --new-tokens 16 --repeats 1 --methods offload-exact --page-size "$p" \
        --out "$OUT_DIR/page$p.json" 2>&1 | grep -E "offload-exact|bandwidth" | sed "s/^/page $p: /"
done
