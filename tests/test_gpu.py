"""GPU-only paths: pinned host pool, copy streams and events, disk -> pinned staging -> GPU. Skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from offload import offload
from offload.engine import TransferEngine
from offload.models import tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model(dtype: torch.dtype = torch.float32):
    return tiny_llama(layers=3, hidden=96, heads=6, kv_heads=2, vocab=256, dtype=dtype).cuda()


def _page_bytes(model, page_size: int) -> int:
    c = model.config
    return 2 * c.num_key_value_heads * page_size * (c.hidden_size // c.num_attention_heads) * model.dtype.itemsize


@pytest.mark.parametrize("attention", ["exact", "sparse"])
def test_three_tiers_on_cuda_give_the_same_tokens(tmp_path, attention: str) -> None:
    model = _model()
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    pb = _page_bytes(model, 16)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        with offload(model, page_size=16, device_budget=12 * pb, host_budget=20 * pb, disk_dir=str(tmp_path),
                     attention=attention, token_budget=1.0) as rt:
            out = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
            stats = rt.stats()
            assert rt.host_tier is not None and rt.host_tier.k.is_pinned()
    assert torch.equal(out, ref)
    assert stats["peak_resident_bytes"]["device"] <= 12 * pb
    assert stats["peak_resident_bytes"]["host"] <= 20 * pb
    assert stats["peak_resident_bytes"]["disk"] > 0
    assert stats["bytes_moved"]["disk->host"] > 0 and stats["bytes_moved"]["host->device"] > 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["around-generate", "around-offload"])
def test_inference_mode_on_cuda_with_pages_on_host_and_disk(tmp_path, where: str) -> None:
    """Bug: under torch.inference_mode() the copies on I/O threads (disk -> pinned staging) and into pools
    allocated inside the mode failed with "Inplace update to inference tensor outside InferenceMode"."""
    from transformers import DynamicCache

    model = _model()
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    pb = _page_bytes(model, 16)
    options = dict(page_size=16, device_budget=12 * pb, host_budget=20 * pb, disk_dir=str(tmp_path))
    with torch.inference_mode():
        ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=16,
                             min_new_tokens=16, do_sample=False)
    if where == "around-generate":
        with offload(model, **options) as rt:
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            stats = rt.stats()
    else:
        with torch.inference_mode(), offload(model, **options) as rt:
            out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
            stats = rt.stats()
    assert stats["bytes_moved"]["disk->host"] > 0
    assert torch.equal(out, ref)
    assert os.listdir(tmp_path) == []


def test_bf16_logits_match_dynamic_cache_within_bf16_tolerance() -> None:
    from transformers import DynamicCache

    model = _model(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 200), device="cuda")
    pb = _page_bytes(model, 16)
    with torch.no_grad():
        ref = model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits[:, -1].float()
        with offload(model, page_size=16, device_budget=10 * pb, host_budget="64MiB") as rt:
            cache = rt.cache()
            model(input_ids=ids[:, :-1], past_key_values=cache)
            got = model(input_ids=ids[:, -1:], past_key_values=cache).logits[:, -1].float()
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)


def test_host_to_device_copies_run_on_a_side_stream_and_land_exactly() -> None:
    engine = TransferEngine(torch.device("cuda"), threads=2, tracer=None)
    src_k = torch.randn(8, 2, 16, 32).pin_memory()
    src_v = torch.randn(8, 2, 16, 32).pin_memory()
    dst_k = torch.full((8, 2, 16, 32), float("nan"), device="cuda")
    dst_v = torch.full_like(dst_k, float("nan"))
    t = engine.copy("host->device", (src_k, src_v), [5, 6, 7, 1], (dst_k, dst_v), [0, 1, 2, 3])
    assert engine.h2d != torch.cuda.current_stream()
    t.wait()  # orders the compute stream after the copy
    torch.testing.assert_close(dst_k[:4].cpu(), src_k[[5, 6, 7, 1]], atol=0, rtol=0)
    torch.testing.assert_close(dst_v[:4].cpu(), src_v[[5, 6, 7, 1]], atol=0, rtol=0)
    assert torch.isnan(dst_k[4:]).all()
    assert engine.bytes_moved["host->device"] == 4 * 2 * src_k[0].numel() * 4
    engine.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_decode_over_device_and_pinned_host_gives_the_same_tokens(dtype: torch.dtype) -> None:
    """Without a disk tier the CUDA decode step runs the Triton kernels: the gather of host pages ahead of each
    layer on a side stream, and paged decode over device pages in place."""
    from transformers import DynamicCache

    from offload.decode import KernelDecode

    model = _model(dtype)
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=DynamicCache())
    pb = _page_bytes(model, 16)
    kv = 3 * 19 * pb + 3 * pb
    with offload(model, page_size=16, device_budget=int(0.3 * kv) + 8 * pb, host_budget=kv) as rt:
        assert isinstance(rt.decoder, KernelDecode)
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=24, do_sample=False)
        stats = rt.stats()
    assert stats["resident_bytes"]["host"] > 0 and stats["loads"]["needed"] > 0
    if dtype == torch.float32:
        assert torch.equal(got, plain)
    else:  # bf16: another summation order may flip a near-tie late in the sequence
        assert torch.equal(got[:, :310], plain[:, :310])


def _kernel_budgets(model, pages: int, batch: int, host_pages: int, **options) -> tuple[int, int]:
    """Device and host budgets: at least `pages` device pages, as many as the kernels' workspace needs to leave
    an open page per layer and sequence of a batch of `batch` on the device, and two more; `host_pages` host pages
    beside the staging a disk tier sets aside on CUDA."""
    from offload import OffloadConfig
    from offload.budgets import plan_budgets

    c, pb = model.config, _page_bytes(model, options["page_size"])
    max_pages = -(-c.max_position_embeddings // options["page_size"])
    for n in range(pages, pages + 8 * max_pages * c.num_hidden_layers):
        config = OffloadConfig(**{**options, "device_budget": n * pb, "host_budget": 1 << 40})
        plan = plan_budgets(config, pb, c.num_hidden_layers, max_pages, torch.device("cuda"), kernels=True)
        if plan.device_cache_pages >= c.num_hidden_layers * batch + 2:
            return n * pb, (host_pages + plan.host_staging_pages) * pb
    raise AssertionError("no device budget found")


@pytest.mark.parametrize("attention", ["exact", "sparse"])
@pytest.mark.parametrize("disk", [False, True], ids=["device-host", "three-tiers"])
def test_a_ragged_batch_on_the_kernels_gives_the_tokens_of_its_reference(attention: str, disk: bool, tmp_path,
                                                                         monkeypatch) -> None:
    """A batch of left-padded prompts of different lengths on CUDA: the sequences taking the plain step attend in
    one launch, device pages (sparse: each head's chosen blocks) in place and host ones read in place from the
    pinned host pool. Over three tiers the pages on disk stream through the load ring's own rows, one request for
    the batch, and merge with that launch's partials. The greedy tokens are DynamicCache's (exact), or those of
    every row running alone (sparse), sequence by sequence."""
    from transformers import DynamicCache

    from offload.decode import KernelDecode
    from offload.runtime import Runtime

    model = _model()
    lengths = [300, 170, 45, 233]
    ids = torch.zeros((4, max(lengths)), dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, ids.shape[1] - n:] = torch.randint(3, 256, (n,), device="cuda")
        mask[b, ids.shape[1] - n:] = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    pb = _page_bytes(model, 16)
    kv = 3 * (sum(-(-(n + 24) // 16) for n in lengths)) * pb
    options = dict(page_size=16, attention=attention, token_budget=48, select_block=8, dense_layers=1)
    if disk:
        options["disk_dir"] = str(tmp_path / "kv")
    # 30% of the KV on the device (or more, where the kernels' workspace would leave the device tier less than an
    # open page per layer and sequence); on the host the rest, or with a disk tier 8 pages (the rest on disk)
    options["device_budget"], options["host_budget"] = _kernel_budgets(
        model, int(0.3 * kv) // pb + 16, len(lengths), 8 if disk else kv // pb, **options)
    name = "exact_ragged" if attention == "exact" else "sparse_batch"
    with torch.no_grad():
        if attention == "exact":
            plain = model.generate(ids, past_key_values=DynamicCache(), **kwargs)
        else:
            monkeypatch.setattr(Runtime, "batch_step", False)
            with offload(model, **options):
                plain = model.generate(ids, **kwargs)
            monkeypatch.setattr(Runtime, "batch_step", True)
    calls = []
    with offload(model, **options) as rt:
        assert isinstance(rt.decoder, KernelDecode)
        step = getattr(rt.decoder, name)
        setattr(rt.decoder, name,
                lambda *a, **kw: calls.append((len(a[1]), kw.get("partial", False))) or step(*a, **kw))
        with torch.no_grad():
            got = model.generate(ids, **kwargs)
        stats = rt.stats()
    assert stats["peak_resident_bytes"]["host"] > 0 and (stats["peak_resident_bytes"]["disk"] > 0) == disk
    assert max(n for n, _ in calls) == len(lengths) if attention == "exact" else max(n for n, _ in calls) > 1
    assert any(partial for _, partial in calls) == disk  # sequences with pages on disk, in the batch's step
    for b in range(len(lengths)):
        assert torch.equal(got[b], plain[b]), f"sequence {b}"


@pytest.mark.parametrize("disk", [False, True])
def test_packed_host_pages_on_cuda_give_the_tokens_of_the_cpu(tmp_path, disk: bool) -> None:
    """kv_quant on CUDA: pages packed on the GPU on their way down, unpacked by the dequantizing gathers on their way
    up (the decode step's without a disk tier, the streaming path's loads with one). The same packed bytes and the
    same placement as on the CPU, unpacked the same: the CPU run's tokens."""
    import copy

    model = _model()
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    pb = _page_bytes(model, 16)
    opts = dict(page_size=16, device_budget=24 * pb, host_budget=(6 if disk else 60) * pb, kv_quant="k8v4")
    if disk:
        opts["disk_dir"] = str(tmp_path)
    outs = []
    with torch.no_grad():
        for m, x in ((model, ids), (copy.deepcopy(model).cpu(), ids.cpu())):
            with offload(m, **opts) as rt:
                outs.append(m.generate(x, max_new_tokens=16, min_new_tokens=16, do_sample=False).cpu())
                stats = rt.stats()
                assert stats["resident_bytes"]["disk" if disk else "host"] > 0
                assert stats["bit_exact"] is False and stats["compression"] > 3
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("mode,disk", [("all", False), ("auto", False), ("all", True)])
def test_host_attention_on_cuda_gives_the_tokens_of_dynamic_cache(tmp_path, mode: str, disk: bool) -> None:
    """The host attends over pinned host pages (and disk pages read into host memory) while the GPU attends over
    the rest, only partials crossing: the tokens of DynamicCache. "auto" with rates that give the host 4/5 of them."""
    from transformers import DynamicCache

    from offload.decode import KernelDecode
    from offload.host_attention import Rates

    model = _model()
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=DynamicCache())
    pb = _page_bytes(model, 16)
    kv = 3 * 19 * pb + 3 * pb
    options = dict(page_size=16, device_budget=int(0.3 * kv) + 8 * pb, host_budget=kv, host_attention=mode)
    if disk:
        options.update(host_budget=8 * pb, disk_dir=str(tmp_path))
    with offload(model, **options) as rt:
        assert isinstance(rt.decoder, KernelDecode) != disk
        if mode == "auto":
            rt.host_rates = Rates(link=1e9, host=4e9, device=float("inf"), overhead=1e-7, concurrent=True)
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=24, do_sample=False)
        stats = rt.stats()
    assert torch.equal(got, plain)
    assert stats["host_attention"]["pages"] > 0
    if mode == "all":
        assert stats["bytes_moved"]["host->device"] == 0
    else:
        assert stats["bytes_moved"]["host->device"] > 0
    assert not disk or os.listdir(tmp_path) == []
