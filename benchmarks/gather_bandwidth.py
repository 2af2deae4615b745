"""Host->device bandwidth of the page gather kernel, against the two ways of moving the same bytes with copies.

For N pages at scattered slots of a pinned host pool (a random permutation; page shape like Llama-3-8B: H=8 KV
heads, P=64 tokens, D=128, bfloat16, so 128 KiB of K and 128 KiB of V per page), measured in the same run:
- gather: one `gather_pages` launch reading the N pages of K and V from the pinned pool in place;
- contiguous: one `copy_(non_blocking=True)` of N*2 pages' bytes from a contiguous pinned buffer (the ceiling);
- per-page: one `copy_(non_blocking=True)` (a cudaMemcpyAsync) per page of K and per page of V, 2N in all.
Each is timed with CUDA events around the call, the median of --repeats runs after --warmup, so host time spent
issuing the work (one launch, or 2N copies) counts where the device waits for it. Prints a markdown table (pages, bytes,
GB/s of each, gather/contiguous) and writes the rows as JSON with --json. Needs a CUDA device.

    python benchmarks/gather_bandwidth.py --pages 64,256,1024 --json benchmarks/results/gather-bandwidth.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from offload.kernels.gather import gather_pages  # noqa: E402
from offload.report import markdown_table  # noqa: E402


def _median_ms(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(n: int, host_k: torch.Tensor, host_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
            warmup: int, repeats: int, seed: int) -> dict:
    """One row: the three ways of bringing `n` scattered host pages (K and V) to the device."""
    split = dev_k.shape[0]  # every slot addresses the host pool
    page_shape = host_k.shape[1:]
    gen = torch.Generator().manual_seed(seed)
    host_slots = torch.randperm(host_k.shape[0], generator=gen)[:n]
    slots = (host_slots + split).to(torch.int32).cuda()
    out_k = torch.empty((n, *page_shape), dtype=host_k.dtype, device="cuda")
    out_v = torch.empty_like(out_k)
    nbytes = 2 * out_k.numel() * out_k.element_size()

    def gather() -> None:
        gather_pages(out_k, out_v, dev_k, dev_v, host_k, host_v, slots, split)

    flat_src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    flat_dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")

    def contiguous() -> None:
        flat_dst.copy_(flat_src, non_blocking=True)

    rows = host_slots.tolist()

    def per_page() -> None:
        for i, s in enumerate(rows):
            out_k[i].copy_(host_k[s], non_blocking=True)
            out_v[i].copy_(host_v[s], non_blocking=True)

    gather()
    torch.cuda.synchronize()
    assert torch.equal(out_k.cpu(), host_k[host_slots]) and torch.equal(out_v.cpu(), host_v[host_slots])
    ms = {name: _median_ms(fn, warmup, repeats)
          for name, fn in (("gather", gather), ("contiguous", contiguous), ("per_page", per_page))}
    gbs = {name: nbytes / (t * 1e-3) / 1e9 for name, t in ms.items()}
    return {"pages": n, "bytes": nbytes, **{f"ms_{k}": v for k, v in ms.items()},
            **{f"gbs_{k}": v for k, v in gbs.items()}, "gather_over_contiguous": gbs["gather"] / gbs["contiguous"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", default="64,256,1024", help="comma-separated page counts N")
    ap.add_argument("--pool-pages", type=int, default=4096, help="pages in the pinned host pool")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gather_bandwidth: needs a CUDA device (none found)", file=sys.stderr)
        sys.exit(2)
    counts = [int(x) for x in a.pages.split(",")]
    if max(counts) > a.pool_pages:
        ap.error(f"--pages {max(counts)} exceeds --pool-pages {a.pool_pages}")
    shape = (a.pool_pages, a.heads, a.page_size, a.head_dim)
    host_k = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
    host_v = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
    gen = torch.Generator().manual_seed(a.seed)
    for t in (host_k, host_v):  # distinct pages, so the correctness check means something
        t.view(torch.int16).copy_(torch.randint(-2**15, 2**15, shape, dtype=torch.int16, generator=gen))
    dev_k = torch.empty((1, *shape[1:]), dtype=torch.bfloat16, device="cuda")  # not read: all slots on the host
    dev_v = torch.empty_like(dev_k)
    rows = [measure(n, host_k, host_v, dev_k, dev_v, a.warmup, a.repeats, a.seed) for n in counts]
    print(f"{torch.cuda.get_device_name()}, page [H={a.heads}, P={a.page_size}, D={a.head_dim}] bfloat16, "
          f"K+V, median of {a.repeats}")
    print("\n".join(markdown_table(
        ["pages", "bytes", "GB/s gather", "GB/s contiguous", "GB/s per-page copies", "gather/contiguous"],
        [[str(r["pages"]), str(r["bytes"]), f"{r['gbs_gather']:.1f}", f"{r['gbs_contiguous']:.1f}",
          f"{r['gbs_per_page']:.1f}", f"{r['gather_over_contiguous']:.2f}"] for r in rows])))
    if a.json:
        meta = {"device": torch.cuda.get_device_name(), "heads": a.heads, "page_size": a.page_size,
                "head_dim": a.head_dim, "dtype": "bfloat16", "pool_pages": a.pool_pages, "repeats": a.repeats}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
