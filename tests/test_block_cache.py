"""Sparse mode's block cache (offload/block_cache.py): device copies of the blocks steps read from the host pool.
The ring's bookkeeping against a model of it, and the runtime with the cache against the runtime without: the same
tokens (a copy holds the same bytes), fewer blocks from the host."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload import offload
from offload.block_cache import BlockCache
from offload.config import OffloadConfig
from offload.models import tiny_llama

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PAGE_BYTES = 2 * 2 * 8 * 16 * 4  # tiny_gqa3_model, pages of 8 tokens, float32


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), entries=st.integers(4, 24), layers=st.integers(1, 3),
       head_major=st.booleans())
def test_the_ring_keeps_copies_that_match_their_homes(seed: int, entries: int, layers: int, head_major: bool) -> None:
    """Random steps choosing blocks whose homes are device or host blocks of a pool: after every fill, each entry
    reads its home or a cache slot that holds its home's bytes, at most one entry owns a slot, and an entry reads a
    slot only if it owns it. A step's reads always give its homes' bytes."""
    g = torch.Generator().manual_seed(seed)
    blocks, heads, B, D = 12, 2, 2, 3
    host_blocks, first = 40, 30  # ids 0..29 device, 30..30+entries the cache, 40.. the host pool
    pool_blocks = host_blocks + 64
    flat_k = torch.randn(pool_blocks, B, D, generator=g)
    flat_v = torch.randn(pool_blocks, B, D, generator=g)
    entries = min(entries, host_blocks - first - 1)
    cache = BlockCache(first, entries, layers, blocks, heads, torch.device("cpu"))
    homes = []
    for layer in range(layers):
        home = torch.where(torch.rand(blocks, heads, generator=g) < 0.3,
                           torch.randint(0, first, (blocks, heads), generator=g),
                           host_blocks + torch.randperm(64, generator=g)[:blocks * heads].view(blocks, heads))
        homes.append(home)
        cache.set_home(layer, home)
    for _ in range(12):
        layer = int(torch.randint(0, layers, (1,), generator=g))
        count = int(torch.randint(1, max(2, entries // heads) + 1, (1,), generator=g))
        chosen = torch.stack([torch.randperm(blocks, generator=g)[:count] for _ in range(heads)], 1)  # [count, H]
        ids = cache.rows[layer].gather(0, chosen)
        order = ids.t().reshape(-1) if head_major else ids.reshape(-1)
        want = homes[layer].gather(0, chosen)
        want = want.t().reshape(-1) if head_major else want.reshape(-1)
        k, v = flat_k[order], flat_v[order]
        assert torch.equal(k, flat_k[want]) and torch.equal(v, flat_v[want])
        if not cache.fits(order.numel()):
            continue
        cache.fill(cache.entries_of(layer, chosen, head_major), order, host_blocks, k, v, flat_k, flat_v)
        owners = cache.owner[:entries]
        live = owners[owners != cache.spare_entry]
        assert live.unique().numel() == live.numel()
        for slot, entry in enumerate(owners.tolist()):
            if entry != cache.spare_entry:
                assert int(cache.row[entry]) == first + slot
        for lay in range(layers):
            rows, home = cache.rows[lay], homes[lay]
            in_cache = (rows >= first) & (rows < first + entries)
            assert torch.equal(rows[~in_cache], home[~in_cache])
            assert torch.equal(flat_k[rows], flat_k[home]) and torch.equal(flat_v[rows], flat_v[home])


def _generate(model, ids, new: int = 24, **options):
    with torch.no_grad(), offload(model, **options) as rt:
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        s = rt.stats()
        s["plan"] = rt.plan
        rt.table.check_invariants()
    return out, s


@pytest.mark.parametrize("mode", ["kv", "query", "shared"])
@pytest.mark.parametrize("kv_quant", ["none", "k8v4"])
def test_the_cache_gives_the_tokens_of_the_step_without_it_and_reads_fewer_host_blocks(tiny_gqa3_model, mode,
                                                                                     kv_quant) -> None:
    """The same device tier with and without the cache beside it: identical tokens, and the host pool crossed by
    fewer blocks (the steps after one that read a block find its copy)."""
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(4))
    kw = dict(attention="sparse", token_budget=0.2, page_size=8, sink_tokens=8, recent_tokens=16, dense_layers=0,
              head_selection=mode, host_budget="4MiB", kv_quant=kv_quant, select_block=4)
    ref, s0 = _generate(tiny_gqa3_model, ids, device_budget=34 * PAGE_BYTES, **kw)
    # The cache holds about twice the blocks a step reads over every layer; each query head reads its own.
    budget, share, pages = (214, 0.843, 160) if mode == "query" else (94, 0.66, 56)
    out, s1 = _generate(tiny_gqa3_model, ids, device_budget=budget * PAGE_BYTES, block_cache=share, **kw)
    assert s0["plan"].device_cache_pages == s1["plan"].device_cache_pages == 30
    assert s1["plan"].block_cache_pages == pages and s1["block_cache_bytes"] == pages * PAGE_BYTES
    assert torch.equal(out, ref)
    assert s0["blocks"]["attended"] == s1["blocks"]["attended"]
    assert 0 < s1["blocks"]["from_host"] < 0.6 * s0["blocks"]["from_host"]
    assert s1["bytes_moved"]["host->device"] < 0.6 * s0["bytes_moved"]["host->device"]


def test_a_batch_with_the_cache_gives_each_row_the_tokens_it_gives_alone(tiny_gqa3_model) -> None:
    """Rows of a batch have their own entries: two prompts decoded together with the cache give the tokens each
    gives alone without it."""
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 128, (1, 200), generator=g) for _ in range(2)]
    kw = dict(attention="sparse", token_budget=0.2, page_size=8, sink_tokens=8, recent_tokens=16, dense_layers=0,
              host_budget="4MiB")
    alone = [_generate(tiny_gqa3_model, p, device_budget=36 * PAGE_BYTES, **kw)[0] for p in prompts]
    both, s = _generate(tiny_gqa3_model, torch.cat(prompts), device_budget=100 * PAGE_BYTES, block_cache=0.4, **kw)
    assert s["blocks"]["from_host"] > 0
    for row, want in zip(both, alone):
        assert torch.equal(row, want[0])


@pytest.mark.parametrize("mode", ["kv", "query", "shared"])
def test_the_sparse_steps_of_a_batch_fill_the_cache_together(tiny_gqa3_model, mode, monkeypatch) -> None:
    """A batch's sparse steps choose and attend together, and copy the host blocks every sequence read in one
    fill: the tokens and blocks attended of the same batch with the same device tier and no cache, and fewer
    blocks from the host."""
    from offload.budgets import plan_budgets

    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 128, (3, 200), generator=g)
    kw = dict(attention="sparse", token_budget=0.2, page_size=8, sink_tokens=8, recent_tokens=16, dense_layers=0,
              host_budget="4MiB", head_selection=mode, select_block=4)
    fills = []
    fill = BlockCache.fill
    monkeypatch.setattr(BlockCache, "fill", lambda cache, entries, *a: fills.append(
        (entries // (cache.blocks * cache.heads)).unique().numel()) or fill(cache, entries, *a))
    out, s1 = _generate(tiny_gqa3_model, ids, device_budget=300 * PAGE_BYTES, block_cache=0.5, **kw)
    tier = s1["plan"].device_cache_pages
    config = tiny_gqa3_model.config
    layers, max_pages = 3 * config.num_hidden_layers, -(-config.max_position_embeddings // 8)
    budget = next(p for p in range(tier, 4 * tier) if plan_budgets(
        OffloadConfig(device_budget=p * PAGE_BYTES, **kw), PAGE_BYTES, layers, max_pages, torch.device("cpu"),
        device_step=True).device_cache_pages == tier)
    ref, s0 = _generate(tiny_gqa3_model, ids, device_budget=budget * PAGE_BYTES, **kw)
    assert s0["plan"].device_cache_pages == tier and s1["plan"].block_cache_pages > 0
    assert torch.equal(out, ref)
    assert s0["blocks"]["attended"] == s1["blocks"]["attended"]
    assert 0 < s1["blocks"]["from_host"] < s0["blocks"]["from_host"], (s0["blocks"], s1["blocks"])
    assert max(fills) == 3, fills  # the batch's three sequences in one fill


def test_a_new_sequence_forgets_the_copies(tiny_gqa3_model) -> None:
    """Two generates in one runtime, the second on another prompt of the same length: its tokens are those of a
    fresh runtime (copies of the first sequence's blocks sit at the same entries and must not be read)."""
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randint(0, 128, (1, 300), generator=g) for _ in range(2))
    kw = dict(attention="sparse", token_budget=0.2, page_size=8, sink_tokens=8, recent_tokens=16, dense_layers=0,
              host_budget="4MiB", device_budget=68 * PAGE_BYTES, block_cache=0.5)
    want, _ = _generate(tiny_gqa3_model, b, **kw)
    with torch.no_grad(), offload(tiny_gqa3_model, **kw) as rt:
        tiny_gqa3_model.generate(a, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert int(rt.decoder.cache.ptr) > 0  # the first sequence left copies
        got = tiny_gqa3_model.generate(b, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, "0.5", True, float("nan")])
def test_block_cache_outside_zero_to_one_is_refused(value) -> None:
    with pytest.raises(ValueError, match=r"^block_cache: expected a number in \[0, 1\)"):
        OffloadConfig(attention="sparse", block_cache=value)


def test_exact_attention_keeps_no_block_cache(tiny_gqa3_model) -> None:
    """Like the other sparse-mode options, block_cache does nothing in exact mode: the whole device tier is the
    device's."""
    with offload(tiny_gqa3_model, page_size=8, device_budget=64 * PAGE_BYTES, block_cache=0.5) as rt:
        assert rt.plan.block_cache_pages == 0 and rt.stats()["block_cache_bytes"] == 0


def test_a_cache_that_leaves_too_few_device_pages_is_refused() -> None:
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128)
    with pytest.raises(ValueError, match=r"^block_cache: 0.9 of the device budget's"):
        with offload(model, attention="sparse", page_size=8, device_budget=40 * 1024, block_cache=0.9):
            pass


@pytest.mark.kernels
@pytest.mark.parametrize("batch", [1, 3])
def test_the_kernel_step_with_the_cache_gives_the_tokens_of_the_torch_step(batch: int, monkeypatch) -> None:
    """The CUDA decode step's path (Triton's interpreter on the CPU): its block workspace is block-major, and the
    cache takes its copies from there. A batch's sparse steps choose together, read every sequence's blocks in one
    gather launch and copy their host blocks into the cache in one fill. The same tokens as the torch step without
    the cache, with the same device tier; fewer host blocks."""
    pytest.importorskip("triton")
    import offload.runtime as runtime_module
    from offload.decode import DeviceDecode, KernelDecode

    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=3)
    tokens, new = (300, 24) if batch == 1 else (150, 8)
    ids = torch.randint(3, 128, (batch, tokens), generator=torch.Generator().manual_seed(5))
    opts = dict(attention="sparse", page_size=8, host_budget="1MiB", token_budget=24, sink_tokens=8, recent_tokens=8,
                dense_layers=0, select_block=4)
    ref, s0 = _generate(model, ids, device_budget=30 * PAGE_BYTES, new=new, **opts)
    calls, step = [], DeviceDecode.sparse_batch
    monkeypatch.setattr(DeviceDecode, "sparse_batch",
                        lambda self, rows, *a, **kw: calls.append((len(rows), self.cache.fits(1))) or step(
                            self, rows, *a, **kw))
    monkeypatch.setattr(runtime_module, "use_kernels", lambda device, config: True)
    with torch.no_grad(), offload(model, device_budget=60 * PAGE_BYTES, block_cache=0.54, **opts) as rt:
        assert isinstance(rt.decoder, KernelDecode) and rt.decoder.cache is not None
        assert rt.plan.device_cache_pages == s0["plan"].device_cache_pages == 26
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        s1 = rt.stats()
        assert int(rt.decoder.cache.ptr) > 0
    assert torch.equal(out, ref)
    assert 0 < s1["blocks"]["from_host"] < 0.8 * s0["blocks"]["from_host"]
    if batch > 1:
        assert max(n for n, _ in calls) == batch and all(fits for _, fits in calls), calls
    else:
        assert not calls  # one sequence: the kernels' own sparse step


@pytest.mark.kernels
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), entries=st.integers(4, 9), choosers=st.sampled_from([1, 2]))
def test_the_triton_fill_equals_the_torch_fill(seed: int, entries: int, choosers: int) -> None:
    """Two caches in the same state, steps of random choices: the kernels' fill (Triton's interpreter here), which
    works out the entries from the chosen blocks itself, leaves the same rows, owners, ring position and copies as
    `BlockCache.fill` (the spare slot and entry aside), and counts the blocks read from the host pool."""
    pytest.importorskip("triton")
    from offload.kernels import cache as kcache

    g = torch.Generator().manual_seed(seed)
    blocks, heads, B, D, host_blocks, first, layers = 12, 2, 2, 3, 40, 30, 2
    pools = [torch.randn(host_blocks + 64, B, D, generator=g) for _ in range(2)]
    twins = [BlockCache(first, entries, layers, blocks, heads, torch.device("cpu")) for _ in range(2)]
    flats = [[p.clone() for p in pools] for _ in range(2)]
    for layer in range(layers):
        home = host_blocks + torch.randperm(64, generator=g)[:blocks * heads].view(blocks, heads)
        home[torch.rand(blocks, heads, generator=g) < 0.3] = 5
        for c in twins:
            c.set_home(layer, home)
    reads, expected = torch.zeros((), dtype=torch.int64), 0
    for _ in range(10):
        layer = int(torch.randint(0, layers, (1,), generator=g))
        count = int(torch.randint(1, entries // heads + 1, (1,), generator=g))
        chosen = torch.stack([torch.randperm(blocks, generator=g)[:count] for _ in range(choosers)], 1)
        a, b = twins
        ids = a.rows[layer].gather(0, chosen.expand(count, heads)).contiguous()  # block-major [count, heads]
        assert torch.equal(ids, b.rows[layer].gather(0, chosen.expand(count, heads)))
        expected += int((ids >= host_blocks).sum())
        order = ids.view(-1)
        a.fill(a.entries_of(layer, chosen, False), order, host_blocks, flats[0][0][order], flats[0][1][order],
               *flats[0])
        kcache.fill(b, layer, chosen, ids.to(torch.int32), host_blocks, flats[1][0][order], flats[1][1][order],
                    *flats[1], reads)
        assert torch.equal(a.row[:-1], b.row[:-1]) and torch.equal(a.owner[:-1], b.owner[:-1])
        assert int(a.ptr) == int(b.ptr)
        assert int(reads) == expected
        for x, y in zip(*flats):
            assert torch.equal(x[:first + entries], y[:first + entries]) and torch.equal(x[host_blocks:],
                                                                                        y[host_blocks:])


@torch.no_grad()
def _reordered(model, ids, cache, orders: list[list[int]]) -> torch.Tensor:
    """Prefill, greedy steps, then after each reorder in `orders` three more; the logits of every forward."""
    logits = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
    for order in [None, None, None] + orders:
        if order is not None:
            cache.reorder_cache(torch.tensor(order))
        for _ in range(3):
            token = logits[-1].argmax(-1, keepdim=True)
            token = token if order is None else token[torch.tensor(order)]
            order = None
            logits.append(model(token, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("together", [True, False], ids=["batch-step", "rows-alone"])
def test_reordered_rows_read_their_new_blocks_not_their_old_copies(tiny_gqa3_model, together, monkeypatch) -> None:
    """Beam search reorders rows: a row then goes on from another row's blocks, and copies of its old blocks must
    not be read. Three different prompts (so rows differ from the start), steps that fill the cache, reorders: the
    logits of the runtime without the cache, with the same device tier, whether the rows' steps run together or
    each alone (the same in both runtimes, so that the attention's sums are the same)."""
    from offload.runtime import Runtime

    monkeypatch.setattr(Runtime, "batch_step", together)
    ids = torch.randint(0, 128, (3, 150), generator=torch.Generator().manual_seed(6))
    orders = [[1, 1, 0], [2, 0, 0], [0, 1, 2], [1, 2, 1]]
    kw = dict(attention="sparse", token_budget=0.2, page_size=8, sink_tokens=8, recent_tokens=8, dense_layers=0,
              host_budget="4MiB", select_block=4)
    with offload(tiny_gqa3_model, device_budget=40 * PAGE_BYTES, **kw) as rt:
        want = _reordered(tiny_gqa3_model, ids, rt.cache(), orders)
        tier = rt.plan.device_cache_pages
    with offload(tiny_gqa3_model, device_budget=190 * PAGE_BYTES, block_cache=0.79, **kw) as rt:
        assert rt.plan.device_cache_pages == tier
        got = _reordered(tiny_gqa3_model, ids, rt.cache(), orders)
        assert rt.stats()["blocks"]["from_host"] > 0 and int(rt.decoder.cache.ptr) > 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch,disk", [("qwen2", False), ("gemma2", False), ("llama", True)])
def test_windows_soft_caps_and_a_disk_tier_with_the_cache(arch, disk, tmp_path) -> None:
    """Sliding windows (the window's first block cut, blocks below it never chosen again), Gemma 2's soft-capped
    scores, and layers with pages on disk (served by the streaming path, not the cache): the tokens without the
    cache, with the same device tier."""
    import test_architectures as ta

    model = ta.tiny(arch)
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(1))
    pb = ta.page_bytes(model)
    kw = dict(attention="sparse", token_budget=0.3, page_size=8, sink_tokens=8, recent_tokens=8, dense_layers=0,
              select_block=4, host_budget=(40 if disk else 4096) * pb)
    if disk:
        kw["disk_dir"] = str(tmp_path / "kv")
    with torch.no_grad():
        with offload(model, device_budget=20 * pb, **kw) as rt:
            want = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
            tier = rt.plan.device_cache_pages
        with offload(model, device_budget=60 * pb, block_cache=0.715, **kw) as rt:
            assert rt.plan.device_cache_pages == tier and rt.plan.block_cache_pages > 0
            got = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
            s = rt.stats()
    assert s["blocks"]["from_host"] > 0
    if disk:
        assert s["peak_resident_bytes"]["disk"] > 0
        assert not list((tmp_path / "kv").iterdir())
    assert torch.equal(got, want)


def test_without_a_decode_step_on_the_device_the_cache_share_stays_with_the_device_tier(tiny_gqa3_model,
                                                                                         monkeypatch) -> None:
    """Where every step streams (CUDA with a disk tier; here the CPU made to stream), nothing would read the cache:
    its pages stay the device tier's, and the tokens are those of the pools' step."""
    import offload.runtime as runtime_module

    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(8))
    kw = dict(attention="sparse", token_budget=0.2, page_size=8, sink_tokens=8, recent_tokens=8, dense_layers=0,
              host_budget="4MiB", select_block=4, device_budget=60 * PAGE_BYTES)
    want, s0 = _generate(tiny_gqa3_model, ids, **kw)
    monkeypatch.setattr(runtime_module, "decodes_on_device", lambda device, config: False)
    got, s1 = _generate(tiny_gqa3_model, ids, block_cache=0.5, **kw)
    assert s1["plan"].block_cache_pages == 0 and s1["block_cache_bytes"] == 0
    assert s1["plan"].device_cache_pages == s0["plan"].device_cache_pages
    assert torch.equal(got, want)


@settings(max_examples=8, deadline=None)
@given(page=st.sampled_from([4, 8, 16]), block=st.sampled_from([1, 2, 4, 8]), mode=st.sampled_from(["kv", "query",
       "shared"]), quant=st.sampled_from(["none", "k8v4"]), budget=st.sampled_from([0.1, 0.3, 24]),
       prompt=st.integers(60, 240), rows=st.integers(1, 2), beams=st.sampled_from([1, 2]), share=st.sampled_from(
       [0.3, 0.7]), seed=st.integers(0, 1000))
def test_any_configuration_gives_the_tokens_of_the_same_runtime_without_copies(tiny_gqa3_model, page, block, mode,
                                                                                quant, budget, prompt, rows, beams,
                                                                                share, seed) -> None:
    """The same budgets and plan with the cache filled and with every fill skipped (`fits` refusing): identical
    tokens, whatever the page and block sizes, head selection, packed host pages, budget, batch or beams."""
    if page % block:
        block = page
    ids = torch.randint(0, 128, (rows, prompt), generator=torch.Generator().manual_seed(seed))
    kw = dict(attention="sparse", token_budget=budget, page_size=page, select_block=block, head_selection=mode,
              kv_quant=quant, sink_tokens=4, recent_tokens=8, dense_layers=seed % 2, host_budget="8MiB",
              device_budget=2 * 2 * page * 16 * 4 * 90, block_cache=share)
    run = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, num_beams=beams)
    with torch.no_grad(), offload(tiny_gqa3_model, **kw) as rt:
        got = tiny_gqa3_model.generate(ids, **run)
    with pytest.MonkeyPatch.context() as m, torch.no_grad():
        m.setattr(BlockCache, "fits", lambda self, reads: False)
        with offload(tiny_gqa3_model, **kw) as rt:
            want = tiny_gqa3_model.generate(ids, **run)
            assert int(rt.decoder.cache.ptr) == -1  # nothing was copied
    assert torch.equal(got, want)
