"""The Triton paged decode kernel against the torch reference and dense attention (TRITON_INTERPRET=1 on the CPU,
set in conftest.py), over pools of pages and over block workspaces from `gather_blocks`."""

from __future__ import annotations

import math

import pytest
import torch

from offload import attention_math as am
from offload.kernels import paged_decode, paged_decode_ragged, paged_decode_reference
from offload.kernels.gather import gather_blocks
from offload.kernels.paged_decode import (paged_decode_ragged_reference, paged_decode_static, paged_decode_workspace,
                                          ragged_pages, static_splits)

pytest.importorskip("triton")
pytestmark = pytest.mark.kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}  # on o (values ~1) and lse


def _case(kv_heads: int, g: int, d: int, p: int, n: int, dtype: torch.dtype, seed: int = 0):
    """Random q [H, G, D] and pools [S, H, P, D] with `n` scattered, non-consecutive slots in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    slots_total = 2 * n + 3
    q = torch.randn(kv_heads, g, d, generator=gen)
    k_pool = torch.randn(slots_total, kv_heads, p, d, generator=gen).to(dtype)
    v_pool = torch.randn(slots_total, kv_heads, p, d, generator=gen).to(dtype)
    slots = (torch.randperm(slots_total, generator=gen)[:n]).to(torch.int32)
    return q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE), slots.to(DEVICE)


def _dense(q, k_pool, v_pool, slots, valid_last, scaling, softcap, start):
    """Plain attention over the gathered tokens start..(n-1)*P+valid_last-1, through `attention_math.dense_partial`
    (no paging, no masks)."""
    idx = slots.long()
    n, p = idx.numel(), k_pool.shape[2]
    tokens = (n - 1) * p + valid_last

    def flat(pool):  # [n, H, P, D] -> [H, n*P, D]
        return pool[idx].permute(1, 0, 2, 3).reshape(pool.shape[1], n * p, -1)[:, start:tokens]

    return am.dense_partial(q, flat(k_pool), flat(v_pool), scaling, softcap=softcap)


def _close(a: am.Partial, b: am.Partial, tol: float) -> None:
    torch.testing.assert_close(a[0].float().cpu(), b[0].float().cpu(), atol=tol, rtol=tol)
    torch.testing.assert_close(a[1].float().cpu(), b[1].float().cpu(), atol=tol, rtol=tol)


# (kv_heads, G, D, P, n, valid_last, start, softcap, pages_per_split, dtype)
CASES = [
    (2, 1, 16, 4, 1, 4, 0, None, 1, torch.float32),      # one full page
    (2, 2, 16, 4, 1, 1, 0, None, 1, torch.float32),      # one page holding one token
    (1, 3, 32, 8, 5, 3, 2, None, 2, torch.float32),      # G=3 padded to 4, window start, 3 splits
    (2, 2, 16, 4, 7, 4, 0, 30.0, 3, torch.float32),      # soft-capping, 3 splits
    (2, 3, 16, 8, 6, 1, 5, 20.0, 1, torch.float32),      # one page per split, everything at once
    (2, 2, 32, 4, 5, 2, 3, None, 2, torch.bfloat16),
    (1, 1, 16, 16, 3, 16, 7, 10.0, 2, torch.bfloat16),
    (2, 2, 16, 4, 4, 3, 1, None, 2, torch.float16),
    (2, 3, 16, 16, 4, 9, 4, 25.0, 2, torch.float32),     # pages of 16: the tl.dot path, G=3 padded to 16
    (1, 2, 32, 32, 2, 32, 0, None, 1, torch.float16),
]


@pytest.mark.parametrize("kv_heads,g,d,p,n,valid_last,start,softcap,pps,dtype", CASES)
def test_matches_reference_and_dense(kv_heads, g, d, p, n, valid_last, start, softcap, pps, dtype):
    q, k_pool, v_pool, slots = _case(kv_heads, g, d, p, n, dtype)
    scaling = 1 / math.sqrt(d)
    got = paged_decode(q, k_pool, v_pool, slots, valid_last, scaling, softcap, start, pages_per_split=pps)
    assert got[0].shape == (kv_heads, g, d) and got[1].shape == (kv_heads, g)
    assert got[0].dtype == got[1].dtype == torch.float32
    ref = paged_decode_reference(q, k_pool, v_pool, slots, valid_last, scaling, softcap, start)
    _close(got, ref, TOL[dtype])
    _close(got, _dense(q, k_pool, v_pool, slots, valid_last, scaling, softcap, start), TOL[dtype])


def test_split_count_does_not_change_the_result():
    q, k_pool, v_pool, slots = _case(2, 2, 16, 4, 6, torch.float32, seed=1)
    outs = [paged_decode(q, k_pool, v_pool, slots, 2, 0.25, None, 1, pages_per_split=s) for s in (1, 4, 6)]
    for o in outs[1:]:
        _close(o, outs[0], 1e-5)


def test_default_split_matches_sdpa():
    """Default split choice, against framework SDPA over the gathered tokens (GQA expanded)."""
    kv_heads, g, d, p, n, valid_last = 2, 2, 16, 4, 5, 3
    q, k_pool, v_pool, slots = _case(kv_heads, g, d, p, n, torch.float32, seed=2)
    o, _ = paged_decode(q, k_pool, v_pool, slots, valid_last, 1 / math.sqrt(d))
    idx = slots.long()
    tokens = (n - 1) * p + valid_last
    k = k_pool[idx].permute(1, 0, 2, 3).reshape(kv_heads, n * p, d)[:, :tokens]
    v = v_pool[idx].permute(1, 0, 2, 3).reshape(kv_heads, n * p, d)[:, :tokens]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [H, G, D]: each G row one query
    torch.testing.assert_close(o.cpu(), want.cpu(), atol=2e-5, rtol=2e-5)


def test_merges_with_another_partial():
    """A kernel partial over some pages, merged with a torch partial over the rest, equals dense attention over
    all of them."""
    kv_heads, g, d, p = 2, 3, 16, 4
    q, k_pool, v_pool, slots = _case(kv_heads, g, d, p, 5, torch.float32, seed=3)
    scaling = 1 / math.sqrt(d)
    # Pages 0..2 on the kernel (full), pages 3..4 (the tail holding 2 tokens) through the torch reference.
    head = paged_decode(q, k_pool, v_pool, slots[:3], p, scaling, pages_per_split=2)
    tail = paged_decode_reference(q, k_pool, v_pool, slots[3:], 2, scaling)
    merged = am.merge([head, tail])
    want, _ = _dense(q, k_pool, v_pool, slots, 2, scaling, None, 0)
    torch.testing.assert_close(merged.cpu(), want.cpu(), atol=2e-5, rtol=2e-5)


# (kv_heads, G, D, P, dtype, softcap, window, pages_per_split)
RAGGED = [
    (2, 2, 16, 4, torch.float32, None, None, None),  # one split a sequence (B*H programs fill the grid)
    (1, 3, 16, 4, torch.float32, 20.0, 6, 2),         # soft-cap, a window starting inside the first page, splits
    (2, 2, 32, 16, torch.bfloat16, None, 21, 1),      # pages of 16: the tl.dot path, one page a split
]


@pytest.mark.parametrize("kv_heads,g,d,p,dtype,softcap,window,pps", RAGGED)
def test_ragged_batch_matches_each_sequence_alone(kv_heads, g, d, p, dtype, softcap, window, pps):
    """A batch of sequences of different lengths, each over its own pages, some in the device pool and some read in
    place from the host pool, in one launch: each sequence's result is the reference's over its own pages, as the
    layout stays valid while every sequence gains tokens in its tail page (`ahead`) and a window moves on."""
    gen = torch.Generator().manual_seed(7)
    split, host_slots = 9, 8
    k_pool, v_pool = (torch.randn(split + 2, kv_heads, p, d, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    host_k, host_v = (torch.randn(host_slots, kv_heads, p, d, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    # Unified slots (>= split: host), first held page and tokens of each sequence; the tails have room to grow.
    seqs = [([3, 12, 0], 0, 2 * p + 1), ([10], 0, 1), ([5, 15, 1, 9, 14], 1, 6 * p - 3), ([2, 7], 0, p + 2)]
    q = torch.randn(len(seqs), kv_heads, g, d, generator=gen).to(DEVICE)
    pages = ragged_pages([torch.tensor(s, dtype=torch.int32, device=DEVICE) for s, _, _ in seqs],
                         [f for _, f, _ in seqs], [t for _, _, t in seqs], p, window)
    assert pages.most == 5
    scaling = 1 / math.sqrt(d)
    for ahead in (0, 1, 2):
        got = paged_decode_ragged(q, k_pool, v_pool, host_k, host_v, split, pages, ahead, scaling, softcap,
                                  pages_per_split=pps)
        assert got[0].shape == (len(seqs), kv_heads, g, d) and got[1].shape == (len(seqs), kv_heads, g)
        want = paged_decode_ragged_reference(q, k_pool, v_pool, host_k, host_v, split, pages, ahead, scaling,
                                             softcap)
        _close(got, want, TOL[dtype])
        # ... and the reference is plain attention over each sequence's visible tokens.
        for b, (slots, first, tokens) in enumerate(seqs):
            end = tokens + ahead
            lo = max(first * p, end - window) if window else first * p
            pool_k = torch.cat([k_pool[:split], host_k])  # unified slots index this directly
            pool_v = torch.cat([v_pool[:split], host_v])
            flat = lambda pool: pool[torch.tensor(slots)].permute(1, 0, 2, 3).reshape(kv_heads, -1, d)  # noqa: E731
            keys = slice(lo - first * p, end - first * p)
            dense = am.dense_partial(q[b].float(), flat(pool_k)[:, keys].float(), flat(pool_v)[:, keys].float(),
                                     scaling, softcap=softcap)
            _close((got[0][b], got[1][b]), dense, TOL[dtype])


@pytest.mark.parametrize("heads,g,softcap", [(2, 2, None), (4, 1, 30.0)], ids=["kv-heads", "query-heads"])
def test_ragged_batch_over_each_heads_own_blocks(heads, g, softcap):
    """Block mode (a batch's sparse step): each head of each sequence attends its own blocks of a page, named by
    unified block ids over both pools, the last block cut at the sequence's tail and the first from its `low`."""
    from offload.kernels.paged_decode import RaggedPages

    gen = torch.Generator().manual_seed(9)
    kv_heads, d, p, block, split, host_slots = 2, 16, 8, 4, 5, 4
    k_pool, v_pool = (torch.randn(split + 1, kv_heads, p, d, generator=gen).to(DEVICE) for _ in range(2))
    host_k, host_v = (torch.randn(host_slots, kv_heads, p, d, generator=gen).to(DEVICE) for _ in range(2))
    blocks = split * kv_heads * p // block  # unified block ids from here on are the host pool's
    total = blocks + host_slots * kv_heads * p // block
    counts, valid, cut = [3, 1, 4], [4, 2, 3], [1, 0, 2]  # blocks, tokens of the last one, cut of the first one
    ids = torch.randint(0, total, (sum(counts), heads), generator=gen)
    begin = [0, 3, 4]
    shift = [-(c - 1) * block - v for c, v in zip(counts, valid)]
    meta = torch.tensor([begin, counts, shift, [c + s for c, s in zip(cut, shift)]], dtype=torch.int32).to(DEVICE)
    pages = RaggedPages(ids.view(-1).to(torch.int32).to(DEVICE), *meta.unbind(0), max(counts))
    q = torch.randn(len(counts), heads, g, d, generator=gen).to(DEVICE)
    o, lse = paged_decode_ragged(q, k_pool, v_pool, host_k, host_v, blocks, pages, 0, 0.25, softcap, block=block)
    flat_k = torch.cat([k_pool[:split], host_k]).reshape(-1, block, d)  # unified block ids index this
    flat_v = torch.cat([v_pool[:split], host_v]).reshape(-1, block, d)
    for b, (at, n) in enumerate(zip(begin, counts)):
        for h in range(heads):
            u = ids[at:at + n, h].to(DEVICE)
            keys = flat_k[u].reshape(-1, d)[cut[b]:(n - 1) * block + valid[b]]
            values = flat_v[u].reshape(-1, d)[cut[b]:(n - 1) * block + valid[b]]
            want = am.dense_partial(q[b, h:h + 1], keys[None], values[None], 0.25, softcap=softcap)
            _close((o[b, h:h + 1], lse[b, h:h + 1]), want, 2e-5)


def test_rows_a_step_does_not_see_weigh_nothing_whatever_they_hold():
    """Bug: a tail page's unfilled rows were never written, and a pool made with torch.empty may hold NaN there;
    hidden, their scores were -inf but their values still entered p @ v as 0 * NaN, and the sequence's output was
    NaN (the kernels' sparse batch gave token 0). Rows not seen now weigh nothing whatever they hold."""
    gen = torch.Generator().manual_seed(5)
    k_pool, v_pool = (torch.randn(4, 1, 4, 16, generator=gen).to(DEVICE) for _ in range(2))
    empty = k_pool[:0]
    q = torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE)
    pages = ragged_pages([torch.tensor([1, 2], dtype=torch.int32, device=DEVICE),
                          torch.tensor([3], dtype=torch.int32, device=DEVICE)], [0, 0], [6, 3], 4)
    clean = [t.clone() for t in paged_decode_ragged(q, k_pool, v_pool, empty, empty, 4, pages, 0, 0.25)]
    for pool, value in ((k_pool, float("nan")), (v_pool, float("nan"))):
        pool[2, :, 2:] = value  # the tails' unfilled rows
        pool[3, :, 3:] = value
    v_pool[0] = float("inf")  # a page no sequence reads
    got = paged_decode_ragged(q, k_pool, v_pool, empty, empty, 4, pages, 0, 0.25)
    assert bool(torch.isfinite(got[0]).all())
    _close(got, clean, 1e-6)


def test_ragged_batch_sequence_seeing_nothing_is_an_empty_partial():
    """A sequence whose tokens are all hidden (its window has not reached them) weighs nothing, and the others are
    unaffected."""
    gen = torch.Generator().manual_seed(8)
    k_pool, v_pool = (torch.randn(4, 1, 4, 16, generator=gen).to(DEVICE) for _ in range(2))
    empty = k_pool[:0]
    q = torch.randn(2, 1, 2, 16, generator=gen).to(DEVICE)
    pages = ragged_pages([torch.tensor([1], dtype=torch.int32, device=DEVICE),
                          torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)], [0, 0], [0, 6], 4)
    o, lse = paged_decode_ragged(q, k_pool, v_pool, empty, empty, 4, pages, 0, 0.25)
    assert torch.equal(o[0].cpu(), torch.zeros(1, 2, 16)) and bool(torch.isinf(lse[0]).all())
    _close((o[1], lse[1]), paged_decode_reference(q[1], k_pool, v_pool, pages.slots[1:], 2, 0.25), 2e-5)


def test_rejects_bad_arguments():
    q, k_pool, v_pool, slots = _case(1, 1, 16, 4, 2, torch.float32)
    with pytest.raises(ValueError):
        paged_decode(q, k_pool, v_pool, slots, 0, 1.0)
    with pytest.raises(ValueError):
        paged_decode(q, k_pool, v_pool, slots, 5, 1.0)
    with pytest.raises(ValueError):
        paged_decode_reference(q, k_pool, v_pool, slots[:1], 2, 1.0, start=2)


def test_missing_triton_is_one_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "offload.kernels._triton_paged_decode", None)  # import now fails
    q, k_pool, v_pool, slots = _case(1, 1, 16, 4, 1, torch.float32)
    with pytest.raises(RuntimeError, match="needs triton"):
        paged_decode(q, k_pool, v_pool, slots, 4, 1.0)


# Static shapes (`paged_decode_static`): one slots capacity N and one workspace, several page counts n.

def _set_step(slots, meta, perm, n, valid_last, start):
    """In place, as a graph replay would need: slots = perm[:n] padded with -1; meta = (n, valid_last, start)."""
    slots.fill_(-1)
    slots[:n] = perm[:n]
    meta.copy_(torch.tensor([n, valid_last, start], dtype=torch.int32))


# (kv_heads, G, D, P, N, splits, softcap, dtype, steps [(n, valid_last, start)])
STATIC_CASES = [
    (2, 3, 16, 4, 8, None, None, torch.float32, [(1, 1, 0), (3, 2, 1), (5, 4, 0), (8, 3, 3)]),
    (1, 3, 16, 4, 7, 3, 30.0, torch.float32, [(2, 4, 2), (4, 1, 0), (7, 2, 1)]),        # 3 splits of 3, 3, 1 page
    (2, 2, 32, 8, 5, 1, None, torch.float32, [(1, 8, 7), (5, 5, 0)]),                  # one split: no merge
    (2, 3, 16, 4, 6, 4, 20.0, torch.bfloat16, [(1, 3, 1), (2, 4, 0), (6, 2, 3)]),
    (1, 3, 16, 16, 4, 2, 25.0, torch.bfloat16, [(1, 16, 4), (3, 9, 0), (4, 5, 7)]),    # pages of 16: tl.dot
    (2, 1, 16, 4, 1, None, None, torch.float32, [(1, 3, 1)]),                          # capacity 1
]


@pytest.mark.parametrize("kv_heads,g,d,p,capacity,splits,softcap,dtype,steps", STATIC_CASES)
def test_static_matches_reference_for_each_page_count(kv_heads, g, d, p, capacity, splits, softcap, dtype, steps):
    q, k_pool, v_pool, perm = _case(kv_heads, g, d, p, capacity, dtype)
    scaling = 1 / math.sqrt(d)
    slots = torch.full((capacity,), -1, dtype=torch.int32, device=DEVICE)
    meta = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    ws = paged_decode_workspace(q, capacity, splits)
    for n, valid_last, start in steps:
        _set_step(slots, meta, perm, n, valid_last, start)
        got = paged_decode_static(q, k_pool, v_pool, slots, meta, scaling, softcap, out=ws)
        assert got[0] is ws.o and got[1] is ws.lse  # results land in the workspace
        ref = paged_decode_reference(q, k_pool, v_pool, perm[:n], valid_last, scaling, softcap, start)
        _close(got, ref, TOL[dtype])
        _close(got, _dense(q, k_pool, v_pool, perm[:n], valid_last, scaling, softcap, start), TOL[dtype])


def test_static_capacity_far_above_page_count():
    """N = 40 with the default split count (one page each): the splits past n are empty, and give no NaN."""
    capacity, kv_heads = 40, 2
    q, k_pool, v_pool, perm = _case(kv_heads, 2, 16, 4, capacity, torch.float32, seed=4)
    assert static_splits(capacity, kv_heads) == capacity
    slots = torch.full((capacity,), -1, dtype=torch.int32, device=DEVICE)
    meta = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    for n, valid_last, start in ((1, 2, 0), (3, 4, 1)):
        _set_step(slots, meta, perm, n, valid_last, start)
        got = paged_decode_static(q, k_pool, v_pool, slots, meta, 0.25)  # workspace allocated in the call
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
        _close(got, paged_decode_reference(q, k_pool, v_pool, perm[:n], valid_last, 0.25, None, start), 2e-5)


def test_static_no_pages_is_an_empty_partial():
    """n = 0: every split is empty, and the merge gives (o = 0, lse = -inf), not NaN."""
    q, k_pool, v_pool, _ = _case(1, 2, 16, 4, 6, torch.float32)
    slots = torch.full((6,), -1, dtype=torch.int32, device=DEVICE)
    meta = torch.tensor([0, 4, 0], dtype=torch.int32, device=DEVICE)
    o, lse = paged_decode_static(q, k_pool, v_pool, slots, meta, 0.25, splits=3)
    assert (o == 0).all() and (lse == float("-inf")).all()


def test_paged_decode_static_rejects_bad_arguments():
    q, k_pool, v_pool, slots = _case(1, 1, 16, 4, 4, torch.float32)
    meta = torch.tensor([2, 4, 0], dtype=torch.int32, device=DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    bad = [
        ("meta", dict(meta=torch.tensor([2, 4], **i32))),
        ("meta", dict(meta=meta.long())),
        ("meta", dict(meta=meta.view(1, 3))),
        ("slots", dict(slots=slots.long())),
        ("slots", dict(slots=torch.empty(0, **i32))),
        ("slots", dict(slots=slots.view(2, 2))),
        ("slots", dict(slots=torch.arange(8, **i32)[::2])),
        ("splits", dict(splits=5)),
        ("splits", dict(splits=0)),
        ("splits", dict(splits=2, out=paged_decode_workspace(q, 4, 1))),
        ("out.po", dict(out=paged_decode_workspace(q, 4, 2)._replace(po=torch.empty(2, 1, 1, 8, device=DEVICE)))),
        ("out.o", dict(out=paged_decode_workspace(q, 4, 1)._replace(o=torch.empty(1, 1, 16, dtype=torch.float64)))),
    ]
    for name, change in bad:
        args = dict(q=q, k_pool=k_pool, v_pool=v_pool, slots=slots, meta=meta, scaling=1.0) | change
        with pytest.raises(ValueError, match=name) as e:
            paged_decode_static(**args)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="capacity"):
        paged_decode_workspace(q, 0)


# `paged_decode_static` over a block workspace: each head's own blocks of B tokens, gathered by `gather_blocks` into
# [W, Ho, B, D] and read as a pool of W pages of B tokens (slots = arange(W)), Ho = H with G query rows per head or
# Ho = the query heads with G = 1.

def _block_selection(kv_heads: int, ho: int, r: int, slots_total: int, w: int, seed: int) -> torch.Tensor:
    """int32 [w, ho] unified block ids: column c takes w distinct blocks of KV head c * kv_heads // ho, from any
    slot and any position in the page, in a random order."""
    gen = torch.Generator().manual_seed(seed)
    cols = []
    for c in range(ho):
        head = c * kv_heads // ho
        picks = torch.randperm(slots_total * r, generator=gen)[:w]  # (slot, j) = divmod(pick, r)
        cols.append((picks // r * kv_heads + head) * r + picks % r)
    return torch.stack(cols, dim=1).to(torch.int32)


def _blocks_dense(q, pools, index, b, n, valid_last, scaling, softcap, start):
    """Dense attention of column c of q over its blocks index[:n, c] of the unified pool (device then host slots)
    laid end to end, tokens start..(n-1)*B+valid_last-1: straight from the pools, no gather kernel."""
    d, tokens = q.shape[2], (n - 1) * b + valid_last

    def flat(dev, host):  # [Ho, n*B, D]
        blocks = torch.cat([dev, host]).cpu().reshape(-1, b, d)  # [S*H*R, B, D]
        picked = blocks[index[:n].long().cpu()]  # [n, Ho, B, D]
        return picked.permute(1, 0, 2, 3).reshape(index.shape[1], n * b, d)[:, start:tokens]

    dev_k, dev_v, host_k, host_v = pools
    return am.dense_partial(q.cpu(), flat(dev_k, host_k), flat(dev_v, host_v), scaling, softcap=softcap)


# (H, Ho, G, D, P, B, S_dev, S_host, W, splits, softcap, dtype, steps [(n, valid_last, start)])
BLOCK_WORKSPACE_CASES = [
    (2, 2, 2, 16, 16, 4, 3, 2, 6, None, None, torch.float32, [(6, 4, 0), (3, 2, 1)]),    # Ho = H, G = 2
    (2, 4, 1, 16, 16, 4, 3, 2, 5, 2, 30.0, torch.float32, [(5, 3, 2), (1, 4, 0)]),       # one column per query head
    (2, 2, 3, 16, 32, 8, 2, 2, 4, 2, None, torch.bfloat16, [(4, 8, 3), (2, 5, 0)]),
    (2, 4, 1, 16, 32, 16, 2, 2, 4, None, 20.0, torch.float32, [(4, 16, 5), (3, 9, 0)]),  # B = 16: tl.dot, G = 1
    (1, 1, 4, 32, 64, 16, 1, 2, 3, 1, None, torch.bfloat16, [(3, 11, 2)]),               # B = 16 of P = 64
    (2, 6, 1, 16, 8, 2, 2, 2, 6, None, None, torch.float16, [(6, 1, 1), (2, 2, 0)]),     # B = 2, Ho = 3H
]


@pytest.mark.parametrize("h,ho,g,d,p,b,s_dev,s_host,w,splits,softcap,dtype,steps", BLOCK_WORKSPACE_CASES)
def test_static_over_a_block_workspace_matches_dense(h, ho, g, d, p, b, s_dev, s_host, w, splits, softcap, dtype,
                                                     steps):
    """Per step: the first n rows of the index gathered into the workspace (the rest -1, so the NaN the workspace
    was filled with stays there, unread), then one `paged_decode_static` with meta (n, valid_last, start); equal to
    the workspace's reference and to dense attention of each column over its own blocks."""
    gen = torch.Generator().manual_seed(ho * b + g)
    pools = [torch.randn(s, h, p, d, generator=gen).to(dtype).to(DEVICE) for s in (s_dev, s_dev, s_host, s_host)]
    dev_k, dev_v, host_k, host_v = pools
    q = torch.randn(ho, g, d, generator=gen).to(DEVICE)
    scaling = 1 / math.sqrt(d)
    selection = _block_selection(h, ho, p // b, s_dev + s_host, w, seed=g).to(DEVICE)
    ws_k, ws_v = (torch.full((w, ho, b, d), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2))
    rows = torch.arange(w, dtype=torch.int32, device=DEVICE)
    meta = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    index = torch.full((w, ho), -1, dtype=torch.int32, device=DEVICE)
    out = paged_decode_workspace(q, w, splits)
    for n, valid_last, start in steps:
        index.fill_(-1)
        index[:n] = selection[:n]
        ws_k.fill_(float("nan"))
        ws_v.fill_(float("nan"))
        gather_blocks(ws_k, ws_v, dev_k, dev_v, host_k, host_v, index, s_dev)
        meta.copy_(torch.tensor([n, valid_last, start], dtype=torch.int32))
        got = paged_decode_static(q, ws_k, ws_v, rows, meta, scaling, softcap, out=out)
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
        _close(got, paged_decode_reference(q, ws_k, ws_v, rows[:n], valid_last, scaling, softcap, start), TOL[dtype])
        _close(got, _blocks_dense(q, pools, index, b, n, valid_last, scaling, softcap, start), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,d", [(2, 16), (3, 64)])
def test_append_token_writes_one_row_of_one_page_and_nothing_else(dtype, heads, d):
    """The kernel step's append (one launch) against the torch step's: row `row` of page `slot` of both pools gets
    the token, from a key and value laid out as a model's projections leave them (heads not adjacent in memory);
    every other element is unchanged."""
    from offload.kernels.append import append_token

    gen = torch.Generator().manual_seed(heads * d)
    pools = [torch.randn(5, heads, 8, d, generator=gen).to(dtype) for _ in range(2)]
    expected = [p.clone() for p in pools]
    pools = [p.to(DEVICE) for p in pools]
    for slot, row in ((3, 0), (0, 7), (4, 5)):
        # [1, T=1, H, D] projections seen as [1, H, 1, D]: heads `2 * d` apart, rows of a wider tensor.
        k, v = (torch.randn(1, 1, heads, 2 * d, generator=gen).to(dtype)[..., :d].transpose(1, 2) for _ in range(2))
        append_token(*pools, slot, row, k.to(DEVICE), v.to(DEVICE))
        expected[0][slot, :, row] = k[0, :, 0]
        expected[1][slot, :, row] = v[0, :, 0]
        assert torch.equal(pools[0].cpu(), expected[0]) and torch.equal(pools[1].cpu(), expected[1])


def test_append_token_refuses_a_token_that_does_not_fit():
    from offload.kernels.append import append_token

    pools = [torch.zeros(2, 2, 8, 16) for _ in range(2)]
    with pytest.raises(ValueError, match="append_token"):
        append_token(*pools, 2, 0, torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    with pytest.raises(ValueError, match="append_token"):
        append_token(*pools, 0, 0, torch.zeros(1, 3, 1, 16), torch.zeros(1, 3, 1, 16))
    with pytest.raises(ValueError, match="append_token"):
        append_token(*pools, 0, 0, *(torch.zeros(1, 2, 1, 16, dtype=torch.bfloat16) for _ in range(2)))
