"""Paged decode attention: one query token over pages read in place from the device pool.

Shapes (G = query heads per KV head, one token; same conventions as `offload.attention_math`):
- `q`: [H_kv, G, D]; row g of KV head h is query head h*G + g;
- pools `k_pool`, `v_pool`: [S, H_kv, P, D] (page-major, as the device tier stores them);
- `slots`: int32 [n], the pool slots of the pages in position order; the last page holds `valid_last` tokens
  (1..P) and the first page's tokens before `start` are hidden (a sliding window's start);
- result: (o [H_kv, G, D] normalized, lse [H_kv, G]) in float32, a partial that `attention_math.merge` mixes
  with partials over other keys.

`paged_decode_static` is the same kernel with static shapes, for CUDA graphs: `slots` has a fixed capacity N (padded)
and `meta` = int32 (n, valid_last, start) is a device tensor the kernel reads, so one captured launch replays for
any page count n <= N after `slots`, `meta` and `q` are updated in place. Its buffers come from a `DecodeWorkspace`
(`paged_decode_workspace`), allocated once. Outside a graph, `meta` may be a tuple of Python ints, which reach the
kernel as arguments: no tensor is written from the host, which on a GPU would be a copy the host waits for.

The pools may also be a block workspace from `offload.kernels.gather.gather_blocks`: [W, Ho, B, D] read as W pages of
B tokens over Ho heads, with slots = arange(W) and q [Ho, G, D] (G = 1 when each query head has its own blocks).
`meta` is shared by the heads: every head's first n rows are attended, `valid_last` cuts row n-1 and `start` row 0
of each head alike.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

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


class DecodeWorkspace(NamedTuple):
    """float32 buffers of `paged_decode_static`: the result o [H, G, D], lse [H, G], and the per-split partials
    po [splits, H, G, D], plse [splits, H, G] (views of o and lse when splits == 1). Each call overwrites them and
    returns (o, lse) themselves."""

    o: torch.Tensor
    lse: torch.Tensor
    po: torch.Tensor
    plse: torch.Tensor

    @property
    def splits(self) -> int:
        return self.po.shape[0]


def static_splits(capacity: int, kv_heads: int) -> int:
    """The default split count of `paged_decode_static` over `capacity` page slots: a function of the capacity
    only, so the grid is the same whatever the page count."""
    return -(-capacity // _default_pages_per_split(capacity, kv_heads))


def paged_decode_workspace(q: torch.Tensor, capacity: int, splits: int | None = None) -> DecodeWorkspace:
    """Allocates the buffers of `paged_decode_static` for queries shaped like `q` over `capacity` page slots
    (`splits` defaults to `static_splits(capacity, H_kv)`)."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    splits = static_splits(capacity, q.shape[0]) if splits is None else splits
    if not 1 <= splits <= capacity:
        raise ValueError(f"splits must be in 1..{capacity} (the capacity), got {splits}")
    o = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    if splits == 1:
        return DecodeWorkspace(o, lse, o.unsqueeze(0), lse.unsqueeze(0))
    return DecodeWorkspace(o, lse, o.new_empty((splits, *q.shape)), lse.new_empty((splits, *q.shape[:2])))


def _kernels():
    try:
        return importlib.import_module("offload.kernels._triton_paged_decode")
    except ImportError as e:  # triton itself missing, or broken
        raise RuntimeError(f"paged_decode needs triton (pip install 'offload[gpu]'): {e}") from e


def _check_kernel_args(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    if q.dim() != 3 or k_pool.dim() != 4 or q.shape[0] != k_pool.shape[1] or q.shape[2] != k_pool.shape[3] \
            or v_pool.shape != k_pool.shape:
        raise ValueError(f"q {tuple(q.shape)} does not match the pools {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    d, page_size = q.shape[2], k_pool.shape[2]
    if d & (d - 1) or not 16 <= d <= 256:
        raise ValueError(f"head_dim must be a power of two in 16..256, got {d}")
    if page_size & (page_size - 1):
        raise ValueError(f"page size must be a power of two, got {page_size}")
    if k_pool.dtype not in (torch.float32, torch.bfloat16, torch.float16) or v_pool.dtype != k_pool.dtype:
        raise ValueError(f"unsupported pool dtypes {k_pool.dtype}, {v_pool.dtype}")
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the pools must be contiguous along D")


def _check_int32(name: str, t: torch.Tensor, shape: tuple[int, ...] | None, device: torch.device) -> None:
    if t.dtype != torch.int32 or t.device != device or t.dim() != 1 or (shape is not None and t.shape != shape) \
            or not t.is_contiguous():
        want = f"shape {shape}" if shape else "1-D"
        raise ValueError(f"{name} must be a contiguous int32 {want} tensor on {device}, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}")


def _check_workspace(out: DecodeWorkspace, q: torch.Tensor, capacity: int) -> None:
    shapes = (q.shape, q.shape[:2], (out.splits, *q.shape), (out.splits, *q.shape[:2]))
    for name, t, shape in zip(DecodeWorkspace._fields, out, shapes):
        if t.shape != shape or t.dtype != torch.float32 or t.device != q.device or not t.is_contiguous():
            raise ValueError(f"out.{name} must be a contiguous float32 tensor {tuple(shape)} on {q.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if not 1 <= out.splits <= capacity:
        raise ValueError(f"out has {out.splits} splits, not in 1..{capacity} (the capacity of slots)")


def paged_decode_static(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                        meta: torch.Tensor | tuple[int, int, int], scaling: float, softcap: float | None = None,
                        splits: int | None = None,
                        out: DecodeWorkspace | None = None) -> am.Partial:
    """Paged decode with static shapes, capturable in a CUDA graph.

    - `slots`: int32 [N] on the pools' device, a fixed capacity of page slots; entries from n on are never read;
    - `meta`: int32 [3] on the same device, (n, valid_last, start) as in `paged_decode`, read by the kernel on the
      device (never on the host, so nothing is checked there: n is clamped to N, n = 0 gives o = 0 and lse = -inf,
      other out-of-range values give unspecified results); or, outside a graph, the three as Python ints, passed
      to the kernel as arguments (unchecked alike);
    - the grid is (H_kv, splits), `splits` a function of N only (default `static_splits(N, H_kv)`); splits past
      the n pages write an empty partial that weighs nothing in the merge;
    - `out`: a `DecodeWorkspace` from `paged_decode_workspace(q, N, splits)`, reused from call to call so that
      nothing is allocated (its split count wins over `splits`, which must then agree); allocated here if None.

    Returns (o [H_kv, G, D], lse [H_kv, G]) in float32 -- `out.o` and `out.lse` themselves, overwritten by the next
    call on the same workspace -- equal to `paged_decode_reference` over slots[:n]."""
    tk = _kernels()
    _check_kernel_args(q, k_pool, v_pool)
    _check_int32("slots", slots, None, k_pool.device)
    if isinstance(meta, torch.Tensor):
        _check_int32("meta", meta, (3,), k_pool.device)
    capacity = slots.numel()
    if capacity < 1:
        raise ValueError("slots must hold at least one page slot (capacity N >= 1)")
    if q.device != k_pool.device:
        raise ValueError(f"q is on {q.device}, the pools on {k_pool.device}")
    if out is None:
        out = paged_decode_workspace(q, capacity, splits)
    elif splits is not None and splits != out.splits:
        raise ValueError(f"splits {splits} does not match the workspace's {out.splits}")
    _check_workspace(out, q, capacity)
    tk.launch(q, k_pool, v_pool, slots, meta, scaling, softcap, -(-capacity // out.splits), *out)
    return out.o, out.lse


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                 valid_last: int, scaling: float, softcap: float | None = None, start: int = 0,
                 pages_per_split: int | None = None,
                 workspaces: dict[tuple, DecodeWorkspace] | None = None) -> am.Partial:
    """Triton paged decode: grid (H_kv, splits), each split an online softmax over at most `pages_per_split` of
    the pages read in place from the pool, then one merge launch over the splits. `n` is `slots.numel()` and
    `valid_last` a Python int, so nothing is read back from the device (they reach the kernel as arguments,
    through `paged_decode_static`, so nothing is written to the device either). Pools may be float32, bfloat16 or
    float16 (scores and sums in float32); D and P powers of two (D in 16..256). `workspaces`, a dict kept by the
    caller, holds the float32 buffers from call to call (by split count and query shape), so that a call allocates
    nothing; the result is then overwritten by the next call that uses the same buffers."""
    _kernels()
    n = _check(q, k_pool, slots, valid_last, start)
    pps = pages_per_split or _default_pages_per_split(n, q.shape[0])
    splits = -(-n // pps)
    out = None
    if workspaces is not None:
        key = (splits, tuple(q.shape), q.device)
        out = workspaces.get(key)
        if out is None:
            out = workspaces[key] = paged_decode_workspace(q, n, splits)
    slots = slots.to(k_pool.device, torch.int32).contiguous()
    return paged_decode_static(q, k_pool, v_pool, slots, (n, valid_last, start), scaling, softcap, splits=splits,
                               out=out)


class RaggedPages(NamedTuple):
    """The pages of a batch's sequences for `paged_decode_ragged`, one sequence after another (int32 tensors on the
    pools' device): sequence b's unified slots are `slots[begin[b]:begin[b] + count[b]]` (a slot s < split is
    device pool slot s, else host pool slot s - split), and token t of its page i is at `rel = i*P + t + shift[b]`
    relative to the sequence's end. At a step `ahead`, it is seen where `rel < ahead` and `rel - ahead >= low[b]`
    (a sliding window of W: low = -W). `most` is the largest count, a Python int that sizes the launch grid. With
    `block` (`paged_decode_ragged`), the slots are [N, H]: each head's own blocks, numbered in the pools seen as
    [blocks, block, D]."""

    slots: torch.Tensor
    begin: torch.Tensor
    count: torch.Tensor
    shift: torch.Tensor
    low: torch.Tensor
    most: int


# `low` where every token before `ahead` is seen: far below any rel.
EVERY = -(1 << 30)


def ragged_pages(slots: list[torch.Tensor], firsts: list[int], tokens: list[int], page_size: int,
                 window: int | None = None) -> RaggedPages:
    """`RaggedPages` of sequences whose pages from page `firsts[b]` on have unified `slots[b]` (one tensor each, on
    the pools' device) and that hold `tokens[b]` tokens: a token is then seen at an `ahead` of 0 (within the last
    `window` with a sliding window), and the layout stays valid while every sequence gains `ahead` tokens in its
    last page."""
    device = slots[0].device
    counts = [s.numel() for s in slots]
    begin = [0]
    for c in counts[:-1]:
        begin.append(begin[-1] + c)
    shift = [f * page_size - t for f, t in zip(firsts, tokens)]
    low = [-window if window is not None else EVERY] * len(slots)
    meta = torch.tensor([begin, counts, shift, low], dtype=torch.int32).to(device)
    return RaggedPages(torch.cat(slots).to(torch.int32), *meta.unbind(0), max(counts))


def paged_decode_ragged_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, host_k: torch.Tensor,
                                  host_v: torch.Tensor, split: int, pages: RaggedPages, ahead: int, scaling: float,
                                  softcap: float | None = None) -> am.Partial:
    """Torch reference of `paged_decode_ragged` over pages, sequence by sequence (it reads the layout on the host:
    for tests)."""
    outs, lses = [], []
    page_size = k_pool.shape[2]
    for b in range(q.shape[0]):
        at, n = int(pages.begin[b]), int(pages.count[b])
        slots = pages.slots[at:at + n].tolist()
        k, v = (torch.stack([pool[s] if s < split else hpool[s - split] for s in slots])
                for pool, hpool in ((k_pool, host_k), (v_pool, host_v)))
        rel = torch.arange(n * page_size, device=q.device).view(n, page_size) + int(pages.shift[b]) - ahead
        seen = (rel < 0) & (rel >= int(pages.low[b]))
        o, lse = am.pages_partial(q[b], k, v, scaling, softcap, ~seen[:, None])
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def paged_decode_ragged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, host_k: torch.Tensor,
                        host_v: torch.Tensor, split: int, pages: RaggedPages, ahead: int, scaling: float,
                        softcap: float | None = None, block: int | None = None,
                        pages_per_split: int | None = None,
                        workspaces: dict[tuple, DecodeWorkspace] | None = None) -> am.Partial:
    """Paged decode of a batch of sequences of any lengths in one launch (and one merge launch when the pages are
    split): grid (B * H, splits), each program an online softmax over at most `pages_per_split` pages of one
    sequence, read in place from the device pool `k_pool`, `v_pool` [S, H_kv, P, D] or from the host pool `host_k`,
    `host_v` [S_host, H_kv, P, D] (on CUDA pinned, read through unified virtual addressing) by their unified slots.

    q [B, H, G, D]; `pages` (`ragged_pages`) gives each sequence's slots and which of its tokens are seen at step
    `ahead`, which reaches the kernel as an argument: a step that only adds a token to every sequence's tail page
    writes nothing to the device and reads nothing back. With `block` (a divisor of P) the pages attended are
    blocks of `block` tokens, each head its own: `pages.slots` [N * H] holds unified block ids (u = (slot * H_kv
    + kv head) * P / block + j; `split` then counts the device pool's blocks), and H may be the query heads (G =
    1), as sparse attention's choices per head give them. A sequence seeing no token gets (o = 0, lse = -inf).
    Returns (o [B, H, G, D], lse [B, H, G]) in float32, in buffers of `workspaces` (a dict kept by the caller) that
    the next call with the same shapes overwrites."""
    tk = _kernels()
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, G, D], got shape {tuple(q.shape)}")
    b, h, g, d = q.shape
    flat = q.reshape(b * h, g, d)
    _check_kernel_args(flat[:k_pool.shape[1]], k_pool, v_pool)  # (B * H >= H_kv rows: the query heads or the KV's)
    if host_k.shape[1:] != k_pool.shape[1:] or host_v.shape != host_k.shape or host_k.dtype != k_pool.dtype \
            or host_v.dtype != k_pool.dtype or not (host_k.is_contiguous() and host_v.is_contiguous()
                                                    and k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError(f"the host pools {tuple(host_k.shape)} must be contiguous pages of the device pool's shape "
                         f"{tuple(k_pool.shape[1:])} and dtype, as the device pools must be contiguous")
    if block is None and h != k_pool.shape[1]:
        raise ValueError(f"q has {h} heads; over pages it must have the pools' {k_pool.shape[1]}")
    if block is not None and (block < 1 or k_pool.shape[2] % block or block & (block - 1)):
        raise ValueError(f"block must be a power of two dividing the page size {k_pool.shape[2]}, got {block}")
    for name in ("slots", "begin", "count", "shift", "low"):
        _check_int32(name, getattr(pages, name), None if name == "slots" else (b,), k_pool.device)
    if pages.most < 1:
        raise ValueError(f"pages.most must be >= 1 (the largest page count), got {pages.most}")
    if pages_per_split is None:
        # Triton's CPU interpreter runs the programs one after another: splitting there only adds programs.
        pages_per_split = _default_pages_per_split(pages.most, b * h) if q.is_cuda else pages.most
    splits = -(-pages.most // pages_per_split)
    key = ("ragged", splits, tuple(flat.shape), q.device)
    out = workspaces.get(key) if workspaces is not None else None
    if out is None:
        out = paged_decode_workspace(flat, pages.most, splits)
        if workspaces is not None:
            workspaces[key] = out
    tk.launch_ragged(flat, k_pool, v_pool, host_k, host_v, split, pages, ahead, block, scaling, softcap,
                     pages_per_split, *out)
    return out.o.view(b, h, g, d), out.lse.view(b, h, g)
