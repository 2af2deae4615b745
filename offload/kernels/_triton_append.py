"""Triton kernel behind `offload.kernels.append` (imports triton; loaded only when called)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from offload.kernels.launch import launch as run


@triton.jit(do_not_specialize=["slot", "row"])
def _append_kernel(k_ptr, v_ptr, pk_ptr, pv_ptr, slot, row, stride_kh, stride_vh, stride_s, stride_h, stride_p, H,
                   D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: k [H, D] and v (rows `stride_*h` apart) into row `row` of page `slot` of the pools."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    inside = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    dst = slot.to(tl.int64) * stride_s + row * stride_p + offs_h[:, None] * stride_h + offs_d[None, :]
    k = tl.load(k_ptr + offs_h[:, None] * stride_kh + offs_d[None, :], mask=inside)
    v = tl.load(v_ptr + offs_h[:, None] * stride_vh + offs_d[None, :], mask=inside)
    tl.store(pk_ptr + dst, k, mask=inside)
    tl.store(pv_ptr + dst, v, mask=inside)


def launch(pool_k: torch.Tensor, pool_v: torch.Tensor, slot: int, row: int, k: torch.Tensor,
           v: torch.Tensor) -> None:
    """Arguments checked by `offload.kernels.append.append_token`."""
    s, h, _, d = pool_k.shape
    run(_append_kernel, (1,), pool_k.device, k, v, pool_k, pool_v, slot, row, k.stride(1), v.stride(1),
        pool_k.stride(0), pool_k.stride(1), pool_k.stride(2), h, d, BLOCK_H=triton.next_power_of_2(h),
        BLOCK_D=triton.next_power_of_2(d))
