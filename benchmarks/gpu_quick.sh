#!/usr/bin/env bash
# Quick GPU check: GPU tests, then exact and sparse decode on an 8-layer Llama-3-8B shape at 32K per page size.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"; mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
echo "== GPU tests"; timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_bench.py 2>&1 | tail -3
for p in ${PAGES:-64 256}; do
    timeout 150 python -m offload.cli bench --model-shape llama3-8b --layers 8 --dtype bfloat16 --device cuda \
        --context 32768 --new-tokens 16 --repeats 2 --methods dynamic,offload-exact,offload-sparse --page-size "$p" \
        --out "$OUT_DIR/page$p.json" 2>&1 | grep -E "^(dynamic|offload|hf)|bandwidth" | sed "s/^/page $p: /"
done
