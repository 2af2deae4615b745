#!/usr/bin/env bash
# Attention on the host, on a GPU machine: a random-weight Llama-3-8B shape in bf16, 15% of the KV on the GPU and
# the rest in pinned host RAM, at 32K and 128K. offload-exact with host_attention=auto (the default) beside off and
# all, in one process and alternating over repeats, with the PCIe bound of each row; then the host pool's bandwidth
# and the split the cost model chose from this machine's rates; then a trace of auto at 32K, with the host's
# attention on its own track. Outputs: $OUT (or benchmarks/results)/gpu_host_attention.*
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv || true
"$PYTHON" -m offload.cli bench \
    --model-shape llama3-8b --dtype bfloat16 --device cuda \
    --context 32768,131040 --new-tokens 32 --repeats 3 \
    --methods offload-exact --host-attention-variants off,all \
    --kv-device-fraction 0.15 --time-limit 420 \
    --out "$OUT_DIR/gpu_host_attention.json" "$@"
"$PYTHON" benchmarks/host_attention.py --shapes llama3-8b --contexts 32768,131072 --trace-context 32768 \
    --trace-out "$OUT_DIR/gpu_host_attention_trace.json" --out "$OUT_DIR/gpu_host_attention_pool.json"
