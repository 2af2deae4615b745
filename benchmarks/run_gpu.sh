#!/usr/bin/env bash
# The GPU benchmark recorded in benchmarks/README.md: a random-weight Llama-3-8B shape in bf16 on one GPU
# (weights never matter for speed), contexts 8K, 32K and 128K, every method, median of 3 interleaved repeats.
#
# The runtime gets a device budget of 15% of the KV (context plus new tokens; 2.4 GiB at 128K, where the whole
# KV is 16 GiB) and a host budget holding all of it. 131040 = 131072 positions - 32 new tokens.
#
# Time: about 5-7 minutes on an H100 (model build ~5 s; per repeat at 128K: four ~15-20 s prefills, then 32 decode
# steps: dynamic ~2 s, offload-exact ~10 s, hf-offloaded ~15-25 s). --time-limit 420 starts no new run after
# 7 minutes (rows that did not run are marked "skipped"), so the script ends within 10 minutes even when a step is
# slower than estimated. The JSON is rewritten after every context. Outputs: $OUT (or benchmarks/results)/gpu.*
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python}"
# Big, differently sized allocations per method: avoid fragmentation-induced out-of-memory between rows.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv || true
exec "$PYTHON" -m offload.cli bench \
    --model-shape llama3-8b --dtype bfloat16 --device cuda \
    --context 8192,32768,131040 --new-tokens 32 --repeats 3 \
    --methods dynamic,hf-offloaded,offload-exact,offload-sparse \
    --kv-device-fraction 0.15 --time-limit 420 \
    --out "$OUT_DIR/gpu.json" --plot "$OUT_DIR/gpu.png" "$@"
