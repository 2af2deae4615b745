"""The decode step on the device (offload/decode.py), without a model: a page table made by hand, pools of random
keys and values, and attention over the same pages computed densely in position order.

Both backends run here: the torch one (one unified pool, as on the CPU) and the Triton one (a device pool with
workspace rows and a separate host pool, as on CUDA) under Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch

from offload.decode import DeviceDecode, KernelDecode
from offload.pagetable import PageTable

P, H, D, HQ = 4, 2, 16, 4  # page size, KV heads, head dim, query heads (GQA group 2)
DEV, HOST, WS = 8, 10, 8  # device slots, host slots, workspace rows (kernel backend)
SCALING = D**-0.5


def _pools(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn((DEV + HOST, H, P, D), generator=g)
    v = torch.randn((DEV + HOST, H, P, D), generator=g)
    return k, v


def _table(where: list[tuple[str, int]], tokens: int, first: int = 0) -> PageTable:
    """One layer whose page p lives in tier where[p][0], slot where[p][1] (pages before `first` released)."""
    t = PageTable(1, 16)
    t.page_size = P
    for page, (tier, slot) in enumerate(where):
        if page >= first:
            t.set(tier, 0, page, slot)
    t.tokens[0] = tokens
    t.first[0] = first
    return t


LAYOUT = [("host", 3), ("device", 0), ("host", 7), ("host", 0), ("device", 5), ("host", 9), ("device", 2)]
TOKENS = 6 * P + 3  # the tail (page 6) holds 3 tokens


def _decoders(k: torch.Tensor, v: torch.Tensor, *blocks) -> list[DeviceDecode]:
    """(torch backend, kernel backend); `blocks`: (select_block, head_selection) for sparse steps."""
    unified = DeviceDecode((k, v), DEV, 1, 16, HQ, H, torch.device("cpu"), *blocks)
    # Kernel backend: the device pool with workspace rows after it, the host pool apart.
    dk = torch.cat([k[:DEV], torch.full((WS, H, P, D), float("nan"))])
    dv = torch.cat([v[:DEV], torch.full((WS, H, P, D), float("nan"))])
    kernels = KernelDecode((dk, dv), DEV, WS, 1, 16, HQ, H, torch.device("cpu"), *blocks)
    kernels.attach_host(k[DEV:].clone(), v[DEV:].clone())
    return [unified, kernels]


def _unified_slot(tier: str, slot: int) -> int:
    return slot if tier == "device" else DEV + slot


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: list[int], lo: int, n: int) -> torch.Tensor:
    """Dense attention of q [1, HQ, 1, D] over positions lo..n-1 of `pages` (in position order)."""
    idx = torch.tensor([_unified_slot(*LAYOUT[p]) for p in pages])
    pos = (torch.tensor(pages)[:, None] * P + torch.arange(P)).flatten()
    kk = k[idx].permute(1, 0, 2, 3).reshape(1, H, -1, D)
    vv = v[idx].permute(1, 0, 2, 3).reshape(1, H, -1, D)
    keep = (pos >= lo) & (pos < n)
    out = torch.nn.functional.scaled_dot_product_attention(q, kk[:, :, keep], vv[:, :, keep], scale=SCALING,
                                                           enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("first, off", [(0, 0), (2, 3)])
def test_exact_step_attends_over_every_page_of_both_pools(backend: str, first: int, off: int) -> None:
    k, v = _pools()
    decoder = _decoders(k, v)[backend == "triton"]
    table = _table(LAYOUT, TOKENS, first)
    view = decoder.view(0, table, 7)
    assert view.host == sum(1 for tier, _ in LAYOUT[first:] if tier == "host")
    assert not view.lower
    q = torch.randn(1, HQ, 1, D, generator=torch.Generator().manual_seed(1))
    got = decoder.exact(0, view, q, TOKENS - 6 * P, off, SCALING, None)
    want = _reference(q, k, v, list(range(first, 7)), first * P + off, TOKENS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_view_is_rebuilt_when_the_table_changes_and_only_then() -> None:
    k, v = _pools()
    decoder = _decoders(k, v)[0]
    table = _table(LAYOUT, TOKENS)
    view = decoder.view(0, table, 7)
    assert decoder.view(0, table, 7) is view  # nothing moved: the same view, no host work
    table.set("device", 0, 0, 6)  # page 0 promoted to device slot 6
    again = decoder.view(0, table, 7)
    assert again is not view and again.host == view.host - 1
    assert int(again.slots[0]) == 6
    # A page on no pool (on disk): the streaming path must serve the layer.
    table.set("device", 0, 0, -1)
    table.set("host", 0, 0, -1)
    table.set("disk", 0, 0, 4)
    assert decoder.view(0, table, 7).lower


# Pages 2 and 4 live only on disk.
ON_DISK = [("host", 3), ("device", 0), ("disk", 0), ("host", 0), ("disk", 1), ("host", 9), ("device", 2)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("window", [None, 21, 17], ids=["full", "window-first-in-pools", "window-first-on-disk"])
def test_a_partial_over_the_pages_in_the_pools_leaves_out_those_on_disk(backend: str, window: int | None) -> None:
    """A batch's exact step over a layer with pages on disk attends over the pages in the pools as a partial (the
    disk pages' own partials merge in later): the same (output, log-sum-exp) as dense attention over those pages'
    tokens, each at its own position, within a sliding window that starts on a page in the pools (page 1, with
    pages on disk after it) or on one on disk (page 2)."""
    k, v = _pools(4)
    decoder = _decoders(k, v)[backend == "triton"]
    first = 0 if window is None else (TOKENS - window) // P
    table = _table(ON_DISK, TOKENS, first)
    view = decoder.view(0, table, 7)
    assert view.lower
    pools = decoder.in_pools(view)
    kept = [p for p in range(first, 7) if ON_DISK[p][0] != "disk"]
    assert pools.count == len(kept) and pools.numbers.tolist() == kept
    q = torch.randn(1, HQ, 1, D, generator=torch.Generator().manual_seed(3))
    o, lse = decoder.exact_ragged(0, [0], [pools], q, [TOKENS], SCALING, None, window, partial=True)
    # Dense, over the kept pages' tokens from the window's start to the tail's last.
    idx = torch.tensor([_unified_slot(*ON_DISK[p]) for p in kept])
    pos = (torch.tensor(kept)[:, None] * P + torch.arange(P)).flatten()
    seen = (pos < TOKENS) & (pos >= (TOKENS - window if window else 0))
    kk = k[idx].permute(1, 0, 2, 3).reshape(H, -1, D)[:, seen]
    vv = v[idx].permute(1, 0, 2, 3).reshape(H, -1, D)[:, seen]
    s = torch.einsum("hgd,htd->hgt", q.view(H, HQ // H, D), kk) * SCALING
    torch.testing.assert_close(lse.view(H, -1), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.view(H, -1, D), torch.softmax(s, -1) @ vv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["kv", "query", "shared"])
@pytest.mark.parametrize("window", [False, True])
def test_sparse_step_attends_each_head_over_its_own_blocks(backend: str, mode: str, window: bool) -> None:
    """Blocks of 2 tokens (R = 2 per page): each chooser's fixed, top-scored and tail blocks, and each query head
    attends over its chooser's blocks alone, cut at a sliding window's start inside the first block."""
    from offload.sparse import BlockPlan

    B, R, G = 2, 2, HQ // H
    k, v = _pools(2)
    decoder = _decoders(k, v, B, mode)[backend == "triton"]
    first = 1 if window else 0
    off = 3 if window else 0  # the window starts at token 1 of block 3 (page 1's second block)
    table = _table(LAYOUT, TOKENS, first)
    view = decoder.view(0, table, 7)
    fb = (first * P + off) // B
    plan = BlockPlan(first=first, last=6, valid=TOKENS - 6 * P, fb=fb, nb=6 * R - fb, k_blocks=5,
                     cut=first * P + off - fb * B)
    choosers = {"kv": H, "query": HQ, "shared": 1}[mode]
    fixed = [fb, 11]  # the window's first block and the recent window's
    forced = torch.tensor(fixed)[:, None].expand(2, choosers)
    scores = torch.rand((plan.nb, choosers), generator=torch.Generator().manual_seed(4))
    bias = torch.zeros(plan.nb, 1)
    bias[[b - fb for b in fixed]] = float("-inf")
    q = torch.randn(1, HQ, 1, D, generator=torch.Generator().manual_seed(3))
    free = plan.k_blocks - len(fixed)
    got = decoder.sparse(0, view, q, plan, scores, forced, bias, free, 7, SCALING, None)

    lo, tail = first * P + off, [12, 13]
    want, host_reads, pages_used = [], 0, set()
    for head in range(HQ):
        c = {"kv": head // G, "query": head, "shared": 0}[mode]
        ranked = sorted((b for b in range(fb, 12) if b not in fixed), key=lambda b: -float(scores[b - fb, c]))
        blocks = sorted({*fixed, *ranked[:free], *tail})
        pages_used |= {b // R for b in blocks}
        if mode == "query" or (mode == "kv" and head % G == 0) or (mode == "shared" and head % G == 0):
            host_reads += sum(1 for b in blocks if b not in tail and LAYOUT[b // R][0] == "host")
        pos = torch.tensor([b * B + t for b in blocks for t in range(B)])
        pos = pos[(pos >= lo) & (pos < TOKENS)]
        idx = torch.tensor([_unified_slot(*LAYOUT[int(p) // P]) for p in pos])
        kk, vv = k[idx, head // G, pos % P], v[idx, head // G, pos % P]  # [tokens, D]
        w = torch.softmax((q[0, head, 0] @ kk.t()) * SCALING, dim=-1)
        want.append(w @ vv)
    torch.testing.assert_close(got[0, 0], torch.stack(want), atol=1e-5, rtol=1e-5)
    # Host blocks read (one KV head's block each, per gathered head), counted on the device; uses recorded for
    # eviction at the next boundary.
    assert int(decoder.host_reads) == host_reads
    used = decoder.use_step[0].view(16, R).amax(-1)  # blocks -> pages
    assert sorted((used == 7).nonzero().flatten().tolist()) == sorted(pages_used)


# -- decisions as plain data ---------------------------------------------------------------------------------------
def test_device_evictions_are_planned_from_the_table_alone() -> None:
    """Eviction is decided from the page table and the policy, with no tier and no model: the least recently
    used full page goes first, a page being copied or an open tail never, and a page with no copy below is marked
    for write-back."""
    from offload.config import OffloadConfig
    from offload.placement import Eviction, plan_device_evictions
    from policies import EVICTION

    t = PageTable(2, 8)
    t.page_size = P
    for layer in range(2):
        t.tokens[layer] = 3 * P + 1  # pages 0..2 full, page 3 an open tail
        t.set("device", layer, [0, 1, 2, 3], [4 * layer + s for s in range(4)])
    t.set("host", 0, 1, 0)  # page 1 of layer 0 also has a host copy
    t.last_use[0] = torch.tensor([5, 1, 9, 9, 0, 0, 0, 0])
    t.last_use[1] = torch.tensor([3, 7, 2, 9, 0, 0, 0, 0])
    t.busy[1, 2] = 1  # being copied
    policy = EVICTION.create("lru", t)
    got = plan_device_evictions(t, policy, OffloadConfig(), 3)
    assert got == [Eviction(0, 1, 1, write_back=False), Eviction(1, 0, 4, write_back=True),
                   Eviction(0, 0, 0, write_back=True)]
    with pytest.raises(ValueError, match="^device_budget: "):
        plan_device_evictions(t, policy, OffloadConfig(), 6)  # 8 pages, 2 tails, 1 busy: 5 can go


# -- the runtime with the kernel backend ---------------------------------------------------------------------------
@pytest.mark.parametrize("kv_quant", ["none", "k8v4"])
@pytest.mark.parametrize("attention", ["exact", "sparse"])
def test_runtime_with_the_kernel_decode_step_gives_the_tokens_of_the_torch_one(monkeypatch, attention: str,
                                                                              kv_quant: str) -> None:
    """The CUDA decode step's integration (host pool attached at the first spill, workspace rows of each layer's
    parity shared with the streaming path's buffers, the sparse call with its device-side page count) run on the
    CPU under Triton's interpreter: the same tokens as DynamicCache (exact) or as the torch step (sparse, and any
    packed host pool, which the kernels unpack as the torch step does)."""
    from transformers import DynamicCache

    import offload.runtime as runtime_module
    from offload import offload
    from offload.models import tiny_llama

    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=3)
    page_bytes = 2 * 2 * 8 * 16 * 4
    # Budgets where part of the KV is in host RAM and the workspace rows hold what a step gathers.
    prompt, pages = (100, 30) if attention == "exact" else (300, 60)
    ids = torch.randint(0, 128, (1, prompt), generator=torch.Generator().manual_seed(5))
    opts = dict(attention=attention, page_size=8, device_budget=pages * page_bytes, host_budget="1MiB",
                token_budget=24, sink_tokens=8 if kv_quant == "none" else 0, recent_tokens=8, dense_layers=0,
                kv_quant=kv_quant)  # packed, sink pages would stay on the device: none, so blocks come from the host
    with torch.no_grad():
        if attention == "exact" and kv_quant == "none":
            ref = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 past_key_values=DynamicCache())
        else:
            with offload(model, **opts) as rt:
                assert not isinstance(rt.decoder, KernelDecode)
                ref = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        monkeypatch.setattr(runtime_module, "use_kernels", lambda device, config: True)
        with offload(model, **opts) as rt:
            assert isinstance(rt.decoder, KernelDecode)
            calls = {"exact": 0, "sparse": 0}
            for name in calls:
                def spy(*args, _name=name, _call=getattr(rt.decoder, name)):
                    calls[_name] += 1
                    return _call(*args)
                setattr(rt.decoder, name, spy)
            out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            s = rt.stats()
            rt.table.check_invariants()
    assert calls[attention] >= 2 * 7  # every decode step of both layers ran the kernels
    assert s["resident_bytes"]["host"] > 0
    assert (s["blocks"]["from_host"] if attention == "sparse" else s["loads"]["needed"]) > 0
    if attention == "sparse":
        assert s["attended_fraction"] < 0.2
    assert torch.equal(out, ref)
