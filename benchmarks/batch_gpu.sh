#!/usr/bin/env bash
# Batches on one GPU: run_gpu.sh's setting (a random-weight Llama-3-8B shape in bf16, 15% of the KV on the GPU and
# the rest in pinned host RAM) over 8K-token sequences in batches of 1 to 96. offload-exact runs the Triton kernels,
# a batch's decode step one launch per layer; dynamic (all KV on the GPU) runs out of memory past the largest batch
# it fits, which its row records as "out of memory"; hf-offloaded is transformers' offloaded cache.
# speedup_vs_batch_1 compares each method with itself at batch 1.
#
# The KV is 1 GiB per sequence: 96 sequences take 96 GiB, 14 of them on the GPU. --time-limit 480 starts no new
# run after 8 minutes (rows that did not run are marked "skipped"). Outputs: $OUT (or benchmarks/results)/batch-gpu.*
set -euo pipefail
OUT_DIR="${OUT:-$(dirname "$0")/results}"
# Later options override run_gpu.sh's own.
exec "$(dirname "$0")/run_gpu.sh" --context 8160 --batch 1,16,48,64,96 --repeats 1 \
    --methods dynamic,hf-offloaded,offload-exact --time-limit 480 \
    --out "$OUT_DIR/batch-gpu.json" --plot "$OUT_DIR/batch-gpu.png" "$@"
