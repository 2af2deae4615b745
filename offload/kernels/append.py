"""A decode step's new token into its tail page, in one launch: what `page_k[:, row] = k; page_v[:, row] = v` does
in six torch calls (two views, two selects, two copies)."""

from __future__ import annotations

import torch

from offload.kernels.gather import _kernels


def append_token(pool_k: torch.Tensor, pool_v: torch.Tensor, slot: int, row: int, k: torch.Tensor,
                 v: torch.Tensor) -> None:
    """k, v [1, H, 1, D] (the model's new key and value; D contiguous) into row `row` of page `slot` of the pools
    [S, H, P, D] of the same dtype, in one Triton launch."""
    s, h, p, d = pool_k.shape
    if (k.shape != (1, h, 1, d) or v.shape != k.shape or pool_v.shape != pool_k.shape or k.stride(-1) != 1
            or not k.dtype == v.dtype == pool_k.dtype == pool_v.dtype
            or v.stride(-1) != 1 or pool_k.stride(-1) != 1 or pool_v.stride() != pool_k.stride()):
        raise ValueError(f"append_token: k {tuple(k.shape)}, v {tuple(v.shape)} don't fit pools "
                         f"{tuple(pool_k.shape)}, {tuple(pool_v.shape)} (D contiguous, one dtype)")
    if not (0 <= slot < s and 0 <= row < p):
        raise ValueError(f"append_token: slot {slot} of {s}, row {row} of {p}")
    _kernels("append_token", "_triton_append").launch(pool_k, pool_v, slot, row, k, v)
