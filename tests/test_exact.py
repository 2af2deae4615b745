"""Exactness end to end on tiny random Llamas: what runs inside `offload()` must give what the same model gives with
its ordinary DynamicCache. Greedy tokens must be identical; logits at every step within float32 rounding. Also the
runtime's statistics, and that the context manager leaves the model as it found it, on success and on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from offload import OffloadConfig, offload
from offload.budgets import plan_budgets
from offload.loader import LoadRing

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPT = 48  # tokens
NEW = 24  # new tokens per generate: 23 decode steps, enough to cross page boundaries


def _dims(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim)."""
    mc = model.config
    return mc.num_hidden_layers, mc.num_key_value_heads, mc.hidden_size // mc.num_attention_heads


def page_bytes(model, page_size: int) -> int:
    _, kv_heads, head_dim = _dims(model)
    return 2 * kv_heads * page_size * head_dim * 4  # K and V, float32


def min_device(model, page_size: int) -> int:
    """The smallest device budget the runtime accepts: one page per layer plus the smallest workspace (how many
    pages that is, test_bookkeeping pins)."""
    layers = _dims(model)[0]
    pb = page_bytes(model, page_size)
    max_pages = -(-model.config.max_position_embeddings // page_size)
    for pages in range(layers + 1, layers + 33):
        config = OffloadConfig(page_size=page_size, device_budget=pages * pb, host_budget=0)
        try:
            plan_budgets(config, pb, layers, max_pages, torch.device("cpu"))
        except ValueError as e:
            assert str(e).startswith("device_budget:"), str(e)
            continue
        return pages * pb
    raise AssertionError("no device budget up to layers + 32 pages is accepted")


def prompt_ids(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def model_state(model) -> dict:
    return {
        "attn": model.config._attn_implementation,
        "generate_attr": "generate" in model.__dict__,
        "generation_config": model.generation_config.to_dict(),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "offload_attention": sorted(k for k in AttentionInterface._global_mapping if k.startswith("offload-")),
    }


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new: int = NEW) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=new, do_sample=False)


@torch.no_grad()
def stepwise_logits(model, ids: torch.Tensor, chunks: tuple[int, ...], steps: int, cache) -> torch.Tensor:
    """Prefill `ids` in `chunks`, then `steps` greedy decode steps; the last-position logits of every forward."""
    assert sum(chunks) == ids.shape[1]
    logits, pos = [], 0
    for c in chunks:
        out = model(ids[:, pos:pos + c], past_key_values=cache, use_cache=True)
        logits.append(out.logits[0, -1])
        pos += c
    for _ in range(steps):
        token = logits[-1].argmax().view(1, 1)
        logits.append(model(token, past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(logits)


@pytest.fixture(params=["tiny_llama_model", "tiny_gqa3_model"], ids=["gqa2-2layers", "gqa3-3layers"])
def model(request: pytest.FixtureRequest):
    return request.getfixturevalue(request.param)


_REFERENCE: dict[tuple, torch.Tensor] = {}


def reference(model, ids: torch.Tensor, new: int = NEW) -> torch.Tensor:
    """Plain greedy generation with the model's DynamicCache (cached per model and prompt)."""
    key = (id(model), tuple(ids[0].tolist()), new)
    if key not in _REFERENCE:
        assert "generate" not in model.__dict__, "reference taken while offloaded"
        _REFERENCE[key] = greedy(model, ids, new)
    return _REFERENCE[key]


# -- greedy tokens over a matrix of options ------------------------------------------------------------------
def _options(name: str, model, tmp_path: Path) -> dict:
    if name == "default":
        return {}
    if name.startswith("page"):
        return {"page_size": int(name[4:])}
    ps = 8 if name == "three-tiers" else 4
    pb = page_bytes(model, ps)
    if name == "min-device":
        return {"page_size": ps, "device_budget": min_device(model, ps), "host_budget": "64MiB"}
    if name == "three-tiers":
        return {"page_size": ps, "device_budget": min_device(model, ps), "host_budget": 4 * pb,
                "disk_dir": str(tmp_path / "kv")}
    if name.startswith("evict-"):
        return {"page_size": ps, "device_budget": min_device(model, ps) + 2 * pb, "host_budget": "64MiB",
                "eviction": name[6:]}
    raise AssertionError(name)


GQA2, GQA3 = "tiny_llama_model", "tiny_gqa3_model"


@pytest.mark.parametrize(
    "which, name",
    [(GQA2, n) for n in ("default", "page4", "page8", "page16", "page7", "min-device", "three-tiers", "evict-lru",
                         "evict-score")]
    + [(GQA3, n) for n in ("page7", "min-device", "three-tiers", "evict-score")],
)
def test_greedy_tokens_equal_plain_generate(request: pytest.FixtureRequest, which, name, tmp_path: Path):
    assert PROMPT % 7 != 0  # page7 leaves an open tail page after the prompt
    model = request.getfixturevalue(which)
    ids = prompt_ids()
    expected = reference(model, ids)
    opts = _options(name, model, tmp_path)
    with offload(model, **opts) as rt:
        got = greedy(model, ids)
        rt.table.check_invariants()
        stats = rt.stats()
    assert torch.equal(got, expected), f"{name}: {got[0, PROMPT:].tolist()} != {expected[0, PROMPT:].tolist()}"
    peak, budgets = stats["peak_resident_bytes"], stats["budgets"]
    assert peak["device"] <= budgets["device"]
    if name == "three-tiers":
        assert all(peak[t] > 0 for t in ("device", "host", "disk")), peak
        assert peak["host"] <= budgets["host"]
        assert stats["bytes_moved"]["host->disk"] > 0 and stats["bytes_moved"]["disk->host"] > 0
        assert os.listdir(opts["disk_dir"]) == []  # removed on exit
    if name in ("min-device", "three-tiers") or name.startswith("evict-"):
        assert stats["evictions"]["device"] > 0  # full tail pages made room for new ones
        assert stats["bytes_moved"]["host->device"] > 0  # pages really came back from below
    if name.startswith("evict-"):
        assert rt.placement.policy.name == name[6:]


@pytest.mark.parametrize("load_buffers, ring", [(None, 4), (3, 3), (2, 2)])
def test_the_load_ring_keeps_its_buffers_in_flight_over_three_tiers(tiny_llama_model, tmp_path: Path, monkeypatch,
                                                                    load_buffers, ring):
    """With a disk tier the load ring has 4 buffers by default (where device_budget holds them), and keeps as many
    chunks in flight; the tokens stay DynamicCache's."""
    model, ps = tiny_llama_model, 4
    ids = prompt_ids(160)  # 46 pages a layer by the end: most of them on disk
    expected = reference(model, ids)
    pb = page_bytes(model, ps)
    # 24 device pages: a workspace of 8 pages' share, divided into 6 parts by default.
    opts = {"page_size": ps, "device_budget": 24 * pb, "host_budget": 4 * pb,
            "disk_dir": str(tmp_path / "kv"), "load_buffers": load_buffers}
    deepest, pump = [0], LoadRing.pump

    def pump_and_count(ring: LoadRing) -> None:
        pump(ring)
        deepest[0] = max(deepest[0], len(ring.inflight))

    monkeypatch.setattr(LoadRing, "pump", pump_and_count)
    with offload(model, **opts) as rt:
        assert rt.plan.load_buffers == ring and rt.ring_k.shape[0] == ring
        got = greedy(model, ids)
        stats = rt.stats()
    assert torch.equal(got, expected)
    assert stats["bytes_moved"]["disk->host"] > 0
    assert deepest[0] == ring
    assert os.listdir(opts["disk_dir"]) == []


# -- logits step by step, with chunked prefill --------------------------------------------------------------
@pytest.mark.parametrize(
    "which, chunks, opts_name, page_size",
    [
        (GQA2, (19, 6, 23), "roomy", 8),
        (GQA2, (19, 3, 26), "min-device", 8),  # the 3-token chunk only fills the open tail page
        (GQA2, (16, 16, 16), "min-device", 8),  # chunks end exactly on page boundaries
        (GQA2, (5, 30, 13), "three-tiers", 4),
        (GQA3, (19, 3, 26), "min-device", 8),
        (GQA3, (21, 27), "three-tiers", 5),
    ],
)
def test_logits_match_dynamic_cache_every_step(request: pytest.FixtureRequest, which, chunks, opts_name, page_size,
                                               tmp_path: Path):
    model = request.getfixturevalue(which)
    ids = prompt_ids(seed=3)
    steps = 20
    expected = stepwise_logits(model, ids, chunks, steps, DynamicCache(config=model.config))
    pb = page_bytes(model, page_size)
    opts = {"page_size": page_size}
    if opts_name == "min-device":
        opts.update(device_budget=min_device(model, page_size), host_budget="64MiB")
    elif opts_name == "three-tiers":
        opts.update(device_budget=min_device(model, page_size), host_budget=3 * pb, disk_dir=str(tmp_path))
    with offload(model, **opts) as rt:
        got = stepwise_logits(model, ids, chunks, steps, rt.cache())
        rt.table.check_invariants()
        stats = rt.stats()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    layers, kv_heads, head_dim = _dims(model)
    assert stats["tokens"] == {"prefill": sum(c for c in chunks if c > 1), "decode": steps, "reused": 0, "loaded": 0}
    assert stats["kv_bytes"] == layers * (PROMPT + steps) * 2 * kv_heads * head_dim * 4
    if opts_name == "three-tiers":
        assert all(stats["peak_resident_bytes"][t] > 0 for t in ("device", "host", "disk"))


def test_logits_with_autograd_enabled(tiny_llama_model):
    """Regression: a forward through `rt.cache()` outside `torch.no_grad()` failed with "index_select(): functions
    with out=... arguments don't support automatic differentiation": the runtime copied key/value states that
    require grad into its page pools in place, so the pools joined the autograd graph (now `Runtime.attend` runs
    under no_grad). Plain transformers with a DynamicCache runs the same forward with grad enabled."""
    model = tiny_llama_model
    ids = prompt_ids(seed=4)
    ps = 8
    with torch.no_grad():
        expected = stepwise_logits(model, ids, (30, 18), 4, DynamicCache(config=model.config))
    with offload(model, page_size=ps) as rt:  # every page stays on the device
        cache = rt.cache()
        got, pos = [], 0
        for c in (30, 18):
            got.append(model(ids[:, pos:pos + c], past_key_values=cache, use_cache=True).logits[0, -1].detach())
            pos += c
        for _ in range(4):
            token = got[-1].argmax().view(1, 1)
            got.append(model(token, past_key_values=cache, use_cache=True).logits[0, -1].detach())
    torch.testing.assert_close(torch.stack(got), expected, atol=1e-4, rtol=1e-4)


# -- statistics ------------------------------------------------------------------------------------------------
def test_stats_after_generate_through_three_tiers(tiny_llama_model, tmp_path: Path):
    model = tiny_llama_model
    ids = prompt_ids(seed=5)
    ps = 4
    pb = page_bytes(model, ps)
    opts = {"page_size": ps, "device_budget": min_device(model, ps), "host_budget": 4 * pb, "disk_dir": str(tmp_path)}
    with offload(model, **opts) as rt:
        greedy(model, ids)
        s = rt.stats()
    assert set(s["bytes_moved"]) == {"device->host", "host->device", "host->disk", "disk->host"}
    assert all(isinstance(v, int) and v >= 0 for v in s["bytes_moved"].values())
    assert all(v % pb == 0 for v in s["bytes_moved"].values())  # whole pages move
    for key in ("resident_bytes", "peak_resident_bytes"):
        assert set(s[key]) == {"device", "host", "disk"}
        assert all(s[key][t] <= s["budgets"][t] for t in ("device", "host", "disk")), s[key]
    assert s["tokens"] == {"prefill": PROMPT, "decode": NEW - 1, "reused": 0, "loaded": 0}
    layers, kv_heads, head_dim = _dims(model)
    assert s["kv_bytes"] == layers * (PROMPT + NEW - 1) * 2 * kv_heads * head_dim * 4
    # Exact mode predicts nothing: every page is needed, loaded ahead or not.
    assert s["prefetch"] is None
    assert set(s["loads"]) == {"needed", "predicted", "promoted"}
    assert s["loads"]["needed"] > 0 and s["loads"]["predicted"] == s["loads"]["promoted"] == 0
    assert s["loads"]["needed"] * pb <= s["bytes_moved"]["host->device"] + s["bytes_moved"]["disk->host"]
    assert isinstance(s["stall_seconds"], float) and s["stall_seconds"] >= 0.0
    assert len(s["stall_seconds_per_layer"]) == layers
    assert s["attended_fraction"] == 1.0
    assert s["page_size"] == ps and s["page_bytes"] == pb


def test_stats_count_every_generate_of_the_runtime(tiny_llama_model):
    model = tiny_llama_model
    ids = prompt_ids(seed=6)
    with offload(model, page_size=16) as rt:
        greedy(model, ids, new=5)
        greedy(model, ids[:, :20], new=3)
        s = rt.stats()
    assert s["tokens"] == {"prefill": PROMPT + 20, "decode": 4 + 2, "reused": 0, "loaded": 0}
    layers, kv_heads, head_dim = _dims(model)
    assert s["kv_bytes"] == layers * (20 + 2) * 2 * kv_heads * head_dim * 4  # the KV of the current sequence
    assert s["attended_fraction"] == 1.0


# -- the context manager -----------------------------------------------------------------------------------------
def test_exit_restores_the_model_and_removes_disk_files(tiny_llama_model, tmp_path: Path):
    model = tiny_llama_model
    ids = prompt_ids(seed=7)
    expected = reference(model, ids, 8)
    before = model_state(model)
    ps = 4
    opts = {"page_size": ps, "device_budget": min_device(model, ps), "host_budget": 2 * page_bytes(model, ps),
            "disk_dir": str(tmp_path)}
    with offload(model, **opts) as rt:
        assert model.config._attn_implementation == f"offload-{id(rt):x}"
        assert "generate" in model.__dict__
        assert torch.equal(greedy(model, ids, 8), expected)
        assert os.listdir(tmp_path) != []  # the disk tier was used
    assert model_state(model) == before
    assert os.listdir(tmp_path) == []
    assert torch.equal(greedy(model, ids, 8), expected)


def test_exit_restores_the_model_when_the_block_raises(tiny_llama_model, tmp_path: Path):
    model = tiny_llama_model
    ids = prompt_ids(seed=7)
    before = model_state(model)
    ps = 4
    opts = {"page_size": ps, "device_budget": min_device(model, ps), "host_budget": 2 * page_bytes(model, ps),
            "disk_dir": str(tmp_path)}
    with pytest.raises(RuntimeError, match="boom"):
        with offload(model, **opts):
            greedy(model, ids, 8)
            assert os.listdir(tmp_path) != []
            raise RuntimeError("boom")
    assert model_state(model) == before
    assert os.listdir(tmp_path) == []
    assert torch.equal(greedy(model, ids, 8), reference(model, ids, 8))


def test_generation_config_changed_inside_is_restored(tiny_llama_model):
    model = tiny_llama_model
    before = model.generation_config.to_dict()
    with offload(model):
        model.generation_config.max_new_tokens = 3
        model.generation_config.do_sample = True
    assert model.generation_config.to_dict() == before


def test_entering_twice_in_a_row_and_generating_twice_inside(tiny_gqa3_model):
    model = tiny_gqa3_model
    ids = prompt_ids(seed=8)
    expected = reference(model, ids)
    ps = 8
    opts = {"page_size": ps, "device_budget": min_device(model, ps), "host_budget": "64MiB"}
    for _ in range(2):
        with offload(model, **opts):
            assert torch.equal(greedy(model, ids), expected)
            assert torch.equal(greedy(model, ids), expected)  # a fresh cache per generate


def test_nested_offload_restores_the_outer_one(tiny_llama_model):
    model = tiny_llama_model
    ids = prompt_ids(seed=9)
    expected = reference(model, ids, 6)
    before = model_state(model)
    with offload(model, page_size=8) as outer:
        outer_impl = model.config._attn_implementation
        with offload(model, page_size=4):
            assert torch.equal(greedy(model, ids, 6), expected)
        assert model.config._attn_implementation == outer_impl
        assert torch.equal(greedy(model, ids, 6), expected)
        assert outer.stats()["tokens"]["prefill"] == PROMPT
    assert model_state(model) == before


def test_padding_of_one_sequence_is_refused(tiny_llama_model):
    model = tiny_llama_model
    ids = prompt_ids(seed=1)
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    with offload(model) as rt, torch.no_grad():
        with pytest.raises(ValueError, match="^attention_mask:"):
            model.generate(ids, attention_mask=padded, max_new_tokens=3)
        assert rt.stats()["tokens"]["decode"] == 0


def _generate_with_ids_passed(model, how: str, ids: torch.Tensor, new: int):
    """generate's prompt can be passed positionally, as input_ids=, or as inputs= (its parameter's name)."""
    with torch.no_grad():
        if how == "positional":
            return model.generate(ids, max_new_tokens=new, do_sample=False)
        return model.generate(**{how: ids}, max_new_tokens=new, do_sample=False)


HOW = ["positional", "input_ids", "inputs"]


@pytest.mark.parametrize("how", HOW)
def test_prompt_beyond_max_positions_is_refused_naming_prompt(tiny_llama_model, how):
    """`inputs=` is generate's own name for the prompt; passing it that way must be checked up front too."""
    model = tiny_llama_model
    limit = model.config.max_position_embeddings
    ids = prompt_ids(limit - 10, seed=1)
    with offload(model) as rt:
        with pytest.raises(ValueError) as e:
            _generate_with_ids_passed(model, how, ids, 11)
        assert str(e.value).startswith("prompt:") and str(limit) in str(e.value)
        # refused before anything ran
        assert rt.stats()["tokens"] == {"prefill": 0, "decode": 0, "reused": 0, "loaded": 0}
        with pytest.raises(ValueError, match="^prompt:"):
            _generate_with_ids_passed(model, how, prompt_ids(limit + 1, seed=1), 1)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("with_disk", [False, True], ids=["no-disk", "disk"])
def test_budgets_too_small_for_the_kv_are_refused_before_generating(tiny_llama_model, tmp_path: Path, with_disk,
                                                                    how):
    model = tiny_llama_model
    ps = 4
    pb = page_bytes(model, ps)
    opts = {"page_size": ps, "device_budget": min_device(model, ps), "host_budget": 3 * pb}
    if with_disk:
        opts.update(disk_dir=str(tmp_path), disk_budget=2 * pb)
    ids = prompt_ids(seed=1)
    with offload(model, **opts) as rt:
        with pytest.raises(ValueError) as e:
            _generate_with_ids_passed(model, how, ids, 8)
        msg = str(e.value)
        assert ("disk_budget" if with_disk else "host_budget") in msg, msg
        if not with_disk:
            assert "disk_dir" in msg
        s = rt.stats()
        assert s["tokens"] == {"prefill": 0, "decode": 0, "reused": 0, "loaded": 0} and s["kv_bytes"] == 0
        assert s["bytes_moved"] == dict.fromkeys(s["bytes_moved"], 0)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra", [0, 1], ids=["min-device", "min-device+1page"])
def test_budgets_that_fit_exactly_are_enough(model, tmp_path: Path, extra):
    """Every page lives in exactly one tier, so a budget whose device cache + host + disk pages equal the KV's pages
    (what check_capacity accepts) must be enough.

    Bug (extra=1): Runtime._store_prefill keeps at most `device_tier.capacity // layers` pages per layer on the
    device, so when the device cache is not a multiple of the layer count, `capacity % layers` device slots stay
    empty during prefill, the lower tiers run out, and prefill fails with "budgets: the KV no longer fits ..."
    after check_capacity said it fits."""
    layers, _, _ = _dims(model)
    ps = 4
    pb = page_bytes(model, ps)
    ids = prompt_ids(47, seed=10)
    new = 1
    need = layers * -(-(47 + new) // ps)  # 12 pages per layer, all of them written by the prefill
    opts = {"page_size": ps, "device_budget": min_device(model, ps) + extra * pb}
    cache = plan_budgets(OffloadConfig(**opts), pb, layers, -(-model.config.max_position_embeddings // ps),
                         torch.device("cpu")).device_cache_pages
    assert cache == layers + extra
    host_pages = 5
    opts.update(host_budget=host_pages * pb, disk_dir=str(tmp_path), disk_budget=(need - cache - host_pages) * pb)
    expected = reference(model, ids, new)
    with offload(model, **opts) as rt:
        assert rt.plan.capacity_pages() == need
        assert torch.equal(greedy(model, ids, new), expected)


def test_options_and_config_are_checked_on_entry(tiny_llama_model):
    model = tiny_llama_model
    before = model_state(model)
    with pytest.raises(ValueError, match="^page_sise: unknown option"):
        with offload(model, page_sise=8):
            pass
    with pytest.raises(ValueError, match="^config:"):
        with offload(model, OffloadConfig(), page_size=8):
            pass
    with pytest.raises(ValueError, match="^device_budget:"):
        with offload(model, device_budget=1):
            pass
    assert model_state(model) == before


def test_forward_without_the_offloaded_cache_inside_the_block_is_plain(tiny_llama_model):
    model = tiny_llama_model
    ids = prompt_ids(seed=11)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    with offload(model, page_size=8) as rt, torch.no_grad():
        got = model(ids, use_cache=False).logits
        # the runtime was not involved
        assert rt.stats()["tokens"] == {"prefill": 0, "decode": 0, "reused": 0, "loaded": 0}
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_padded_forward_without_the_offloaded_cache_inside_the_block_is_plain(tiny_llama_model):
    """Bug: the attention implementation registered by `offload()` has no mask function, so transformers builds no
    attention mask for it, and the plain-attention fallback in offload/attention.py runs SDPA with
    attention_mask=None: a padding mask passed to a forward without the offloaded cache is silently dropped."""
    model = tiny_llama_model
    ids = prompt_ids(seed=12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits[0, 5:]
    with offload(model, page_size=8), torch.no_grad():
        got = model(ids, attention_mask=mask, use_cache=False).logits[0, 5:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_forward_with_a_dynamic_cache_inside_the_block_is_plain(tiny_llama_model):
    """Bug: with another Cache object (here a DynamicCache) the fallback to plain SDPA gets no mask (see above) and
    uses is_causal=True, which SDPA aligns top-left: a prefill chunk after earlier tokens (18 queries over 48 keys)
    then hides keys it must see. The first chunk and single-token decode steps happen to be right."""
    model = tiny_llama_model
    ids = prompt_ids(seed=13)
    expected = stepwise_logits(model, ids, (30, 18), 3, DynamicCache(config=model.config))
    with offload(model, page_size=8) as rt:
        got = stepwise_logits(model, ids, (30, 18), 3, DynamicCache(config=model.config))
        assert rt.stats()["tokens"] == {"prefill": 0, "decode": 0, "reused": 0, "loaded": 0}
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_generate_with_use_cache_false_inside_the_block(tiny_llama_model):
    """Bug: `generate(..., use_cache=False)` inside the block still gets `past_key_values=runtime.cache()` injected
    by the generate wrapper (offload/context.py). transformers then feeds the whole sequence at every step while the
    offloaded cache keeps every earlier feed, so the runtime stores 48+49+...+53 tokens and the logits differ.
    Acceptable: the plain model's logits, or a ValueError naming use_cache; not different numbers."""
    model = tiny_llama_model
    ids = prompt_ids(seed=14)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=False, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
    with offload(model, page_size=8) as rt, torch.no_grad():
        try:
            got = model.generate(ids, **kwargs)
        except ValueError as e:
            assert str(e).startswith("use_cache"), str(e)
            return
        stored = rt.stats()["kv_bytes"]
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)
    assert stored <= _dims(model)[0] * (PROMPT + 6) * 2 * 2 * 16 * 4
