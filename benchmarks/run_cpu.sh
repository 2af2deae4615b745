#!/usr/bin/env bash
# The CPU benchmark recorded in benchmarks/README.md: the default model (SmolLM2-135M-Instruct, float32),
# every method that runs on a CPU (hf-offloaded gets a "needs CUDA" row), median of 3 interleaved repeats.
#
# SmolLM2 has 8192 positions, so the largest context is 8192 - 32 new tokens = 8160.
# The runtime's device budget is the default 15% of the KV (context plus new tokens); the host holds the rest.
# On the CPU the "device" is RAM as well, so offloading costs copies but saves nothing: this run measures the
# runtime's overhead against the plain cache, not a memory win.
#
# Runtime: about 6-10 minutes on a 2-core machine (model load ~10 s, 3 contexts x 3 repeats x 3 methods;
# the 8160-token prefills dominate). Outputs: $OUT (or benchmarks/results)/cpu.json and cpu.png.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PYTHON="${PYTHON:-python}"
exec "$PYTHON" -m offload.cli bench \
    --context 2048,4096,8160 --new-tokens 32 --repeats 3 \
    --methods dynamic,hf-offloaded,offload-exact,offload-sparse \
    --kv-device-fraction 0.15 \
    --out "$OUT_DIR/cpu.json" --plot "$OUT_DIR/cpu.png" "$@"
