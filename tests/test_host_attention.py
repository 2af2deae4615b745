"""Attention on the host over host-resident pages (offload/host_attention.py): the kernel against the reference,
the cost model with given rates, and generation with the host attending, against DynamicCache.

On a CPU-only machine the host's thread pool is a second pool beside the "device" (the calling thread), so the
split, the merge of the two partials and the reading of disk pages into host memory all run here as they do on a
GPU machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import faults
from offload import attention_math as am
from offload import offload
from offload.host_attention import MIN_GAIN, HostAttention, Rates, split, step_seconds
from offload.quant import PageCodec
from test_architectures import min_device, page_bytes, prompt_ids, stepwise_logits, tiny
from test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("torch_one_thread")

H, P, D = 2, 16, 32
GPU = Rates(link=25e9, host=100e9, device=float("inf"), overhead=50e-6, concurrent=True)


# ---- the kernel ----------------------------------------------------------------------------------------------------


def _pool(n: int = 40, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, H, P, D, generator=g).to(dtype)
    v = torch.randn(n, H, P, D, generator=g).to(dtype)
    q = torch.randn(H, 6, D, generator=g)  # 3 query heads per KV head, 2 tokens
    return q, k, v


def _merged(parts) -> torch.Tensor:
    return am.merge(parts)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_host_partial_equals_the_reference_over_the_same_pages(dtype, tol, softcap) -> None:
    q, k, v = _pool(dtype=dtype)
    rows = torch.tensor([3, 17, 0, 39, 8, 22, 5, 11, 30, 2, 14])  # any order, several chunks
    ha = HostAttention(H, P, D, dtype, torch.device("cpu"), threads=3)
    ha.attach(k, v)
    parts = ha.submit(q, rows, 0.2, softcap).result()
    assert len(parts) == 2  # 11 pages, at least 4 per chunk
    ref_o, ref_lse = am.pages_partial(q, k[rows], v[rows], 0.2, softcap)
    torch.testing.assert_close(_merged(parts), ref_o, atol=tol, rtol=tol)
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)
    assert ha.counts == {"jobs": 1, "pages": 11, "bytes": 11 * ha.full_page_bytes}
    ha.close()


def test_host_partial_masks_keys_per_head_and_row() -> None:
    """Sparse mode's mask (per page, head, query row and key) hides exactly those keys."""
    q, k, v = _pool()
    rows = torch.arange(0, 40, 3)
    hidden = torch.rand(rows.numel(), H, q.shape[1], P, generator=torch.Generator().manual_seed(1)) < 0.5
    hidden[..., 0] = False  # every row sees a key of every page
    ha = HostAttention(H, P, D, torch.float32, torch.device("cpu"), threads=2)
    ha.attach(k, v)
    got = _merged(ha.submit(q, rows, 0.2, hidden=hidden).result())
    torch.testing.assert_close(got, am.pages_partial(q, k[rows], v[rows], 0.2, None, hidden)[0])
    ha.close()


def test_host_partial_over_packed_pages_equals_attention_over_the_unpacked_ones() -> None:
    q, k, v = _pool()
    codec = PageCodec.of("k8v4", H, P, D)
    kq, vq = codec.encode(k, v)
    ha = HostAttention(H, P, D, torch.float32, torch.device("cpu"), codec=codec, threads=2)
    ha.attach(kq, vq)
    rows = torch.tensor([1, 4, 9, 16, 25, 36, 2, 7])
    ku, vu = codec.decode(kq[rows], vq[rows], torch.float32)
    torch.testing.assert_close(_merged(ha.submit(q, rows, 0.2).result()), am.pages_partial(q, ku, vu, 0.2)[0],
                               atol=1e-5, rtol=1e-5)
    assert ha.counts["bytes"] == rows.numel() * codec.page_bytes
    ha.close()


def test_measured_rates_are_positive_and_leave_no_count() -> None:
    ha = HostAttention(H, P, D, torch.float32, torch.device("cpu"), threads=2)
    rate, overhead = ha.measure(pages=16, repeats=2)
    assert rate > 0 and overhead > 0 and ha.counts == {"jobs": 0, "pages": 0, "bytes": 0}
    ha.close()


# ---- the cost model ------------------------------------------------------------------------------------------------


def test_off_and_all_take_none_and_every_page() -> None:
    assert split("off", 50, 10, 1, 1, GPU) == 0
    assert split("all", 50, 10, 1, 1, None) == 50
    assert split("auto", 0, 10, 1, 1, GPU) == 0
    with pytest.raises(ValueError, match="^rates:"):
        split("auto", 5, 0, 1, 1, None)


def test_auto_on_a_gpu_balances_the_link_and_the_host() -> None:
    """Host 4x the link, overlapping: the host takes about 4/5 of the pages, and the two sides end together."""
    page = 1 << 20
    k = split("auto", 1000, 100, page, page, GPU)
    assert k == 799 or k == 800
    moved, host = (1000 - k) * page / GPU.link, GPU.overhead + k * page / GPU.host
    assert abs(moved - host) <= page / GPU.link  # within one page of each other
    # The step is then 1.25x faster than moving everything ... and than the host alone.
    assert step_seconds(1000, 0, 100, page, page, GPU) / step_seconds(1000 - k, k, 100, page, page, GPU) > 4.9


def test_auto_keeps_a_few_small_pages_on_the_link() -> None:
    """A job's fixed cost outweighs what the host would save on two small pages."""
    assert split("auto", 2, 0, 4096, 4096, GPU) == 0


def test_auto_on_a_cpu_only_machine_is_all_or_nothing() -> None:
    """Sharing the cores, the two sides add up: whichever moves a page for less takes them all."""
    slow_host = Rates(link=15e9, host=3e9, device=6e9, overhead=2e-4, concurrent=False)
    fast_host = Rates(link=15e9, host=12e9, device=6e9, overhead=2e-4, concurrent=False)
    assert split("auto", 400, 20, 24576, 24576, slow_host) == 0
    assert split("auto", 400, 20, 24576, 24576, fast_host) == 400


@settings(max_examples=200, deadline=None)
@given(pages=st.integers(0, 5000), resident=st.integers(0, 5000), page=st.integers(1, 1 << 22),
       link=st.floats(1e8, 1e12), host=st.floats(1e8, 1e12), device=st.floats(1e8, 1e13) | st.just(math.inf),
       overhead=st.floats(0, 1e-2), concurrent=st.booleans())
def test_auto_takes_the_fastest_split_or_none(pages, resident, page, link, host, device, overhead,
                                              concurrent) -> None:
    rates = Rates(link=link, host=host, device=device, overhead=overhead, concurrent=concurrent)
    k = split("auto", pages, resident, page, page, rates)
    assert 0 <= k <= pages

    def cost(j: int) -> float:
        return step_seconds(pages - j, j, resident, page, page, rates)

    best = min(cost(j) for j in range(pages + 1)) if pages <= 200 else min(
        cost(j) for j in {0, pages, *range(max(0, k - 3), min(pages, k + 3) + 1)})
    if k:
        assert cost(k) <= best * (1 + 1e-9) + 1e-15 and cost(k) < (1 - MIN_GAIN) * cost(0)
    else:
        assert best >= (1 - MIN_GAIN) * cost(0) * (1 - 1e-9) - 1e-15


# ---- generation: the tokens of DynamicCache ------------------------------------------------------------------------


def _reference(model, ids, steps: int) -> torch.Tensor:
    return stepwise_logits(model, ids, (ids.shape[1],), steps, DynamicCache(config=model.config))


def _offloaded(model, ids, steps: int, **options):
    with offload(model, **options) as rt:
        logits = stepwise_logits(model, ids, (ids.shape[1],), steps, rt.cache())
        return logits, rt.stats(), rt


def _tiers(model, tmp_path: Path | None, host_pages: int = 3, **more) -> dict:
    options = {"page_size": 8, "device_budget": min_device(model), "host_budget": host_pages * page_bytes(model),
               **more}
    if tmp_path is not None:
        options["disk_dir"] = str(tmp_path / "kv")
    return options


@pytest.mark.parametrize("disk", [False, True])
def test_all_host_pages_attended_on_the_host_give_the_tokens_of_dynamic_cache(tmp_path: Path, disk: bool) -> None:
    """Exact mode: every page below the device is attended on the host (none crosses to the device), over device
    and host, and over three tiers (disk pages read into host memory)."""
    model = tiny("llama")
    ids = prompt_ids(100)
    ref = _reference(model, ids, 20)
    options = _tiers(model, tmp_path if disk else None, host_pages=3 if disk else 60, host_attention="all")
    got, stats, rt = _offloaded(model, ids, 20, **options)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    host = stats["host_attention"]
    assert host["pages"] > 0
    assert stats["bytes_moved"]["host->device"] == 0  # no page crossed: only partials
    assert stats["loads"]["needed"] == 0
    if disk:
        assert stats["bytes_moved"]["disk->host"] > 0
        assert not any((tmp_path / "kv").iterdir())


def test_off_attends_nothing_on_the_host(tmp_path: Path) -> None:
    model = tiny("llama")
    ids = prompt_ids(100)
    got, stats, _ = _offloaded(model, ids, 5, **_tiers(model, tmp_path, host_attention="off"))
    assert stats["host_attention"]["pages"] == 0 and stats["host_attention"]["threads"] == 0
    assert stats["bytes_moved"]["host->device"] > 0


def test_auto_splits_each_layer_as_the_cost_model_says() -> None:
    """With given rates (a host 4x the link, overlapping), each layer's host pages are split as `split` says,
    the rest cross the link, and the tokens stay those of DynamicCache."""
    model = tiny("llama")
    ids = prompt_ids(150)
    ref = _reference(model, ids, 6)
    options = _tiers(model, None, host_pages=60, host_attention="auto")
    rates = Rates(link=1e9, host=4e9, device=math.inf, overhead=1e-7, concurrent=True)  # for 2 KiB pages
    with offload(model, **options) as rt:
        rt.host_rates = rates
        got = stepwise_logits(model, ids, (ids.shape[1],), 6, rt.cache())
        stats = rt.stats()
        checked = 0
        for layer, view in enumerate(rt.decoder.views):
            host = view.host + (view.host_attend.numel() if view.host_attend is not None else 0)
            want = split("auto", host, view.count + (host - view.host) - host, rt.host_attention.page_bytes,
                         rt.host_attention.full_page_bytes, rates)
            assert (view.host_attend.numel() if view.host_attend is not None else 0) == want
            assert 0 < want < host
            checked += 1
    assert checked == model.config.num_hidden_layers
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert stats["bytes_moved"]["host->device"] > 0 and stats["host_attention"]["pages"] > 0
    assert stats["host_attention"]["rates"]["concurrent"] is True


@torch.no_grad()
def _forced(model, ids: torch.Tensor, tokens: torch.Tensor, cache) -> torch.Tensor:
    """The last-position logits of a prefill of `ids` and of decode steps feeding `tokens` one by one."""
    logits = [model(ids, past_key_values=cache, use_cache=True).logits[0, -1]]
    for t in tokens.tolist():
        logits.append(model(torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(logits).float()


def test_bfloat16_logits_stay_within_bf16_rounding(tmp_path: Path) -> None:
    """bf16 pages: decoding the same tokens, each logit within bf16 rounding of DynamicCache's, and each greedy
    token DynamicCache's unless its top two logits lie within that rounding."""
    model = tiny("llama").to(torch.bfloat16)
    try:
        ids = prompt_ids(100)
        options = _tiers(model, tmp_path, host_attention="all")
        options["device_budget"], options["host_budget"] = options["device_budget"] // 2, options["host_budget"] // 2
        tokens = _reference(model, ids, 20).argmax(-1)[:-1]
        ref = _forced(model, ids, tokens, DynamicCache(config=model.config))
        with offload(model, **options) as rt:
            got = _forced(model, ids, tokens, rt.cache())
            assert rt.stats()["host_attention"]["pages"] > 0
        tol = 8 * 2.0 ** -8 * ref.abs().amax(-1, keepdim=True)  # a few roundings of the largest logit
        assert bool(((got - ref).abs() <= tol).all()), (got - ref).abs().max()
        top2 = ref.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 2 * tol[:, 0]
        assert decided.sum() >= 10
        assert torch.equal(got.argmax(-1)[decided], ref.argmax(-1)[decided])
    finally:
        model.float()


def test_sparse_mode_attends_the_chosen_host_pages_on_the_host(tmp_path: Path) -> None:
    """The selected pages below the device are attended on the host: the same tokens as with none, and no page
    crosses to the device."""
    model = tiny("llama")
    ids = prompt_ids(150)
    base = dict(attention="sparse", token_budget=0.3, dense_layers=0)
    off, _, _ = _offloaded(model, ids, 10, **_tiers(model, tmp_path, host_attention="off", **base))
    on, stats, _ = _offloaded(model, ids, 10, **_tiers(model, tmp_path, host_attention="all", **base))
    assert torch.equal(on.argmax(-1), off.argmax(-1))
    torch.testing.assert_close(on, off, atol=1e-4, rtol=1e-4)
    assert stats["host_attention"]["pages"] > 0
    assert stats["loads"]["needed"] == 0 and stats["loads"]["predicted"] == 0


def test_windows_and_soft_capping_keep_the_tokens_of_dynamic_cache(tmp_path: Path) -> None:
    """Gemma 2: sliding layers attend on the device; its full layer's host pages on the host, soft-capped."""
    model = tiny("gemma2")
    ids = prompt_ids(100)
    ref = _reference(model, ids, 12)
    got, stats, _ = _offloaded(model, ids, 12, **_tiers(model, tmp_path, host_attention="all"))
    assert stats["host_attention"]["pages"] > 0
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_a_damaged_disk_page_read_for_the_host_is_rebuilt(tmp_path: Path) -> None:
    """A disk page that comes back flipped on its way to the host is recomputed: the tokens stay DynamicCache's."""
    model = tiny("llama")
    ids = prompt_ids(100)
    ref = _reference(model, ids, 6)
    with offload(model, **_tiers(model, tmp_path, host_attention="all")) as rt:
        cache = rt.cache()
        with torch.no_grad():
            logits = [model(ids, past_key_values=cache, use_cache=True).logits[0, -1]]
            t = rt.table
            only = (t.slot["disk"][0] >= 0) & (t.slot["host"][0] < 0) & (t.slot["device"][0] < 0)
            slot = int(t.slot["disk"][0, int(only.nonzero()[0, 0])])
            faults.flip(rt.disk_tier.path, slot * rt.disk_tier.slot_bytes + 40)
            for _ in range(6):
                token = logits[-1].argmax().view(1, 1)
                logits.append(model(token, past_key_values=cache, use_cache=True).logits[0, -1])
        stats = rt.stats()
    assert torch.equal(torch.stack(logits).argmax(-1), ref.argmax(-1))
    assert stats["faults"]["damaged"] >= 1 and stats["host_attention"]["pages"] > 0


def test_host_attention_has_its_own_track_in_the_trace(tmp_path: Path) -> None:
    model = tiny("llama")
    _, _, rt = _offloaded(model, prompt_ids(100), 4, **_tiers(model, tmp_path, host_attention="all", trace=True))
    spans = rt.tracer.spans("host attention")
    assert spans and all(s.args["pages"] > 0 for s in spans)


def test_the_command_line_takes_host_attention(capsys, tiny_model_dir, tmp_path: Path) -> None:
    kv = tmp_path / "kv"
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "the cat sat " * 30,
                             "--max-new-tokens", "4", "--device-budget", "96KiB", "--host-budget", "16KiB",
                             "--disk-dir", str(kv), "--page-size", "16", "--host-attention", "all", "--stats")
    assert code == 0, err
    assert not kv.exists() or not any(kv.iterdir())
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "hi",
                           "--host-attention", "some")
    assert code == 2
    assert_one_line_error(err, "host_attention", "--host-attention")
