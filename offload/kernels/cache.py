"""The block cache's fill (offload/block_cache.py) as two Triton launches, for the kernel decode step: the ring's
bookkeeping in one program (a few integers per entry), then the chosen blocks' copies in parallel. The results
equal `BlockCache.fill`'s (the torch reference) bit for bit, but for the spare slot and the spare entry, which
nothing reads."""

from __future__ import annotations

import torch

from offload.kernels.gather import _kernels


def fill(cache, layer: int, blocks: torch.Tensor, ids: torch.Tensor, host_blocks: int, k: torch.Tensor,
         v: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor, reads: torch.Tensor,
         dst: torch.Tensor | None = None) -> None:
    """`BlockCache.fill(cache.entries_of(layer, blocks, False), ids.view(-1), host_blocks, k, v, flat_k, flat_v)`
    in two launches, nothing read on the host, the entries computed in the first: `blocks` [count, choosers]
    (int64, choosers 1 or the cache's heads) the step chose, `ids` [count, heads] (int32 or int64, contiguous)
    the unified block ids it read, block-major as k, v [count * heads, B, D] hold them. The entries read from the
    host pool are added to `reads` (int64 [1] or [], on the device). `dst`: int64 [count * heads], a scratch row
    the caller may keep (a view of the cache's by default)."""
    n = ids.numel()
    count, heads = n // cache.heads, cache.heads
    if (blocks.dim() != 2 or blocks.shape[0] != count or blocks.shape[1] not in (1, heads) or n != count * heads
            or k.shape[0] != n or v.shape != k.shape or k.shape[1:] != flat_k.shape[1:] or not ids.is_contiguous()):
        raise ValueError(f"cache fill: ids {tuple(ids.shape)}, blocks {tuple(blocks.shape)} for {heads} heads, "
                         f"K/V {tuple(k.shape)} and {tuple(v.shape)} for pools of {tuple(flat_k.shape[1:])} blocks "
                         f"don't match")
    if not cache.fits(n):
        raise ValueError(f"cache fill: {n} blocks in one step, the ring holds {cache.entries}")
    if n == 0:
        return
    tc = _kernels("block cache fill", "_triton_cache")
    tc.launch(ids, blocks if blocks.is_contiguous() else blocks.contiguous(), cache.owner, cache.row, cache.home,
              cache.ptr, cache.dst[:n] if dst is None else dst, reads, k, v, flat_k, flat_v, cache.first,
              host_blocks, cache.entries, cache.spare_slot, cache.spare_entry, layer * cache.blocks * heads, heads)
