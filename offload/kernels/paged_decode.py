"""Paged decode attention: one query token over pages read in place from the device pool.

Shapes (G = query heads per KV head, one token; same conventions as `offload.attention_math`):
- `q`: [H_kv, G, D]; row g of KV head h is query head h*G + g;
- pools `k_pool`, `v_pool`: [S, H_kv, P, D] (page-major, as the device tier stores them);
- `slots`: int32 [n], the pool slots of the pages in position order; the last page holds `valid_last` tokens
  (1..P) and the first page's tokens before `start` are hidden (a sliding window's start);
- result: (o [H_kv, G, D] normalized, lse [H_kv, G]) in float32, a partial that `attention_math.merge` mixes
  with partials over other keys.
"""

from __future__ import annotations

import importlib

import torch

from offload import attention_math as am


def _hidden(n: int, page_size: int, valid_last: int, start: int, device: torch.device) -> torch.Tensor | None:
    """Bool [n, T=1, P] for `attention_math.pages_partial`: True before `start` on the first page and from
    `valid_last` on the last; None when every token is seen."""
    if start == 0 and valid_last == page_size:
        return None
    hidden = torch.zeros((n, 1, page_size), dtype=torch.bool, device=device)
    hidden[0, :, :start] = True
    hidden[n - 1, :, valid_last:] = True
    return hidden


def _check(q: torch.Tensor, k_pool: torch.Tensor, slots: torch.Tensor, valid_last: int, start: int) -> int:
    n = slots.numel()
    page_size = k_pool.shape[2]
    if n < 1:
        raise ValueError("paged decode needs at least one page")
    if not 1 <= valid_last <= page_size:
        raise ValueError(f"valid_last must be in 1..{page_size}, got {valid_last}")
    if not 0 <= start < (valid_last if n == 1 else page_size):
        raise ValueError(f"start {start} leaves no token of the first page visible")
    if q.dim() != 3 or q.shape[0] != k_pool.shape[1] or q.shape[2] != k_pool.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} does not match the pool {tuple(k_pool.shape)}")
    return n


def paged_decode_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                           valid_last: int, scaling: float, softcap: float | None = None,
                           start: int = 0) -> am.Partial:
    """Torch reference: gathers the pages and attends with `attention_math.pages_partial`."""
    n = _check(q, k_pool, slots, valid_last, start)
    idx = slots.to(k_pool.device, torch.long)
    k = k_pool.index_select(0, idx)  # [n, H, P, D]
    v = v_pool.index_select(0, idx)
    hidden = _hidden(n, k_pool.shape[2], valid_last, start, k_pool.device)
    return am.pages_partial(q, k, v, scaling, softcap, hidden)


def _default_pages_per_split(n: int, kv_heads: int) -> int:
    # Enough programs to occupy a large GPU (~128 SMs) without splitting finer than one page each.
    splits = min(n, max(1, 128 // kv_heads))
    return -(-n // splits)


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                 valid_last: int, scaling: float, softcap: float | None = None, start: int = 0,
                 pages_per_split: int | None = None) -> am.Partial:
    """Triton paged decode: grid (H_kv, splits), each split an online softmax over its pages read in place from
    the pool, then one merge launch over the splits. `n` is `slots.numel()` and `valid_last` a Python int, so
    nothing is read back from the device. Pools may be float32, bfloat16 or float16 (scores and sums in float32);
    D and P powers of two (D in 16..256)."""
    try:
        tk = importlib.import_module("offload.kernels._triton_paged_decode")
    except ImportError as e:  # triton itself missing, or broken
        raise RuntimeError(f"paged_decode needs triton (pip install 'offload[gpu]'): {e}") from e
    n = _check(q, k_pool, slots, valid_last, start)
    h, g, d = q.shape
    page_size = k_pool.shape[2]
    if d & (d - 1) or not 16 <= d <= 256:
        raise ValueError(f"head_dim must be a power of two in 16..256, got {d}")
    if page_size & (page_size - 1):
        raise ValueError(f"page size must be a power of two, got {page_size}")
    if k_pool.dtype not in (torch.float32, torch.bfloat16, torch.float16) or v_pool.dtype != k_pool.dtype:
        raise ValueError(f"unsupported pool dtypes {k_pool.dtype}, {v_pool.dtype}")
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the pools must be contiguous along D")
    pps = pages_per_split or _default_pages_per_split(n, h)
    return tk.launch(q, k_pool, v_pool, slots.to(k_pool.device, torch.int32), n, valid_last, scaling, softcap,
                     start, pps)
