"""Triton kernels of the block cache's fill (offload/block_cache.py): the ring's bookkeeping in one program, then
the copies in parallel. Import through `offload.kernels.cache`, which checks arguments."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from offload.kernels.launch import as_bits
from offload.kernels.launch import launch as run


@triton.jit
def _chunk(ids_ptr, start, n, ptr, first, host_blocks, ring, CHUNK: tl.constexpr):
    """Entries start..start+CHUNK-1: offsets, which exist, their block ids, their ring slots (if copies) and which
    are copies aged past half the ring (Python's modulo: the ring position may be below the slot's)."""
    offs = start + tl.arange(0, CHUNK)
    live = offs < n
    ids = tl.load(ids_ptr + offs, mask=live, other=-1).to(tl.int64)
    slot = ids - first
    age = ((ptr - slot) % ring + ring) % ring
    aged = live & (ids >= first) & (ids < host_blocks) & (age >= ring // 2)
    return offs, live, ids, slot, aged


@triton.jit
def _ring_kernel(ids_ptr, blocks_ptr, owner_ptr, row_ptr, home_ptr, ptr_ptr, dst_ptr, reads_ptr, n, first,
                 host_blocks, ring, spare_slot, spare_entry, entry_base, heads, choosers, CHUNK: tl.constexpr):
    """One program over the step's n entries, in chunks: (1) copies aged past half the ring free their slots;
    (2) entries taken (from the host, or aged copies) get ring positions ptr + rank (inclusive, in entry order),
    each position's old owner goes back to its home, the entry points at the slot; `dst` gets the slot's block id
    (-1 for entries not taken); (3) ptr advances by the count taken, and reads[0] by the entries read from the host
    pool. The same results as `BlockCache.fill`. Entry i = b * heads + c (block-major) of the step's choice is
    entry_base + blocks[b, c % choosers] * heads + c of the cache's table."""
    ptr = tl.load(ptr_ptr)
    for start in range(0, n, CHUNK):
        offs, live, ids, slot, aged = _chunk(ids_ptr, start, n, ptr, first, host_blocks, ring, CHUNK)
        tl.store(owner_ptr + slot, tl.zeros_like(slot) + spare_entry, mask=aged)
    tl.debug_barrier()
    carry = ptr
    reads = tl.load(reads_ptr)
    for start in range(0, n, CHUNK):
        offs, live, ids, slot, aged = _chunk(ids_ptr, start, n, ptr, first, host_blocks, ring, CHUNK)
        from_host = live & (ids >= host_blocks)
        take = from_host | aged
        rank = tl.cumsum(take.to(tl.int64), 0)
        pos = (carry + rank) % ring
        old = tl.load(owner_ptr + pos, mask=take, other=spare_entry)
        back = take & (old != spare_entry)
        tl.store(row_ptr + old, tl.load(home_ptr + old, mask=back), mask=back)
        c = offs % heads
        chosen = tl.load(blocks_ptr + (offs // heads) * choosers + c % choosers, mask=take, other=0)
        entry = entry_base + chosen * heads + c
        tl.store(row_ptr + entry, first + pos, mask=take)
        tl.store(owner_ptr + pos, entry, mask=take)
        tl.store(dst_ptr + offs, tl.where(take, first + pos, -1), mask=live)
        carry += tl.sum(take.to(tl.int64), 0)
        reads += tl.sum(from_host.to(tl.int64), 0)
    tl.store(ptr_ptr, carry)
    tl.store(reads_ptr, reads)


@triton.jit
def _scatter_kernel(src_k_ptr, src_v_ptr, dst_k_ptr, dst_v_ptr, dst_ptr, elems, BLOCK: tl.constexpr):
    """Entry i's `elems` elements (part c of them) to block dst[i] of the pools; -1 copies nothing."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    inside = offs < elems
    dst = tl.load(dst_ptr + i)
    if dst >= 0:
        src = i * elems + offs
        tl.store(dst_k_ptr + dst * elems + offs, tl.load(src_k_ptr + src, mask=inside), mask=inside)
        tl.store(dst_v_ptr + dst * elems + offs, tl.load(src_v_ptr + src, mask=inside), mask=inside)


_CHUNK = 1024
_BLOCK_BYTES = 4096


def launch(ids: torch.Tensor, blocks: torch.Tensor, owner: torch.Tensor, row: torch.Tensor, home: torch.Tensor,
           ptr: torch.Tensor, dst: torch.Tensor, reads: torch.Tensor, src_k: torch.Tensor, src_v: torch.Tensor,
           flat_k: torch.Tensor, flat_v: torch.Tensor, first: int, host_blocks: int, ring: int, spare_slot: int,
           spare_entry: int, entry_base: int, heads: int) -> None:
    """Arguments checked by `offload.kernels.cache.fill`. Blocks are copied as bits: tensors already of the
    integer type of their width (views a caller keeps) are taken as they are."""
    n = ids.numel()
    elems = src_k.shape[1] * src_k.shape[2]
    width = src_k.element_size()
    block = min(_BLOCK_BYTES // width, triton.next_power_of_2(elems))
    copies = [as_bits(t) for t in (src_k, src_v, flat_k, flat_v)]
    run(_ring_kernel, (1,), ids.device, ids, blocks, owner, row, home, ptr, dst, reads, n, first, host_blocks, ring,
        spare_slot, spare_entry, entry_base, heads, blocks.shape[1], CHUNK=_CHUNK)
    run(_scatter_kernel, (n, triton.cdiv(elems, block)), ids.device, *copies, dst, elems, BLOCK=block)
