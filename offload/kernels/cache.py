"""The block cache's fill (offload/block_cache.py) as two Triton launches, for the kernel decode step: the ring's
bookkeeping in one program (a few integers per entry), then the chosen blocks' copies in parallel. The results
equal `BlockCache.fill`'s (the torch reference) bit for bit, but for the spare slot and the spare entry, which
nothing reads."""

from __future__ import annotations

import torch

from offload.kernels.gather import _kernels


def fill(cache, entries: torch.Tensor, ids: torch.Tensor, host_blocks: int, k: torch.Tensor, v: torch.Tensor,
         flat_k: torch.Tensor, flat_v: torch.Tensor) -> None:
    """`BlockCache.fill(entries, ids, host_blocks, k, v, flat_k, flat_v)` in two launches; nothing is read on
    the host. `ids` [n] (int32 or int64) and `entries` [n] int64 in the order of the gathered blocks k, v
    [n, B, D]; n at most the ring's size (`cache.fits`)."""
    n = ids.numel()
    if entries.shape != (n,) or k.shape[0] != n or v.shape != k.shape or k.shape[1:] != flat_k.shape[1:]:
        raise ValueError(f"cache fill: {n} ids, entries {tuple(entries.shape)}, blocks {tuple(k.shape)} and "
                         f"{tuple(v.shape)} for pools of {tuple(flat_k.shape[1:])} blocks don't match")
    if not cache.fits(n):
        raise ValueError(f"cache fill: {n} blocks in one step, the ring holds {cache.entries}")
    if n == 0:
        return
    tc = _kernels("block cache fill", "_triton_cache")
    tc.launch(ids.contiguous(), entries.contiguous(), cache.owner, cache.row, cache.home, cache.ptr,
              cache.dst[:n], k, v, flat_k, flat_v, cache.first, host_blocks, cache.entries, cache.spare_slot,
              cache.spare_entry)
