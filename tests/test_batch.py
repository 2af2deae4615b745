"""Batches: several left-padded prompts of different lengths in one offload() runtime (offload/batch.py).

Each claim is checked against the same model with its ordinary DynamicCache on the same batch: greedy tokens row by
row, over three tiers, with sliding windows and soft-capping, sparse attention whose budget covers the context,
sequences that finish early, sampled num_return_sequences, beam search, and a cache driven (and reordered) by hand.
Padding takes no pages, a finished sequence's pages are released, beams share their full pages and copy only open
tails, and a batch that can't fit the budgets fails before its prefill. A decode step serves the sequences that take
the plain step in one call, equal or ragged, with a constant op count, while the others run alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from offload import OffloadConfig, offload
from offload.batch import left_padding
from offload.budgets import plan_budgets
from offload.opcount import count_step
from test_architectures import PAGE, min_device, page_bytes, tiny

pytestmark = pytest.mark.usefixtures("torch_one_thread")

LENGTHS = [37, 70, 12, 55]  # ragged prompts of two to nine pages of 8 tokens
NEW = 20


def padded_batch(lengths: list[int] = LENGTHS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts (ids >= 3) and their attention mask, as a tokenizer pads a batch."""
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    g = torch.Generator().manual_seed(seed)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[b, width - n:] = 1
    return ids, mask


@torch.no_grad()
def generate(model, ids, mask, new: int = NEW, **kwargs) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          **{"eos_token_id": None, **kwargs})


def _first_budget(model, start: int, kernels: bool, takes, **options) -> int:
    """The smallest device budget of `start` pages or more whose plan (with the Triton kernels' workspace with
    `kernels`, and `options`) `takes` (a predicate on the plan)."""
    layers, pb = model.config.num_hidden_layers, page_bytes(model)
    max_pages = -(-model.config.max_position_embeddings // PAGE)
    for pages in range(start, start + 4 * layers * start + 4 * max_pages + 64):
        config = OffloadConfig(page_size=PAGE, device_budget=pages * pb, host_budget=0, **options)
        try:
            plan = plan_budgets(config, pb, layers, max_pages, torch.device("cpu"), kernels=kernels)
        except ValueError:
            continue
        if takes(plan):
            return pages * pb
    raise AssertionError("no device budget found")


def least_device(model, batch: int, kernels: bool = False, **options) -> int:
    """The smallest device budget that holds an open page per layer and sequence of a batch of `batch`, and two
    pages more, with `options` (a disk tier divides the workspace into more parts, rounded down), for the Triton
    kernels' workspace with `kernels`."""
    least = model.config.num_hidden_layers * batch
    return _first_budget(model, least, kernels, lambda plan: plan.device_cache_pages >= least + 2, **options)


def budget_for(model, cache_pages: int, kernels: bool, **options) -> int:
    """The device budget whose plan keeps `cache_pages` pages for the device tier, with the Triton kernels'
    workspace or without: the two backends then place (and, with `kv_quant`, pack) the same pages at the same
    steps."""
    return _first_budget(model, cache_pages, kernels, lambda plan: plan.device_cache_pages == cache_pages,
                         **options)


def three_tiers(model, tmp_path: Path, batch: int = len(LENGTHS)) -> dict:
    """A device budget of two pages beyond one open page per layer and sequence, a host tier of 6 pages and a disk
    tier for the rest."""
    disk = {"disk_dir": str(tmp_path / "kv")}
    return {"page_size": PAGE, "device_budget": least_device(model, batch, **disk),
            "host_budget": 6 * page_bytes(model), **disk}


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_batch_tokens_equal_dynamic_cache_over_three_tiers(arch, tmp_path: Path):
    """Mistral slides a window over every layer, Gemma 2 alternates windowed and global layers with soft-capping."""
    model = tiny(arch)
    ids, mask = padded_batch()
    expected = generate(model, ids, mask)
    with offload(model, **three_tiers(model, tmp_path)) as rt:
        got = generate(model, ids, mask)
        peak = rt.stats()["peak_resident_bytes"]
        rt.table.check_invariants()
        held = list(rt.table.tokens)
    for b in range(len(LENGTHS)):
        assert torch.equal(got[b], expected[b]), f"sequence {b}"
    assert peak["host"] > 0 and peak["disk"] > 0
    # Padding takes no pages: each row holds its sequence's real tokens (those a window keeps, on windowed layers).
    layers = model.config.num_hidden_layers
    assert held == [n + NEW - 1 for _ in range(layers) for n in LENGTHS]
    assert not list((tmp_path / "kv").iterdir())


def test_padded_positions_take_no_pages(tiny_llama_model):
    model = tiny_llama_model
    ids, mask = padded_batch([5, 40])
    with offload(model, page_size=PAGE) as rt, torch.no_grad():
        generate(model, ids, mask, new=1)
        # Prefill only: sequence 0 holds one page, sequence 1 five; the 35 padded positions take none.
        assert rt.device_tier.num_used == model.config.num_hidden_layers * (1 + 5)


@pytest.mark.parametrize("prefetch", ["temporal", "speculative"])
def test_sparse_batch_with_a_budget_over_the_context_is_exact(prefetch):
    model = tiny("llama")
    ids, mask = padded_batch()
    expected = generate(model, ids, mask)
    with offload(model, attention="sparse", token_budget=1.0, page_size=PAGE, select_block=4,
                 prefetch=prefetch) as rt:
        got = generate(model, ids, mask)
        assert rt.stats()["attended_fraction"] == 1.0
    assert torch.equal(got, expected)


def test_sparse_batch_selects_per_sequence():
    """At a budget below the context each sequence's rows choose from their own pages: a sequence alone in the
    runtime attends to the same blocks, so it gives the same tokens alone and in the batch."""
    model = tiny("llama")
    ids, mask = padded_batch([70, 64], seed=3)
    opts = dict(attention="sparse", token_budget=0.3, page_size=PAGE, select_block=4, dense_layers=0)
    with offload(model, **opts) as rt:
        together = generate(model, ids, mask)
        assert rt.stats()["attended_fraction"] < 0.9
    for b in range(2):
        alone_ids = ids[b:b + 1, mask[b].argmax():]
        with offload(model, **opts):
            alone = generate(model, alone_ids, torch.ones_like(alone_ids))
        assert torch.equal(together[b, -NEW:], alone[0, -NEW:]), f"sequence {b}"


def batch_sizes(monkeypatch, cls, name: str) -> list[int]:
    """The sequences each call of the batch step `cls.name` (whose first argument is their rows) serves, as a list
    that the calls append to."""
    calls = []
    step = getattr(cls, name)
    monkeypatch.setattr(cls, name, lambda self, *a, **kw: calls.append(len(a[0])) or step(self, *a, **kw))
    return calls


SPARSE = dict(attention="sparse", token_budget=24, sink_tokens=8, recent_tokens=8, dense_layers=1, select_block=4)


@pytest.mark.parametrize("arch,options", [("llama", {}),
                                          ("mistral", {"selection": "minmax", "head_selection": "query"}),
                                          ("gemma2", {"selection": "landmark", "head_selection": "shared"}),
                                          ("llama", {"history": 0.5, "selection": "channels"}),
                                          ("qwen2", {"selection": "probe"})],
                         ids=["llama-sketch-kv", "mistral-minmax-query", "gemma2-landmark-shared", "llama-history",
                              "qwen2-probe"])
def test_sparse_steps_of_a_batch_choose_together_as_each_sequence_alone(arch, options, monkeypatch):
    """Sparse attention below the context, KV on the device and the host: the sequences that take the plain step
    are scored, choose their blocks and attend in one pass, with sliding windows and soft-capping, and each
    chooses what it chooses when every row runs alone: the same blocks attended, the same blocks read from the
    host, the same tokens."""
    from offload.decode import DeviceDecode
    from offload.runtime import Runtime

    model = tiny(arch)
    ids, mask = padded_batch(SPARSE_LENGTHS)
    calls = batch_sizes(monkeypatch, DeviceDecode, "sparse_batch")
    got, blocks = [], []
    for together in (False, True):
        monkeypatch.setattr(Runtime, "batch_step", together)
        tokens, stats = _sparse_run(model, ids, mask, options)
        got.append(tokens)
        blocks.append(stats["blocks"])
        assert len(calls) > 0 if together else not calls
    assert blocks[0] == blocks[1] and blocks[0]["from_host"] > 0
    for b in range(len(SPARSE_LENGTHS)):
        assert torch.equal(got[1][b], got[0][b]), f"sequence {b}"
    assert calls == [len(SPARSE_LENGTHS)] * len(calls)  # every sequence, at every step, page boundaries too


@pytest.mark.kernels
def test_sparse_steps_of_a_batch_on_the_kernels_choose_as_on_the_pools(monkeypatch):
    """The Triton kernels' sparse batch step (CUDA; here Triton's interpreter): one launch over each head's own
    blocks read in place from both pools, with a sliding window, soft-capping and a choice per query head. It
    chooses and attends as the torch step does (itself checked against every row alone above): the same blocks
    attended, the same tokens, while reading blocks from the host (how many depends on the device tier, which the
    kernels' workspace makes smaller)."""
    interpreted()
    from offload import runtime as runtime_module
    from offload.decode import KernelDecode

    model, options = tiny("gemma2"), {"head_selection": "query"}
    ids, mask = padded_batch(SPARSE_LENGTHS)
    pools, on_pools = _sparse_run(model, ids, mask, options, new=6)
    calls = batch_sizes(monkeypatch, KernelDecode, "sparse_batch")
    monkeypatch.setattr(runtime_module, "use_kernels", lambda device, config: True)
    got, stats = _sparse_run(model, ids, mask, options, new=6, kernels=True)
    assert stats["blocks"]["attended"] == on_pools["blocks"]["attended"] and stats["blocks"]["from_host"] > 0
    for b in range(len(SPARSE_LENGTHS)):
        assert torch.equal(got[b], pools[b]), f"sequence {b}"
    assert max(calls) == len(SPARSE_LENGTHS)


SPARSE_LENGTHS = [137, 70, 112, 95]


@pytest.mark.parametrize("arch,options,kernels", [
    ("llama", {}, False),
    ("mistral", {"selection": "minmax", "head_selection": "query"}, False),
    ("gemma2", {"selection": "landmark", "head_selection": "shared"}, False),
    pytest.param("gemma2", {"head_selection": "query"}, True, marks=pytest.mark.kernels)],
    ids=["llama-sketch-kv", "mistral-minmax-query", "gemma2-landmark-shared", "gemma2-query-kernels"])
def test_sparse_steps_over_pages_on_disk_attend_as_with_every_page_on_the_device(arch, options, kernels, tmp_path,
                                                                                 monkeypatch):
    """Sparse attention below the context over three tiers: the sequences whose chosen blocks lie on disk take the
    batch's step too. Each chooses its blocks with the others; those on disk, of every sequence, are read in one
    request through the load ring and attended as they land, each head over the blocks it chose. The logits are
    those of the same batch with every page on the device, and so they are with every row streaming alone (bug:
    a page that filled was left unsummarized when another sequence's step evicted it before its own next step,
    and that sequence then chose other blocks). With the Triton kernels (CUDA; here Triton's interpreter) the
    blocks in the pools are read by one gather launch."""
    from offload import runtime as runtime_module
    from offload.runtime import Runtime

    model, new = tiny(arch), 8 if kernels else 14
    ids, mask = padded_batch(SPARSE_LENGTHS)
    lower, step = [], Runtime._batch_sparse_lower
    monkeypatch.setattr(Runtime, "_batch_sparse_lower",
                        lambda rt, layer, group, *a: lower.append(len(group)) or step(rt, layer, group, *a))

    def run(tiers: bool, together: bool) -> tuple[torch.Tensor, dict]:
        monkeypatch.setattr(Runtime, "batch_step", together)
        disk = {"disk_dir": str(tmp_path / "kv")} if tiers else {}
        opts = {"page_size": PAGE, **SPARSE, **options, **disk}
        if tiers:
            opts.update(device_budget=least_device(model, 4, kernels and together, **disk, **SPARSE),
                        host_budget=6 * page_bytes(model))
        with offload(model, **opts) as rt:
            out = generate(model, ids, mask, new, output_logits=True, return_dict_in_generate=True)
            stats = rt.stats()
            rt.table.check_invariants()
        assert not tiers or stats["peak_resident_bytes"]["disk"] > 0
        return torch.stack(out.logits), stats

    want, on_device = run(False, True)
    runs = [(False, run(True, False))] if not kernels else []
    del lower[:]
    if kernels:
        interpreted()
        monkeypatch.setattr(runtime_module, "use_kernels", lambda device, config: True)
    runs.append((True, run(True, True)))
    for together, (logits, stats) in runs:
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-4, msg=f"together={together}")
    stats = runs[-1][1][1]
    assert stats["attended_fraction"] == pytest.approx(on_device["attended_fraction"])
    assert stats["attended_fraction"] < 0.9
    assert lower and max(lower) > 1, lower  # several sequences with blocks on disk in one step
    assert not list((tmp_path / "kv").iterdir())


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=pytest.mark.kernels)],
                         ids=["pools", "kernels"])
def test_sparse_steps_of_a_batch_read_packed_host_blocks(kernels, monkeypatch):
    """With `kv_quant` (packed host pages) the sparse steps of a batch choose together and unpack the chosen
    host blocks of every sequence in one pass: the blocks attended and read from the host, and the logits, are
    those of every row alone. (No step opens a page: which pages are packed when depends on the order of the
    steps that evict, and packing is lossy.) On the Triton kernels (CUDA; here Triton's interpreter) the same
    pass, against the torch step row by row with the same device tier."""
    from offload import runtime as runtime_module
    from offload.decode import DeviceDecode, KernelDecode
    from offload.runtime import Runtime

    model = tiny("mistral")
    ids, mask = padded_batch([129, 65, 113, 97])  # one past a page boundary: seven steps open no page
    calls = batch_sizes(monkeypatch, DeviceDecode, "sparse_batch")
    options = {**SPARSE, "selection": "minmax", "kv_quant": "k8v4"}
    cache = least_device(model, 4, **options) // page_bytes(model)
    logits, blocks = [], []
    for together in (False, True):
        monkeypatch.setattr(Runtime, "batch_step", together)
        if kernels and together:
            interpreted()
            monkeypatch.setattr(runtime_module, "use_kernels", lambda device, config: True)
        opts = {"page_size": PAGE, "device_budget": budget_for(model, cache, kernels and together, **options),
                "host_budget": "1MiB", **options}
        with offload(model, **opts) as rt:
            assert isinstance(rt.decoder, KernelDecode) == (kernels and together)
            out = generate(model, ids, mask, new=7, output_logits=True, return_dict_in_generate=True)
            logits.append(torch.stack(out.logits))
            blocks.append(rt.stats()["blocks"])
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)
    assert blocks[0] == blocks[1] and blocks[0]["from_host"] > 0, blocks
    assert calls and max(calls) == 4, calls


def _sparse_run(model, ids, mask, options: dict, new: int = NEW, kernels: bool = False) -> tuple[torch.Tensor, dict]:
    """Greedy tokens of sparse attention below the context with KV on the device and the host, and the stats."""
    from offload.decode import KernelDecode

    opts = {"page_size": PAGE, "device_budget": least_device(model, 4, kernels) + 8 * page_bytes(model),
            "host_budget": "1MiB", **SPARSE, **options}
    with offload(model, **opts) as rt:
        assert isinstance(rt.decoder, KernelDecode) == kernels
        tokens = generate(model, ids, mask, new)
        stats = rt.stats()
        rt.table.check_invariants()
    assert stats["attended_fraction"] < 0.9 and stats["resident_bytes"]["host"] > 0
    return tokens, stats


def test_finished_sequences_release_their_pages(tmp_path: Path):
    model = tiny("llama")
    ids, mask = padded_batch()
    width = ids.shape[1]
    free_run = generate(model, ids, mask)
    eos = int(free_run[2, width + 3])  # the fourth token of sequence 2 ends it
    expected = generate(model, ids, mask, eos_token_id=eos)
    with offload(model, **three_tiers(model, tmp_path)) as rt:
        got = generate(model, ids, mask, eos_token_id=eos)
        t = rt.table
        t.check_invariants()
        done = [b for b in range(len(LENGTHS)) if rt.finished[b]]
        assert 2 in done
        for b in done:
            for layer in range(b, t.layers, rt.batch):
                assert all(int((t.slot[tier][layer] >= 0).sum()) == 0 for tier in ("device", "host", "disk"))
        assert rt.finished != [True] * len(LENGTHS)
    assert torch.equal(got, expected)


def test_a_batch_with_a_prefix_cache_neither_loads_nor_publishes(tmp_path: Path):
    model = tiny("llama")
    ids, mask = padded_batch([20, 33])
    expected = generate(model, ids, mask)
    store = tmp_path / "prefix"
    with offload(model, page_size=PAGE, prefix_cache=str(store)) as rt:
        got = generate(model, ids, mask)
        stats = rt.stats()["prefix_cache"]
    assert torch.equal(got, expected)
    assert stats["pages_written"] == 0 and stats["lookups"] == 0 and stats["pages_loaded"] == 0, stats
    assert not any((store / "entries").rglob("*"))  # the store holds its index alone


def test_sampled_return_sequences_equal_dynamic_cache():
    model = tiny("llama")
    ids, mask = padded_batch([20, 33])
    kwargs = dict(max_new_tokens=8, do_sample=True, num_return_sequences=3, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        torch.manual_seed(5)
        expected = model.generate(ids, attention_mask=mask, **kwargs)
        with offload(model, page_size=PAGE) as rt:
            torch.manual_seed(5)
            got = model.generate(ids, attention_mask=mask, **kwargs)
            assert rt.batch == 6
    assert torch.equal(got, expected)


@torch.no_grad()
def _by_hand(model, ids, mask, cache, steps: int = 6) -> torch.Tensor:
    """Prefill in two chunks, then greedy steps with the mask grown by one column each; the logits of each."""
    out, logits = ids, []
    half = ids.shape[1] // 2
    for a, b in ((0, half), (half, ids.shape[1])):
        step = model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True)
        logits.append(step.logits[:, -1])
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        out = torch.cat([out, token], 1)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        logits.append(model(token, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits)


def test_rt_cache_serves_a_batch_driven_by_hand(tmp_path: Path):
    model = tiny("llama")
    ids, mask = padded_batch()
    expected = _by_hand(model, ids, mask, DynamicCache())
    with offload(model, **three_tiers(model, tmp_path)) as rt:
        got = _by_hand(model, ids, mask, rt.cache())
        got_ids = _by_hand(model, ids, mask, rt.cache(ids))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_ids, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_beam_search_equals_dynamic_cache_over_three_tiers(arch, tmp_path: Path):
    model = tiny(arch)
    ids, mask = padded_batch([37, 70])
    kwargs = dict(num_beams=3, num_return_sequences=2, eos_token_id=None)
    expected = generate(model, ids, mask, **kwargs)
    with offload(model, **three_tiers(model, tmp_path, batch=6)) as rt:
        got = generate(model, ids, mask, **kwargs)
        rt.table.check_invariants()
        # Beams share their common pages: the tiers hold fewer slots than the rows hold pages.
        held = sum(int((rt.table.slot[name] >= 0).sum()) for name in ("device", "host", "disk"))
        used = sum(tier.num_used for _, tier in rt.placement.tiers() if tier is not None)
        assert used < held
    assert torch.equal(got, expected)
    assert not list((tmp_path / "kv").iterdir())


def test_sparse_beam_search_with_a_budget_over_the_context_is_exact():
    model = tiny("llama")
    ids, mask = padded_batch([37, 70])
    expected = generate(model, ids, mask, num_beams=2)
    with offload(model, attention="sparse", token_budget=1.0, page_size=PAGE, select_block=4,
                 prefetch="speculative"):
        got = generate(model, ids, mask, num_beams=2)
    assert torch.equal(got, expected)


@torch.no_grad()
def _reordered(model, ids, cache, orders: list[list[int]]) -> torch.Tensor:
    """Prefill, then a greedy step after each reorder in `orders`; the logits of every forward."""
    logits = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
    for order in orders:
        cache.reorder_cache(torch.tensor(order))
        token = logits[-1].argmax(-1, keepdim=True)[torch.tensor(order)]
        logits.append(model(token, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits)


def test_reordered_rows_share_full_pages_and_copy_only_open_tails(tmp_path: Path):
    """Three copies of a 20-token prompt (two full pages of 8 and an open tail of 4), all reordered to continue the
    first: each layer then holds that row's two full pages once, its tail, and two copies of the tail. Later
    reorders and steps give DynamicCache's logits, with pages spilled to host and disk."""
    model = tiny("llama")
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(7)).repeat(3, 1)
    with offload(model, page_size=PAGE) as rt, torch.no_grad():
        cache = rt.cache()
        model(ids, past_key_values=cache, use_cache=True)
        assert rt.device_tier.num_used == 3 * 3 * layers
        cache.reorder_cache(torch.tensor([0, 0, 0]))
        assert rt.device_tier.num_used == (2 + 1 + 2) * layers
        assert sorted(rt.device_tier.refs.values()) == [2] * (2 * layers)  # each full page: three holders
        rt.table.check_invariants()
    orders = [[0, 0, 1], [2, 1, 1], [1, 1, 0], [0, 2, 2], [2, 2, 2], [0, 1, 2], [1, 0, 0]]
    ids = torch.randint(3, 128, (3, 30), generator=torch.Generator().manual_seed(8))
    expected = _reordered(model, ids, DynamicCache(), orders)
    with offload(model, **three_tiers(model, tmp_path, batch=3)) as rt:
        got = _reordered(model, ids, rt.cache(), orders)
        rt.table.check_invariants()
        assert rt.stats()["peak_resident_bytes"]["disk"] > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_batch_that_cant_fit_fails_before_prefill(tiny_llama_model, tmp_path: Path):
    model = tiny_llama_model
    ids, mask = padded_batch()
    pb = page_bytes(model)
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with offload(model, page_size=PAGE, device_budget=min_device(model) + 16 * pb, host_budget=4 * pb) as rt:
            with pytest.raises(ValueError, match=r"^budgets: the KV of 4 sequences of \d+ tokens in all") as e:
                generate(model, ids, mask)
            assert "host_budget" in str(e.value) and "\n" not in str(e.value)
        with offload(model, page_size=PAGE, device_budget=min_device(model), host_budget="1MiB") as rt:
            with pytest.raises(ValueError, match=r"^device_budget: a batch of 4 sequences needs an open page"):
                generate(model, ids, mask)
            assert rt.stats()["tokens"]["prefill"] == 0
    finally:
        hook.remove()
    assert calls == []


def test_bad_batches_are_refused(tiny_llama_model):
    model = tiny_llama_model
    ids, mask = padded_batch([10, 20])
    right = mask.flip(1)  # right padding
    with offload(model, page_size=PAGE) as rt, torch.no_grad():
        with pytest.raises(ValueError, match="^attention_mask: a batch must be left-padded"):
            generate(model, ids, right)
        cache = rt.cache()
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="^batch: this cache holds a batch of 2 sequences"):
            model(ids[:1, -1:], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="^beam_idx: expected 2 indices"):
            cache.reorder_cache(torch.tensor([0, 2]))


def test_left_padding_reads_each_rows_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    assert left_padding(mask, 4) == [2, 0, 1]
    assert left_padding(torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], 1), 6) == [2, 0, 1]
    assert left_padding(torch.tensor([[0, 0, 0], [0, 1, 1]]), 3) == [3, 1]  # a first chunk all padding
    for bad in ([[1, 0, 1, 1]], [[0, 1, 0, 1]], [[1, 1, 1, 0]]):
        with pytest.raises(ValueError, match="^attention_mask:"):
            left_padding(torch.tensor(bad), 4)



def interpreted() -> None:
    """Skips unless the Triton kernels can run here on the CPU models, under Triton's interpreter (set by conftest.py
    where there is no CUDA device; tests/test_gpu.py runs the kernels' batch on CUDA)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("Triton's interpreter runs where there is no CUDA device")


def _step_counts(model, opts: dict, lengths: list[int]) -> tuple[int, int, int, int]:
    """(aten ops of the offloaded step, of DynamicCache's, host reads of the offloaded step, of DynamicCache's) of
    the second decode step of left-padded prompts of `lengths` tokens (the first builds what the steps to the next
    page boundary reuse; neither opens a page: no length is 0 or 7 past a multiple of the page size)."""
    ids, mask = padded_batch(lengths, seed=9)
    token = torch.ones((len(lengths), 1), dtype=torch.long)
    first = torch.cat([mask, torch.ones_like(token)], 1)
    step = {"attention_mask": torch.cat([first, torch.ones_like(token)], 1)}
    with torch.no_grad():
        cache = DynamicCache()
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        model(token, attention_mask=first, past_key_values=cache, use_cache=True)
        base = count_step(model, cache, token, **step)
        with offload(model, **opts) as rt:
            cache = rt.cache()
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            model(token, attention_mask=first, past_key_values=cache, use_cache=True)
            ops, reads, _ = count_step(model, cache, token, **step)
            assert rt.stats()["resident_bytes"]["host"] > 0
    return ops, base.ops, reads, base.reads


@pytest.mark.parametrize("step", ["pools", "kernels", "sparse", "sparse-kernels"])
@pytest.mark.parametrize("ragged", [False, True], ids=["equal", "ragged"])
def test_a_decode_step_of_a_batch_is_one_gather_and_one_attention_per_layer(ragged, step, monkeypatch):
    """On the unified pool (the CPU), a decode step appends, gathers and attends for the whole batch at once,
    whether the sequences hold equal or different numbers of tokens; with the Triton kernels (CUDA; here Triton's
    interpreter, a launch counting as one op) it appends and attends in one launch; in sparse mode it scores,
    chooses, gathers and attends every sequence's blocks at once (with the kernels, attends in one launch). The ops
    it adds to DynamicCache's per layer do not grow with the batch, and it reads no more on the host than
    DynamicCache's step (whose mask builder reads the padding mask once a forward, as the runtime's does; its
    layers read nothing)."""
    kernels = step.endswith("kernels")
    if kernels:
        interpreted()
        from offload import runtime as runtime_module

        monkeypatch.setattr(runtime_module, "use_kernels", lambda device, config: True)
    model = tiny("llama")
    layers = model.config.num_hidden_layers
    extra = {}
    sizes = (2, 4) if kernels else (2, 4, 8)  # (the interpreter runs a launch's programs one by one)
    for batch in sizes:
        lengths = [60, 45, 30, 52, 61, 37, 44, 58][:batch] if ragged else [60] * batch
        room = 0 if kernels else 16  # (the kernels' workspace takes what the device tier does not need)
        sparse = SPARSE if step.startswith("sparse") else {}
        opts = {"page_size": PAGE, "host_budget": "1MiB", **sparse,
                "device_budget": least_device(model, batch, kernels, **sparse) + room * page_bytes(model)}
        ops, base, reads, base_reads = _step_counts(model, opts, lengths)
        extra[batch] = (ops - base) / layers
        assert reads <= base_reads, (batch, reads, base_reads)
    bound = {"pools": 40, "kernels": 15, "sparse": 120, "sparse-kernels": 120}[step]
    assert len(set(extra.values())) == 1 and extra[2] <= bound, extra


def test_segment_attention_equals_each_sequence_alone():
    """The batch's one pass over pages of several sequences gives each sequence the attention over its own pages
    alone, with tokens hidden (a tail's unfilled rows, a window's start, a page with none visible) and
    soft-capping."""
    from offload import attention_math as am

    g = torch.Generator().manual_seed(4)
    H, M, D, P, counts = 2, 3, 16, 8, [3, 1, 5, 2]
    B, N = len(counts), sum(counts)
    q = torch.randn((B, H, M, D), generator=g)
    k, v = torch.randn((2, N, H, P, D), generator=g)
    seq = torch.repeat_interleave(torch.arange(B), torch.tensor(counts))
    hidden = torch.rand((N, P), generator=g) < 0.3
    hidden[0] = True  # sequence 0 sees nothing of its first page
    hidden[[counts[0] - 1, 3]] = False  # ... but all of its last, as sequence 1 all of its one page
    for softcap in (None, 2.0):
        got = am.segment_attention(q, k, v, seq, 0.25, softcap, hidden)
        for b in range(B):
            at = seq == b
            want, _ = am.pages_partial(q[b], k[at], v[at], 0.25, softcap, hidden[at][:, None])
            torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_ragged_sequences_through_the_batched_step_equal_dynamic_cache(arch, monkeypatch):
    """Prompts of different lengths, KV on the device and the host: at every decode step and layer every sequence
    attends in one call over its own pages (with sliding windows and soft-capping), those whose token opens a page
    (their new tail opened before the call) or whose window leaves one (released after it) too, and the tokens are
    DynamicCache's."""
    from offload.decode import DeviceDecode

    model = tiny(arch)
    ids, mask = padded_batch()
    expected = generate(model, ids, mask)
    calls = []
    ragged = DeviceDecode.exact_ragged
    monkeypatch.setattr(DeviceDecode, "exact_ragged", lambda self, *a: calls.append(len(a[1])) or ragged(self, *a))
    with offload(model, page_size=PAGE, device_budget=least_device(model, 4) + 8 * page_bytes(model),
                 host_budget="1MiB") as rt:
        got = generate(model, ids, mask)
        assert rt.stats()["peak_resident_bytes"]["host"] > 0
        rt.table.check_invariants()
        windowed = [w is not None for w in rt.windows[::len(LENGTHS)]]  # per layer: a sliding window
    for b in range(len(LENGTHS)):
        assert torch.equal(got[b], expected[b]), f"sequence {b}"
    assert any(windowed) == (arch != "llama")
    assert calls == served_per_layer(model, NEW)


def served_per_layer(model, new: int) -> list[int]:
    """The sequences of a batch of `LENGTHS` the batch's one step serves at each of the `new` - 1 decode steps and
    each layer: all of them, whether a step opens a page or a window leaves one."""
    return [len(LENGTHS)] * ((new - 1) * model.config.num_hidden_layers)


@pytest.mark.kernels
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_ragged_sequences_through_the_batched_kernel_equal_dynamic_cache(arch, monkeypatch):
    """The Triton kernels' step (CUDA; here Triton's interpreter): the sequences that take the plain step attend in
    one launch over each one's own pages, device pages and host pages read in place (with sliding windows and
    soft-capping), the others alone, and the tokens are DynamicCache's."""
    interpreted()
    from offload import runtime as runtime_module
    from offload.decode import KernelDecode

    model, new = tiny(arch), 10
    ids, mask = padded_batch()
    expected = generate(model, ids, mask, new)
    calls = []
    ragged = KernelDecode.exact_ragged
    monkeypatch.setattr(KernelDecode, "exact_ragged", lambda self, *a: calls.append(len(a[1])) or ragged(self, *a))
    monkeypatch.setattr(runtime_module, "use_kernels", lambda device, config: True)
    with offload(model, page_size=PAGE, device_budget=least_device(model, 4, kernels=True) + 4 * page_bytes(model),
                 host_budget="1MiB") as rt:
        assert isinstance(rt.decoder, KernelDecode)
        got = generate(model, ids, mask, new)
        assert rt.stats()["peak_resident_bytes"]["host"] > 0
        rt.table.check_invariants()
    for b in range(len(LENGTHS)):
        assert torch.equal(got[b], expected[b]), f"sequence {b}"
    assert calls == served_per_layer(model, new)


@pytest.mark.parametrize("arch,kernels", [("llama", False), ("mistral", False), ("gemma2", False),
                                          pytest.param("gemma2", True, marks=pytest.mark.kernels)],
                         ids=["llama", "mistral", "gemma2", "gemma2-kernels"])
def test_sequences_with_pages_on_disk_read_them_in_one_request_for_the_batch(arch, kernels, tmp_path: Path,
                                                                             monkeypatch):
    """Over three tiers, long sequences with pages on disk and short ones whose pages all sit in the pools take the
    batch's step together: the disk pages of every long sequence are read in one request through the load ring
    (chunks holding pages of several sequences, the next layer's asked for ahead) and merged with each one's
    attention over the pools. No sequence streams alone, at the steps that open a page too. The tokens are
    DynamicCache's. With the Triton kernels (CUDA; here Triton's interpreter) the pools' pages are
    attended in one launch, and the load ring's rows are not the kernels' workspace's."""
    from offload import runtime as runtime_module
    from offload.decode import KernelDecode
    from offload.loader import LoadRing
    from offload.runtime import Runtime

    if kernels:
        interpreted()
        monkeypatch.setattr(runtime_module, "use_kernels", lambda device, config: True)
    partials = []
    ragged = KernelDecode.exact_ragged
    monkeypatch.setattr(KernelDecode, "exact_ragged",
                        lambda self, *a, partial=False: partials.append(partial) or ragged(self, *a, partial=partial))
    model, new = tiny(arch), 10 if kernels else NEW  # (the interpreter runs a launch's programs one by one)
    lengths = [70, 12, 66, 9]
    ids, mask = padded_batch(lengths)
    expected = generate(model, ids, mask, new)
    requests, alone = [], []
    request, streaming = LoadRing.request, Runtime._decode_streaming

    def record_request(ring, layer, pages, predicted, front=False, rows=None, key=None):
        if rows is not None and rows.numel():
            requests.append((predicted, len(set(rows.tolist()))))
        return request(ring, layer, pages, predicted, front, rows, key)

    def record_streaming(rt, layer, query, n, *args):
        if query.shape[2] == 1:  # a decode step
            alone.append((layer, n))
        return streaming(rt, layer, query, n, *args)

    monkeypatch.setattr(LoadRing, "request", record_request)
    monkeypatch.setattr(Runtime, "_decode_streaming", record_streaming)
    disk = {"disk_dir": str(tmp_path / "kv")}
    with offload(model, page_size=PAGE, device_budget=least_device(model, 4, kernels, **disk) + 16 * page_bytes(model),
                 host_budget=(8 if kernels else 16) * page_bytes(model), **disk) as rt:
        assert isinstance(rt.decoder, KernelDecode) == kernels
        if kernels:  # the ring's rows lie apart from the kernels' pool and its workspace rows
            pool, ring = rt.decoder.pool_k.untyped_storage(), rt.ring_k.untyped_storage()
            assert pool.data_ptr() + pool.nbytes() <= ring.data_ptr() or ring.data_ptr() + ring.nbytes() <= \
                pool.data_ptr()
        got = generate(model, ids, mask, new)
        assert rt.stats()["peak_resident_bytes"]["disk"] > 0
        rt.table.check_invariants()
    for b in range(len(lengths)):
        assert torch.equal(got[b], expected[b]), f"sequence {b}"
    assert any(n > 1 for _, n in requests) and any(predicted for predicted, _ in requests), requests
    assert any(partials) == kernels  # the pools' pages of sequences with pages on disk, in the kernels' launch
    assert not alone, alone
    assert not list((tmp_path / "kv").iterdir())


def on_disk(table, row: int) -> int:
    """Pages of page table row `row` that live only on disk."""
    s = table.slot
    return int(((s["device"][row] < 0) & (s["host"][row] < 0) & (s["disk"][row] >= 0)).sum())


def test_a_step_over_pages_on_disk_reads_chunks_of_several_sequences(tmp_path: Path, monkeypatch):
    """A decode step of a batch whose sequences have pages on disk reads them in chunks filled with pages of any
    sequence, as many as one sequence with all those pages would need (one more where some were asked for ahead
    and the rest now), and attends each layer's pools once and each chunk once: fewer chunks than each sequence
    reading its own."""
    from offload import attention_math as am
    from offload.decode import DeviceDecode
    from offload.runtime import Runtime

    model = tiny("llama")
    layers = model.config.num_hidden_layers
    lengths = [60, 45, 30, 52, 61, 37, 44, 58]
    chunks, pools, parts, streamed = [], [], [], []
    load, ragged, partial, streaming = (Runtime._load, DeviceDecode.exact_ragged, am.segment_partial,
                                        Runtime._decode_streaming)
    monkeypatch.setattr(Runtime, "_load", lambda rt, job, k, v: chunks.append(job) or load(rt, job, k, v))
    monkeypatch.setattr(DeviceDecode, "exact_ragged", lambda *a, **kw: pools.append(1) or ragged(*a, **kw))
    monkeypatch.setattr(am, "segment_partial", lambda *a: parts.append(1) or partial(*a))
    monkeypatch.setattr(Runtime, "_decode_streaming", lambda *a: streamed.append(1) or streaming(*a))
    ids, mask = padded_batch(lengths, seed=9)
    token = torch.ones((len(lengths), 1), dtype=torch.long)
    first = torch.cat([mask, torch.ones_like(token)], 1)  # (no length is a multiple of the page size)
    disk = {"disk_dir": str(tmp_path / "kv")}
    opts = {"page_size": PAGE, "host_budget": 4 * page_bytes(model), "load_buffers": 2,
            "device_budget": least_device(model, len(lengths), **disk) + 16 * page_bytes(model), **disk}
    with torch.no_grad(), offload(model, **opts) as rt:
        cache = rt.cache()
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        chunks.clear(), pools.clear(), parts.clear()
        B, C, t = rt.batch, rt.ring.chunk, rt.table
        below = [sum(on_disk(t, r) for r in range(layer * B, layer * B + B)) for layer in range(layers)]
        model(token, attention_mask=first, past_key_values=cache, use_cache=True)
        ahead = [j for j in rt.ring.inflight if j.key == ("batch", 0)]  # for the next step
    assert not streamed  # (no step opened a page)
    lower = [layer for layer in range(layers) if below[layer]]
    assert lower and len(pools) == layers, (below, len(pools))
    read = [j for j in chunks if all(j is not a for a in ahead)]
    per_layer = [[j for j in read if j.key == ("batch", layer)] for layer in range(layers)]
    for layer in lower:
        mine = per_layer[layer]
        assert sum(j.pages.numel() for j in mine) == below[layer]
        assert len(mine) <= -(-below[layer] // C) + 1, (layer, [j.pages.numel() for j in mine], C)
    assert len(read) == sum(map(len, per_layer))  # (every chunk of the batch's requests)
    assert len(parts) == len(read) + len(lower)  # one pass over each chunk, and the pools' partial per layer
    alone = sum(-(-on_disk(t, r) // C) for r in range(B * layers))  # each sequence's row reading its own
    assert len(read) < alone, (len(read), alone)


@pytest.mark.parametrize("arch,kernels", [("llama", False), ("gemma2", False),
                                          pytest.param("gemma2", True, marks=pytest.mark.kernels)],
                         ids=["llama", "gemma2", "gemma2-kernels"])
def test_packed_host_pages_of_a_batch_are_unpacked_in_its_step(arch, kernels, tmp_path: Path, monkeypatch):
    """With `kv_quant` the host and disk tiers hold packed pages: the batch's step gathers every sequence's device
    pages and unpacks all of their host pages in one pass (disk pages come in the batch's request), and each
    sequence gets the logits of every step run row by row. (No step opens a page: which pages are packed when
    depends on the order in which the steps that do evict, and packing is lossy.) With the Triton kernels (CUDA;
    here Triton's interpreter) one launch unpacks them into the kernels' workspace rows, and the sequences whose
    host pages the rows left no room for run alone; the torch step row by row, with the same device tier, is the
    reference."""
    from offload import runtime as runtime_module
    from offload.decode import DeviceDecode, KernelDecode
    from offload.runtime import Runtime

    model = tiny(arch)
    lengths = [33, 65, 17, 49]  # one token past a page boundary: seven steps open no page
    ids, mask = padded_batch(lengths)
    unpacked, lower = [], []
    cls = KernelDecode if kernels else DeviceDecode
    ragged, batch_lower = cls.exact_ragged, Runtime._batch_lower
    monkeypatch.setattr(cls, "exact_ragged", lambda self, layer, rows, views, *a, **kw: unpacked.append(
        [v.host for v in views]) or ragged(self, layer, rows, views, *a, **kw))
    monkeypatch.setattr(Runtime, "_batch_lower", lambda rt, layer, group, *a: lower.append(len(group)) or batch_lower(
        rt, layer, group, *a))
    logits, cache = [], least_device(model, 4, disk_dir=str(tmp_path)) // page_bytes(model) - 4
    for together, workspace in ((False, None), (True, None), (True, 2)) if kernels else ((False, None), (True, None)):
        monkeypatch.setattr(Runtime, "batch_step", together)
        on_kernels = kernels and together
        if on_kernels:
            interpreted()
            monkeypatch.setattr(runtime_module, "use_kernels", lambda device, config: True)
        disk = {"disk_dir": str(tmp_path / f"{together}{workspace}")}
        opts = {"page_size": PAGE, "device_budget": budget_for(model, cache, on_kernels, **disk),
                "host_budget": 6 * page_bytes(model), **disk, "kv_quant": "k8v4"}
        unpacked.clear()
        with offload(model, **opts) as rt:
            assert isinstance(rt.decoder, KernelDecode) == on_kernels and rt.plan.device_cache_pages == cache
            if workspace is not None:
                rt.decoder.workspace = workspace  # rows for two host pages: the sequences needing more run alone
            out = generate(model, ids, mask, new=7, output_logits=True, return_dict_in_generate=True)
            logits.append(torch.stack(out.logits))
            assert rt.stats()["peak_resident_bytes"]["disk"] > 0
        torch.testing.assert_close(logits[-1], logits[0], rtol=0, atol=1e-4)
        if together and workspace is None:  # several sequences' host pages in one call
            assert max(sum(h > 0 for h in hosts) for hosts in unpacked) > 1, unpacked
        if workspace is not None:
            assert max(sum(hosts) for hosts in unpacked) <= workspace < max(sum(hosts) for hosts in seen), unpacked
        seen = list(unpacked)
    assert max(lower) > 1, lower  # several sequences' disk pages


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 3}, {"do_sample": True, "num_return_sequences": 2}],
                         ids=["greedy", "beams", "sampled"])
def test_equal_sequences_through_the_batched_step_equal_dynamic_cache(kwargs, monkeypatch):
    """Equal prompts (and their beams and returned copies) take the one-call step at every step, those that open
    a page too, and give DynamicCache's tokens."""
    from offload.decode import DeviceDecode

    model = tiny("llama")
    ids = torch.randint(3, 128, (2, 45), generator=torch.Generator().manual_seed(3))
    kwargs = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0, "eos_token_id": None, **kwargs}
    torch.manual_seed(1)
    expected = model.generate(ids, **kwargs)
    calls = []
    batched = DeviceDecode.exact_batch
    monkeypatch.setattr(DeviceDecode, "exact_batch", lambda self, *a: calls.append(1) or batched(self, *a))
    with offload(model, page_size=PAGE, device_budget=least_device(model, 6) + 8 * page_bytes(model),
                 host_budget="1MiB") as rt, torch.no_grad():
        torch.manual_seed(1)
        got = model.generate(ids, **kwargs)
        assert rt.stats()["resident_bytes"]["host"] > 0
    assert torch.equal(got, expected)
    # The decode steps append tokens 45..63 (those appending tokens 48 and 56 open a page).
    assert len(calls) == 19 * model.config.num_hidden_layers


def test_a_damaged_disk_page_of_a_batch_fails_clearly(tmp_path: Path):
    """A batch keeps no token ids per sequence, so a disk page with no intact copy elsewhere can't be recomputed:
    the next forward fails with one error naming the page, and no token comes from it."""
    import faults
    from offload.recover import Unrecoverable

    model = tiny("llama")
    ids, mask = padded_batch([37, 70])
    with pytest.raises(Unrecoverable, match=r"^\[Errno \d+\] disk: layer \d+ of sequence 1 page \d+ .*a batch keeps no "):
        with offload(model, **three_tiers(model, tmp_path, batch=2)) as rt, torch.no_grad():
            cache = rt.cache()
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            t = rt.table
            row = 1  # layer 0 of sequence 1 (row layer * batch + sequence)
            alone = (t.slot["disk"][row] >= 0) & (t.slot["host"][row] < 0) & (t.slot["device"][row] < 0)
            slot = int(t.slot["disk"][row, int(alone.nonzero()[0, 0])])
            faults.flip(rt.disk_tier.path, slot * rt.disk_tier.slot_bytes + 8)
            mask = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], 1)
            model(torch.tensor([[5], [6]]), attention_mask=mask, past_key_values=cache, use_cache=True)
    assert not list((tmp_path / "kv").iterdir())


def test_returned_sequences_after_a_turn_start_a_new_sequence():
    """A second generate whose ids extend the first's, with num_return_sequences=2: a new batch of two, not the
    first turn's sequence continued (which holds one)."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=6, do_sample=True, num_return_sequences=2, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        first = generate(model, ids, torch.ones_like(ids), new=5)
        torch.manual_seed(2)
        expected = model.generate(first, attention_mask=torch.ones_like(first), **kwargs)
        with offload(model, page_size=PAGE) as rt:
            assert torch.equal(generate(model, ids, torch.ones_like(ids), new=5), first)
            torch.manual_seed(2)
            got = model.generate(first, attention_mask=torch.ones_like(first), **kwargs)
            assert rt.batch == 2
    assert torch.equal(got, expected)
