#!/usr/bin/env bash
# Attention on the host, on a GPU machine: run_gpu.sh's setting (a random-weight Llama-3-8B shape in bf16, 15% of
# the KV on the GPU, the rest in pinned host RAM) at 32K and 128K, offload-exact with host_attention=auto (the
# default) beside off and all, in one process and alternating over repeats, each with its share of the PCIe bound
# (the later flags override run_gpu.sh's). Then the host pool's bandwidth and the split the cost model chose from
# this machine's rates, and a trace of auto at 32K with the host's attention on its own track.
# Outputs: $OUT (or benchmarks/results)/gpu_host_attention*
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
bash benchmarks/run_gpu.sh --context 32768,131040 --methods offload-exact --host-attention-variants off,all \
    --out "$OUT_DIR/gpu_host_attention.json" --plot "$OUT_DIR/gpu_host_attention.png" "$@"
"${PYTHON:-python}" benchmarks/host_attention.py --shapes llama3-8b --contexts 32768,131072 --trace-context 32768 \
    --trace-out "$OUT_DIR/gpu_host_attention_trace.json" --out "$OUT_DIR/gpu_host_attention_pool.json"
