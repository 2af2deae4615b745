"""Host work per decode step, counted: aten ops dispatched and host reads of tensor values, against the model with
its ordinary DynamicCache. Counts, not timings, so they are the same on every machine and under any load.

    python benchmarks/count_ops.py --context 2048,8192 --modes exact,sparse
    python benchmarks/count_ops.py --kernels --context 1024,4096 --modes sparse      # CUDA's step, interpreted

A tiny random-weight Llama (4 layers) prefills `context - 1` tokens with 15% of the KV on the device and the rest
in host RAM, then decodes; the step counted is one whose new token crosses no page boundary. Reported per mode and
context: ops per layer beyond what DynamicCache dispatches for the same step, host reads in the step, and tensors
made from host values in it (each a copy to the device that a GPU's host waits for). With `--kernels` the step is
CUDA's, the Triton kernels, run on the CPU under Triton's interpreter, each launch counted as one op.
The counting itself lives in `offload.opcount` (which also says what a host read is and why it matters on a GPU);
tests/test_counts.py holds these counts to their targets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "--kernels" in sys.argv:  # Triton's interpreter must be chosen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from offload.opcount import measure  # noqa: E402
from offload.report import markdown_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", default="2048,8192", help="comma-separated contexts (default: 2048,8192)")
    parser.add_argument("--modes", default="exact,sparse", help="comma-separated attention modes")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device-fraction", type=float, default=0.15, help="share of the KV on the device")
    parser.add_argument("--block-cache", type=float, default=0.0,
                        help="sparse mode: share of the device budget kept as the block cache (default 0)")
    parser.add_argument("--select-block", type=int, help="sparse mode: tokens per selection block")
    parser.add_argument("--kernels", action="store_true",
                        help="count CUDA's decode step (the Triton kernels) under Triton's CPU interpreter")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    extra = {"block_cache": args.block_cache} if args.block_cache else {}
    if args.select_block:
        extra["select_block"] = args.select_block
    rows = [measure(int(c), m, args.page_size, args.layers, device_fraction=args.device_fraction,
                    kernels=args.kernels, **extra)
            for m in args.modes.split(",") for c in args.context.split(",")]
    print("\n".join(markdown_table(
        ["mode", "context", "ops per layer beyond DynamicCache", "host reads per step (DynamicCache)",
         "tensors from host values per step"],
        [[r["mode"], str(r["context"]), f"{r['extra_ops_per_layer']:.2f}",
          f"{r['host_reads']} ({r['dynamic_host_reads']})", str(r["host_writes"])] for r in rows])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
