"""Attention over pages, in pieces merged by log-sum-exp (as flash-decoding merges its splits).

Shapes (batch size 1; G = query heads per KV head; M = G * query tokens):
- queries `q`: [H_kv, M, D], where row g*T + t of KV head h is query head h*G + g at token t;
- a chunk of pages `k`, `v`: [n, H_kv, P, D] (page-major, exactly as the tiers store them);
- a partial result: (o [H_kv, M, D] normalized, lse [H_kv, M]) in float32.

Scores are `q . k * scaling`, soft-capped as `softcap * tanh(scores / softcap)` when a cap is given (Gemma 2),
then hidden where a mask says so (sliding windows), then softmax-ed.

NOTE: attention over a union of key sets is the log-sum-exp-weighted mix of the attention over each set,
so pages can be visited in any order and any grouping, and the result equals dense attention up to rounding.
A query row that sees no key of a piece gets (o = 0, lse = -inf) from it, which weighs nothing in `merge`.
"""

from __future__ import annotations

import torch

Partial = tuple[torch.Tensor, torch.Tensor]


def group_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[1, Hq, T, D] -> [H_kv, G*T, D]."""
    _, hq, t, d = query.shape
    return query[0].reshape(kv_heads, (hq // kv_heads) * t, d)


def ungroup_output(out: torch.Tensor, query_heads: int, tokens: int) -> torch.Tensor:
    """[H_kv, G*T, D] -> [1, T, Hq, D], the layout transformers' attention functions return."""
    d = out.shape[-1]
    return out.reshape(query_heads, tokens, d).transpose(0, 1).unsqueeze(0)


def _cap(s: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    if scaling != 1.0:
        s.mul_(scaling)
    if softcap is not None:
        s.div_(softcap).tanh_().mul_(softcap)
    return s


def _softmax_parts(s: torch.Tensor, v_dims: tuple[int, ...], masked: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """Unnormalized softmax over the reduced (non-negative) dims `v_dims` of scores `s`: (p, max, sum)."""
    m = s.amax(dim=v_dims)
    if masked:
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows that see nothing: exp(-inf - 0) = 0
    shape = list(m.shape)
    for d in sorted(v_dims):
        shape.insert(d, 1)
    p = torch.exp(s - m.view(shape))
    return p, m, p.sum(dim=v_dims)


def _finish(o: torch.Tensor, m: torch.Tensor, l: torch.Tensor, masked: bool) -> Partial:
    if masked:
        return o / l.clamp_min(torch.finfo(l.dtype).tiny)[..., None], m + torch.log(l)
    return o / l[..., None], m + torch.log(l)


def pages_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, softcap: float | None = None,
                  hidden: torch.Tensor | None = None) -> Partial:
    """Attention of every query over the tokens of the pages in `k`, `v` ([n, H, P, D]).

    `hidden`: bool [n, T, P] (T query tokens; True hides the key from that token), or a mask broadcastable to the
    scores [n, H, M, P] (per head and query row: sparse selection's own blocks), or None to see every key."""
    qf = q.float().unsqueeze(0)  # [1, H, M, D]; no copy when the caller passes float32
    s = _cap(torch.matmul(qf, k.float().transpose(-1, -2)), scaling, softcap)  # [n, H, M, P]
    if hidden is not None and hidden.dim() == 4:
        s = s.masked_fill(hidden, float("-inf"))
    elif hidden is not None:
        n, h, m_rows, p = s.shape
        t = hidden.shape[1]
        s = s.view(n, h, m_rows // t, t, p).masked_fill(hidden[:, None, None], float("-inf")).view(n, h, m_rows, p)
    p_, m, l = _softmax_parts(s, (0, 3), hidden is not None)
    o = torch.matmul(p_, v.float()).sum(0)  # [H, M, D]
    return _finish(o, m, l, hidden is not None)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor, scaling: float,
                      softcap: float | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence of a batch over its own pages, in one pass for the whole batch: queries `q` [B, H, M, D];
    pages `k`, `v` [N, H, P, D], page i of sequence `seq[i]` (int64 [N]); `hidden` bool [N, P] (True hides the
    key), [N, H, P] (per head: sparse selection's own blocks) or None. Every sequence must see at least one key.
    -> the normalized output [B, H, M, D], float32.

    Scores and values are products over single pages (batched over N and H); the softmax of a sequence runs over
    its pages alone, with its maximum and sum reduced per sequence (a scatter over `seq`), as a flash-decoding
    merge reduces its splits. The op count does not depend on B or on the lengths."""
    o, top, total = _segments(q, k, v, seq, scaling, softcap, hidden)
    return o.div_(total.unsqueeze(-1))


def segment_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor, scaling: float,
                    softcap: float | None = None, hidden: torch.Tensor | None = None) -> Partial:
    """`segment_attention` as a partial per sequence, to merge with others over the same sequences: (o [B, H, M,
    D], lse [B, H, M]). A sequence with no page here gets (0, -inf)."""
    o, top, total = _segments(q, k, v, seq, scaling, softcap, hidden, empty=True)
    return o.div_(total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(-1)), top.add_(total.log())


def _segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor, scaling: float,
              softcap: float | None, hidden: torch.Tensor | None,
              empty: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-sequence sums of `segment_attention`: (unnormalized o [B, H, M, D], maximum [B, H, M], sum of the
    exponentials [B, H, M]). `empty`: a sequence's query row may see no key of its pages here (its sums are 0)."""
    (n, h, page, d), m_rows = k.shape, q.shape[2]
    qs = q.float().index_select(0, seq).view(n * h, m_rows, d)
    s = _cap(torch.bmm(qs, k.float().view(n * h, page, d).transpose(1, 2)), scaling, softcap).view(n, h, m_rows, page)
    if hidden is not None:
        s.masked_fill_(hidden[:, None, None] if hidden.dim() == 2 else hidden[:, :, None], float("-inf"))
    m = s.amax(-1)  # a page it sees nothing of: -inf, which the sequence's maximum overrides
    top = m.new_full((q.shape[0], *m.shape[1:]), float("-inf"))
    top.scatter_reduce_(0, seq.view(-1, 1, 1).expand_as(m), m, "amax")
    if empty:  # a row that sees nothing: exp(-inf - (-inf)) would be NaN
        top.clamp_(min=torch.finfo(top.dtype).min)
    p = torch.exp(s.sub_(top.index_select(0, seq).unsqueeze(-1)))
    total = m.new_zeros(top.shape).index_add_(0, seq, p.sum(-1))
    o = torch.bmm(p.view(n * h, m_rows, page), v.float().view(n * h, page, d)).view(n, h, m_rows, d)
    return m.new_zeros((*top.shape, d)).index_add_(0, seq, o), top, total


def window_hidden(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None, causal: bool) -> torch.Tensor:
    """Bool [T, *key_pos.shape]: True where query token t (at absolute position query_pos[t]) must not see the key
    at position key_pos[...]. transformers' masks: causal (key <= query) and, with a window W, key > query - W."""
    q = query_pos.view(-1, *([1] * key_pos.dim()))
    hide = torch.zeros((), dtype=torch.bool, device=key_pos.device)
    if causal:
        hide = hide | (key_pos[None] > q)
    if window is not None:
        hide = hide | (key_pos[None] <= q - window)
    return hide.expand(query_pos.numel(), *key_pos.shape)


def dense_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, causal_tokens: int | None = None,
    window: int | None = None, softcap: float | None = None
) -> Partial:
    """Attention over contiguous keys `k`, `v` ([H, S, D]).

    With `causal_tokens = T`, the queries are the last T of the S key tokens (rows g*T + t; query t is key S-T+t),
    and query t sees keys up to itself (and, with a `window` W, only the last W of them, itself included).
    """
    s = _cap(torch.matmul(q.float(), k.float().transpose(-1, -2)), scaling, softcap)  # [H, M, S]
    if causal_tokens is not None:
        t, n_keys = causal_tokens, k.shape[-2]
        hidden = window_hidden(torch.arange(n_keys - t, n_keys, device=q.device),
                               torch.arange(n_keys, device=q.device), window, causal=True)  # [T, S]
        s = s.view(s.shape[0], -1, t, n_keys).masked_fill(hidden, float("-inf")).view_as(s)
    p, m, l = _softmax_parts(s, (2,), False)  # causal: every query sees at least itself
    o = torch.matmul(p, v.float())
    return _finish(o, m, l, False)


def merge(parts: list[Partial]) -> torch.Tensor:
    """Combines partials over disjoint key sets into the normalized output [H, M, D] (float32)."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([p[1] for p in parts])  # [k, H, M]
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total[None])
    out = torch.zeros_like(parts[0][0])
    for w, (o, _) in zip(weights, parts):
        out += w[..., None] * o
    return out
