"""Triton kernel behind `offload.kernels.gather` (imports triton; loaded only when called).

NOTE: on CUDA a pinned CPU tensor is passed to the kernel as it is: Triton's launcher turns every pointer argument
into a device pointer with `cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER)`, which succeeds for
page-locked host memory (under unified virtual addressing the same address), and rejects only pageable memory
("cannot be accessed from Triton (cpu tensor?)"), which `gather_pages` and `gather_blocks` refuse before
the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from offload.kernels.launch import as_bits
from offload.kernels.launch import launch as run

# Bytes each program copies from one page, for K and again for V: big enough to keep many 16-byte loads in
# flight per program, small enough that a page of 64 tokens (128 KiB of K at H=8, D=128, bfloat16) spreads over
# 16 programs.
_BLOCK_BYTES = 8192


@triton.jit
def _gather_kernel(
    out_k_ptr, out_v_ptr, dev_k_ptr, dev_v_ptr, host_k_ptr, host_v_ptr, slots_ptr,
    split, page_elems,
    BLOCK: tl.constexpr,
):
    """One (entry i, block c): elements [c*BLOCK, (c+1)*BLOCK) of page slots[i], K and V, into row i of the
    outputs. Pages are `page_elems` contiguous elements; a slot of -1 leaves the row as it is. A "page" here is
    any run of `page_elems` elements at a multiple of `page_elems`: `launch_blocks` passes B-token blocks of the
    pool's pages, with slots counted in blocks."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    in_page = offs < page_elems
    slot = tl.load(slots_ptr + i).to(tl.int64)  # int64: slot * page_elems can pass 2**31 on large pools
    if slot >= 0:
        if slot < split:
            src = slot * page_elems + offs
            k = tl.load(dev_k_ptr + src, mask=in_page)
            v = tl.load(dev_v_ptr + src, mask=in_page)
        else:
            src = (slot - split) * page_elems + offs
            k = tl.load(host_k_ptr + src, mask=in_page)
            v = tl.load(host_v_ptr + src, mask=in_page)
        dst = i * page_elems + offs
        tl.store(out_k_ptr + dst, k, mask=in_page)
        tl.store(out_v_ptr + dst, v, mask=in_page)


def _launch(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
            host_k: torch.Tensor, host_v: torch.Tensor, slots: torch.Tensor, n: int, split: int,
            page_elems: int) -> None:
    """n entries of `page_elems` elements each; `slots` and `split` counted in such pages."""
    width = out_k.element_size()
    tensors = [as_bits(t) for t in (out_k, out_v, dev_k, dev_v, host_k, host_v)]
    block = min(_BLOCK_BYTES // width, triton.next_power_of_2(page_elems))
    grid = (n, triton.cdiv(page_elems, block))
    run(_gather_kernel, grid, out_k.device, *tensors, slots, split, page_elems, BLOCK=block)


def launch(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
           host_k: torch.Tensor, host_v: torch.Tensor, slots: torch.Tensor, n: int, split: int) -> None:
    """Arguments already checked by `gather_pages` (n >= 1, non-empty pages, slots on the outputs' device)."""
    _launch(out_k, out_v, dev_k, dev_v, host_k, host_v, slots, n, split, out_k[0].numel())


def launch_blocks(out_k: torch.Tensor, out_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
                  host_k: torch.Tensor, host_v: torch.Tensor, index: torch.Tensor, split: int) -> None:
    """Arguments already checked by `gather_blocks` (non-empty outputs [n, Ho, B, D], index [n, Ho] on their
    device). Block u = (slot * H + h) * R + j of a pool [S, H, P = R*B, D] is its elements [u*B*D, (u+1)*B*D):
    the page gather over pages of B*D elements, entry i*Ho + c, with the first split*H*R blocks on the device."""
    n, ho, b, d = out_k.shape
    h, p = dev_k.shape[1], dev_k.shape[2]
    index = index if index.dim() == 1 else index.reshape(-1)
    _launch(out_k, out_v, dev_k, dev_v, host_k, host_v, index, n * ho, split * h * (p // b), b * d)
