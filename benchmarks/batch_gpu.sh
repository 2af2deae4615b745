#!/usr/bin/env bash
# Batches on one GPU: a random-weight Llama-3-8B shape in bf16, 8K-token sequences, batches of 1 to 96, with 15% of
# the batch's KV on the GPU and the rest in pinned host RAM (offload-exact: the Triton kernels, a batch's decode
# step one launch per layer), against the model's DynamicCache (dynamic, all KV on the GPU: it runs out of memory
# past the largest batch it fits, which the row records as "out of memory") and transformers' offloaded cache
# (hf-offloaded). speedup_vs_batch_1 compares each method with itself at batch 1.
#
# The KV is 1 GiB per sequence: 96 sequences take 96 GiB, 14 of them on the GPU. --time-limit 480 starts no new
# run after 8 minutes (rows that did not run are marked "skipped"). Outputs: $OUT (or benchmarks/results)/batch-gpu.*
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv || true
exec "$PYTHON" -m offload.cli bench \
    --model-shape llama3-8b --dtype bfloat16 --device cuda \
    --context 8160 --batch 1,16,48,64,96 --new-tokens 32 --repeats 1 \
    --methods dynamic,hf-offloaded,offload-exact \
    --kv-device-fraction 0.15 --time-limit 480 \
    --out "$OUT_DIR/batch-gpu.json" "$@"
