"""Attention over pages, in pieces merged by log-sum-exp (as flash-decoding merges its splits).

Shapes (batch size 1; G = query heads per KV head; M = G * query tokens):
- queries `q`: [H_kv, M, D], where row g*T + t of KV head h is query head h*G + g at token t;
- a chunk of pages `k`, `v`: [n, H_kv, P, D] (page-major, exactly as the tiers store them);
- a partial result: (o [H_kv, M, D] normalized, lse [H_kv, M]) in float32.

NOTE: attention over a union of key sets is the log-sum-exp-weighted mix of the attention over each set,
so pages can be visited in any order and any grouping, and the result equals dense attention up to rounding.
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


def pages_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> Partial:
    """Attention of every query over every token of the pages in `k`, `v` ([n, H, P, D])."""
    qf = q.float().unsqueeze(0)  # [1, H, M, D]; no copy when the caller passes float32
    s = torch.matmul(qf, k.float().transpose(-1, -2))  # [n, H, M, P]
    if scaling != 1.0:
        s.mul_(scaling)
    m = s.amax(dim=(0, 3))  # [H, M]
    p = torch.exp(s - m[None, :, :, None])
    l = p.sum(dim=(0, 3))
    o = torch.matmul(p, v.float()).sum(0)  # [H, M, D]
    return o / l[..., None], m + torch.log(l)


def dense_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, causal_tokens: int | None = None
) -> Partial:
    """Attention over contiguous keys `k`, `v` ([H, S, D]).

    With `causal_tokens = T`, the queries are T consecutive tokens (rows g*T + t) whose keys are the same T tokens,
    and query t sees keys 0..t.
    """
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # [H, M, S]
    if causal_tokens is not None:
        t = causal_tokens
        pos = torch.arange(t, device=q.device)
        hidden = pos[None, :] > pos[:, None]  # [T(query), T(key)]
        s = s.view(s.shape[0], -1, t, t).masked_fill(hidden, float("-inf")).view_as(s)
    m = s.amax(dim=-1)
    p = torch.exp(s - m[..., None])
    l = p.sum(dim=-1)
    o = torch.matmul(p, v.float())
    return o / l[..., None], m + torch.log(l)


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
