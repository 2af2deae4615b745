"""Host->device bandwidth of the page gather kernel, against the two ways of moving the same bytes with copies.

For N pages at scattered slots of a pinned host pool (a random permutation; page shape like Llama-3-8B: H=8 KV
heads, P=64 tokens, D=128, bfloat16, so 128 KiB of K and 128 KiB of V per page), measured in the same run:
- gather: one `gather_pages` launch reading the N pages of K and V from the pinned pool in place;
- contiguous: one `copy_(non_blocking=True)` of N*2 pages' bytes from a contiguous pinned buffer (the ceiling);
- per-page: one `copy_(non_blocking=True)` (a cudaMemcpyAsync) per page of K and per page of V, 2N in all.
Each is timed with CUDA events around the call, the median of --repeats runs after --warmup, so host time spent
issuing the work (one launch, or 2N copies) counts where the device waits for it. Prints a markdown table (pages, bytes,
GB/s of each, gather/contiguous) and writes the rows as JSON with --json. Needs a CUDA device.

With --kv-quant SETTING (k8v8, k8v4 or k4v2; default none: the above only) the same N pages are also stored packed
(`offload.quant.PageCodec`, random normal pages encoded once) in a second pinned pool, and each row adds:
- packed: one `gather_pages_packed` launch dequantizing the N packed pages from the pinned pool in place into
  bfloat16 pages on the device;
- contiguous packed: one `copy_(non_blocking=True)` of the same number of compressed bytes (N * page_bytes) from a
  contiguous pinned buffer.
It prints a second table: the packed gather's bandwidth in compressed bytes/s, the contiguous copy's over the same
bytes, their ratio (the target: at least 0.8), and the effective bandwidth in full-precision (bfloat16) bytes/s.

    python benchmarks/gather_bandwidth.py --pages 64,256,1024 --json benchmarks/results/gather-bandwidth.json
    python benchmarks/gather_bandwidth.py --pages 64,256,1024 --kv-quant k8v4
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

from offload.kernels.gather import gather_pages, gather_pages_packed  # noqa: E402
from offload.quant import SETTINGS, PageCodec  # noqa: E402
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


def packed_pool(codec: PageCodec, pages: int, seed: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Pinned packed rows [pages, k_bytes], [pages, v_bytes] of random normal pages, encoded on the device a chunk
    at a time."""
    host_kq = torch.empty((pages, codec.k_bytes), dtype=torch.uint8, pin_memory=True)
    host_vq = torch.empty((pages, codec.v_bytes), dtype=torch.uint8, pin_memory=True)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (codec.kv_heads, codec.page_size, codec.head_dim)
    for start in range(0, pages, chunk):
        m = min(chunk, pages - start)
        k, v = (torch.randn((m, *shape), generator=gen, device="cuda").to(torch.bfloat16) for _ in range(2))
        kq, vq = codec.encode(k, v)
        host_kq[start:start + m].copy_(kq)
        host_vq[start:start + m].copy_(vq)
    return host_kq, host_vq


def measure_packed(n: int, host_kq: torch.Tensor, host_vq: torch.Tensor, codec: PageCodec, warmup: int,
                   repeats: int, seed: int) -> dict:
    """The packed columns of one row: `gather_pages_packed` of `n` scattered packed pages (the same slots as
    `measure`'s) against one contiguous copy of as many compressed bytes."""
    gen = torch.Generator().manual_seed(seed)
    host_slots = torch.randperm(host_kq.shape[0], generator=gen)[:n]
    slots = host_slots.to(torch.int32).cuda()
    out_k = torch.empty((n, codec.kv_heads, codec.page_size, codec.head_dim), dtype=torch.bfloat16, device="cuda")
    out_v = torch.empty_like(out_k)
    packed_bytes = n * codec.page_bytes
    full_bytes = 2 * out_k.numel() * out_k.element_size()

    def packed() -> None:
        gather_pages_packed(out_k, out_v, host_kq, host_vq, slots, codec)

    flat_src = torch.empty(packed_bytes, dtype=torch.uint8, pin_memory=True)
    flat_dst = torch.empty(packed_bytes, dtype=torch.uint8, device="cuda")

    def contiguous() -> None:
        flat_dst.copy_(flat_src, non_blocking=True)

    packed()
    torch.cuda.synchronize()
    check = host_slots[:4]  # a few rows against the torch decoder, on the device
    k, v = codec.decode(host_kq[check].cuda(), host_vq[check].cuda(), torch.bfloat16)
    assert torch.equal(out_k[:len(check)], k) and torch.equal(out_v[:len(check)], v)
    ms = {name: _median_ms(fn, warmup, repeats) for name, fn in (("packed", packed), ("contiguous_packed", contiguous))}
    return {"packed_bytes": packed_bytes, "full_bytes": full_bytes, "ms_packed": ms["packed"],
            "ms_contiguous_packed": ms["contiguous_packed"],
            "gbs_packed": packed_bytes / (ms["packed"] * 1e-3) / 1e9,
            "gbs_contiguous_packed": packed_bytes / (ms["contiguous_packed"] * 1e-3) / 1e9,
            "packed_over_contiguous": ms["contiguous_packed"] / ms["packed"],
            "gbs_packed_effective": full_bytes / (ms["packed"] * 1e-3) / 1e9}


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
    ap.add_argument("--kv-quant", default="none", choices=list(SETTINGS),
                    help="also time gather_pages_packed over the same pages stored packed in this setting")
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
    codec = PageCodec.of(a.kv_quant, a.heads, a.page_size, a.head_dim)
    if codec is not None:
        del host_k, host_v  # the full-precision pool is no longer needed: make room for the packed one
        host_kq, host_vq = packed_pool(codec, a.pool_pages, a.seed)
        for r in rows:
            r.update(measure_packed(r["pages"], host_kq, host_vq, codec, a.warmup, a.repeats, a.seed))
    print(f"{torch.cuda.get_device_name()}, page [H={a.heads}, P={a.page_size}, D={a.head_dim}] bfloat16, "
          f"K+V, median of {a.repeats}")
    print("\n".join(markdown_table(
        ["pages", "bytes", "GB/s gather", "GB/s contiguous", "GB/s per-page copies", "gather/contiguous"],
        [[str(r["pages"]), str(r["bytes"]), f"{r['gbs_gather']:.1f}", f"{r['gbs_contiguous']:.1f}",
          f"{r['gbs_per_page']:.1f}", f"{r['gather_over_contiguous']:.2f}"] for r in rows])))
    if codec is not None:
        print(f"\n{a.kv_quant}: packed pages of {codec.page_bytes} bytes ({codec.ratio(torch.bfloat16):.2f}x smaller), "
              "dequantized to bfloat16; GB/s of compressed bytes unless said")
        print("\n".join(markdown_table(
            ["pages", "packed bytes", "GB/s packed gather", "GB/s contiguous (packed bytes)", "packed/contiguous",
             "GB/s effective (bfloat16 bytes)"],
            [[str(r["pages"]), str(r["packed_bytes"]), f"{r['gbs_packed']:.1f}", f"{r['gbs_contiguous_packed']:.1f}",
              f"{r['packed_over_contiguous']:.2f}", f"{r['gbs_packed_effective']:.1f}"] for r in rows])))
    if a.json:
        meta = {"device": torch.cuda.get_device_name(), "heads": a.heads, "page_size": a.page_size,
                "head_dim": a.head_dim, "dtype": "bfloat16", "pool_pages": a.pool_pages, "repeats": a.repeats,
                "kv_quant": a.kv_quant}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
