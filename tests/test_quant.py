"""Quantized cold tiers (`kv_quant`): the page codec's error bounds, packed pages in the host and disk tiers, the
accounting of packed bytes, and the runtime's tokens and logits with and without it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload import offload
from offload.config import OffloadConfig
from offload.models import tiny_llama
from offload.quant import SETTINGS, PageCodec
from tiers import DiskTier, HostTier, PageShape

pytestmark = pytest.mark.usefixtures("torch_one_thread")

QUANTIZED = [name for name, bits in SETTINGS.items() if bits is not None]


# -- the codec ----------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(setting=st.sampled_from(QUANTIZED), heads=st.integers(1, 3), page=st.sampled_from([4, 8, 16]),
       dim=st.sampled_from([5, 8, 12, 16, 64]), n=st.integers(1, 3), scale=st.floats(1e-3, 100.0),
       shift=st.floats(-50, 50), outlier=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_stays_within_the_error_bound(setting, heads, page, dim, n, scale, shift, outlier, seed):
    """decode(encode(x)) is within half a scale step (plus float16 rounding of the scales) of x, everywhere, for
    keys per channel and values per token group; outlier channels widen only their own channel's step. (Values stay
    within float16's range, where the scales live.)"""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn((n, heads, page, dim), generator=g) * scale + shift
    v = torch.randn((n, heads, page, dim), generator=g) * scale - shift
    if outlier:
        k[..., 0] *= 50  # an outlier channel, as keys have
    codec = PageCodec.of(setting, heads, page, dim)
    kq, vq = codec.encode(k, v)
    assert kq.shape == (n, codec.k_bytes) and vq.shape == (n, codec.v_bytes) and kq.dtype == torch.uint8
    k2, v2 = codec.decode(kq, vq, torch.float32)
    bk, bv = codec.error_bound(k, v)
    assert bool(((k2 - k).abs() <= bk).all()), float(((k2 - k).abs() - bk).max())
    assert bool(((v2 - v).abs() <= bv).all()), float(((v2 - v).abs() - bv).max())
    if outlier and dim > 1:  # the other channels keep their own, finer step
        assert float(bk[..., 1:].max()) < float(bk[..., 0].min())


@pytest.mark.parametrize("setting", QUANTIZED)
def test_more_bits_mean_less_error_and_keys_get_more_than_values(setting):
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn((4, 2, 16, 32), generator=g), torch.randn((4, 2, 16, 32), generator=g)
    codec = PageCodec.of(setting, 2, 16, 32)
    k2, v2 = codec.decode(*codec.encode(k, v), torch.float32)
    k_bits, v_bits = SETTINGS[setting]
    assert k_bits >= v_bits
    # Error of uniform quantization halves with every bit: the mean error tracks the bits given.
    for err, bits in (((k2 - k).abs().mean(), k_bits), ((v2 - v).abs().mean(), v_bits)):
        assert float(err) < 4.0 / 2 ** bits


@pytest.mark.parametrize("setting", QUANTIZED)
@pytest.mark.parametrize("block", [4, 8, 16])
def test_blocks_decode_as_their_pages_do(setting, block):
    """decode_blocks(u) is tokens j*B..(j+1)*B-1 of head h of slot s in decode(), u = (s * H + h) * R + j."""
    H, P, D, S = 3, 16, 12, 5
    g = torch.Generator().manual_seed(1)
    codec = PageCodec.of(setting, H, P, D)
    kq, vq = codec.encode(torch.randn((S, H, P, D), generator=g), torch.randn((S, H, P, D), generator=g))
    k, v = codec.decode(kq, vq, torch.float32)
    R = P // block
    ids = torch.randint(0, S * H * R, (17,), generator=g)
    kb, vb = codec.decode_blocks(kq, vq, ids, block, torch.float32)
    assert torch.equal(kb, k.view(S * H * R, block, D)[ids])
    assert torch.equal(vb, v.view(S * H * R, block, D)[ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_k8v4_packs_pages_at_least_two_and_a_half_times_below_16_bit(dtype):
    """The layouts' sizes: codes of 8 and 4 bits plus float16 scales and minimums (a key's per channel over the
    page's tokens, a value's per token and head). Against 16-bit pages k8v4 stays at 2.5x where the head dimension
    is 128 (one value group a token and head); against float32 pages it is about twice that."""
    for heads, dim in ((3, 64), (8, 128)):
        codec = PageCodec.of("k8v4", heads, 64, dim)
        codes = heads * 64 * dim * (8 + 4) // 8
        assert codec.v_group == dim and codes < codec.page_bytes < codes * 1.1
        full = 2 * heads * 64 * dim * dtype.itemsize
        assert codec.ratio(dtype) == pytest.approx(full / codec.page_bytes)
    assert PageCodec.of("k8v4", 8, 64, 128).ratio(torch.bfloat16) >= 2.5
    assert PageCodec.of("k8v4", 3, 64, 64).ratio(torch.float32) >= 4.5


# -- packed pages in the tiers -------------------------------------------------------------------------------------
def _packed(setting: str = "k8v4") -> tuple[PageShape, PageCodec]:
    codec = PageCodec.of(setting, 2, 16, 12)
    shape = PageShape(2, 16, 12, torch.float32, packed=(codec.k_bytes, codec.v_bytes))
    return shape, codec


@pytest.mark.parametrize("kind", ["host", "disk"])
def test_packed_pages_round_trip_byte_for_byte_through_host_and_disk(kind, tmp_path):
    shape, codec = _packed()
    g = torch.Generator().manual_seed(2)
    kq, vq = codec.encode(torch.randn((3, *shape.dims), generator=g), torch.randn((3, *shape.dims), generator=g))
    tier = HostTier(shape, 6, pin=False) if kind == "host" else DiskTier(shape, 6, str(tmp_path))
    try:
        assert tier.page_bytes == codec.page_bytes < PageShape(2, 16, 12, torch.float32).page_bytes
        tier.write([4, 1, 2], kq, vq)
        k_out, v_out = torch.zeros_like(kq), torch.zeros_like(vq)
        tier.read([4, 1, 2], k_out, v_out)
        assert torch.equal(k_out, kq) and torch.equal(v_out, vq)
        if kind == "host":
            assert tier.k.shape == (6, codec.k_bytes) and tier.v.shape == (6, codec.v_bytes)
        else:  # K then V in each slot, each of its packed size
            raw = open(tier.path, "rb").read()
            at = 4 * tier.slot_bytes
            assert raw[at:at + codec.k_bytes] == kq[0].numpy().tobytes()
            assert raw[at + codec.k_bytes:at + codec.page_bytes] == vq[0].numpy().tobytes()
            with pytest.raises(ValueError, match="disk: expected CPU torch.uint8 pages"):
                tier.write([0], torch.zeros((1, *shape.dims)), torch.zeros((1, *shape.dims)))
    finally:
        tier.close()


# -- the runtime ---------------------------------------------------------------------------------------------------
MODEL = dict(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=3)
PAGE = 16
PAGE_BYTES = 2 * 2 * PAGE * 16 * 4  # float32, 2 KV heads, head_dim 16


@pytest.fixture(scope="module")
def model():
    return tiny_llama(**MODEL)


def _ids(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _stepwise(model, ids: torch.Tensor, prefill: int, **opts):
    """Prefill ids[:prefill], then feed the rest one token a step: every step's logits, and the stats."""
    with offload(model, page_size=PAGE, **opts) as rt, torch.no_grad():
        cache = rt.cache()
        out = [model(ids[:, :prefill], past_key_values=cache).logits[0, -1]]
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], past_key_values=cache).logits[0, -1])
        rt.table.check_invariants()
        return torch.stack(out), rt.stats()


def _reference(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        out = [model(ids[:, :prefill], past_key_values=cache).logits[0, -1]]
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], past_key_values=cache).logits[0, -1])
    return torch.stack(out)


def test_nothing_is_quantized_while_every_page_stays_on_the_device(model):
    """Resident pages and the open tail keep full precision: with room for the whole KV on the device, k4v2 gives
    DynamicCache's logits bit for bit, and moves nothing."""
    ids = _ids(120)
    got, s = _stepwise(model, ids, 100, kv_quant="k4v2", device_budget="4MiB", host_budget="1MiB")
    assert torch.equal(got, _reference(model, ids, 100))
    assert s["resident_bytes"]["host"] == 0 and s["bytes_moved"]["host->device"] == 0
    assert s["kv_quant"] == "k4v2" and s["bit_exact"] is False


def test_none_keeps_dynamic_cache_tokens_through_host_and_disk(model, tmp_path):
    """kv_quant="none" stores and moves pages as they are: with pages in host RAM and on disk, greedy generation
    gives DynamicCache's tokens, and the stats say the run was bit-exact."""
    from transformers import DynamicCache

    ids = _ids(300)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             past_key_values=DynamicCache())
        with offload(model, page_size=PAGE, kv_quant="none", device_budget=20 * PAGE_BYTES,
                     host_budget=8 * PAGE_BYTES, disk_dir=str(tmp_path)) as rt:
            out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            s = rt.stats()
    assert s["resident_bytes"]["disk"] > 0 and s["bit_exact"] is True and s["compression"] == 1.0
    assert torch.equal(out, ref)


@pytest.mark.parametrize("attention", ["exact", "sparse"])
def test_packed_host_pages_count_packed_bytes_and_stay_close_to_full_precision(model, attention):
    """Same budgets, none against k8v8 and k8v4: the same pages sit in host RAM, each packed (but the sink page of
    each layer, which kv_quant keeps on the device), so resident and moved bytes fall by the codec's ratio or
    more; kv_bytes stays the logical size; logits stay close to full precision's and the next tokens agree."""
    ids = _ids(420)
    opts = dict(attention=attention, device_budget=(20 if attention == "exact" else 40) * PAGE_BYTES,
                host_budget="1MiB", token_budget=64, sink_tokens=16, recent_tokens=16, dense_layers=0)
    base, s0 = _stepwise(model, ids, 380, **opts)
    assert s0["bit_exact"] is (attention == "exact") and s0["compression"] == 1.0
    for setting, tol in (("k8v8", 0.02), ("k8v4", 0.1)):
        got, s = _stepwise(model, ids, 380, kv_quant=setting, **opts)
        ratio = PAGE_BYTES / PageCodec.of(setting, 2, PAGE, 16).page_bytes
        assert s["compression"] == pytest.approx(ratio) and s["bit_exact"] is False
        assert s["kv_bytes"] == s0["kv_bytes"]
        packed = PageCodec.of(setting, 2, PAGE, 16).page_bytes
        assert s0["resident_bytes"]["host"] > 0 and s["resident_bytes"]["host"] % packed == 0
        held, held0 = s["resident_bytes"]["host"] // packed, s0["resident_bytes"]["host"] // PAGE_BYTES
        assert held0 - 2 <= held <= held0  # at most the two layers' sink pages stayed on the device
        for pair in ("device->host", "host->device"):
            assert s0["bytes_moved"][pair] > 0
            # The sink pages, attended every step, no longer cross at all: in sparse mode most of what crossed.
            assert s0["bytes_moved"][pair] / s["bytes_moved"][pair] >= ratio * 0.999, pair
        assert not torch.equal(got, base)  # pages really went through the codec
        assert float((got - base).abs().max()) < tol * float(base.abs().max())
        assert float((got.argmax(-1) == base.argmax(-1)).float().mean()) >= 0.9


def test_the_engine_packs_stores_and_unpacks_loads_from_host_and_disk(tmp_path):
    """Stores pack on the device before crossing, loads from host RAM and disk unpack after: exactly the codec's
    encode and decode, and the bytes counted are the packed ones."""
    from offload.engine import TransferEngine

    shape, codec = _packed()
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn((4, *shape.dims), generator=g), torch.randn((4, *shape.dims), generator=g)
    kq, vq = codec.encode(k, v)
    want = codec.decode(kq, vq, torch.float32)
    engine = TransferEngine(torch.device("cpu"), 2, None)
    host = HostTier(shape, 8, pin=False)
    disk = DiskTier(shape, 8, str(tmp_path))
    try:
        engine.copy("device->host", (k, v), [0, 1, 2, 3], (host.k, host.v), [5, 6, 2, 3], codec=codec).wait()
        assert torch.equal(host.k[[5, 6, 2, 3]], kq) and torch.equal(host.v[[5, 6, 2, 3]], vq)
        out = torch.zeros_like(k), torch.zeros_like(v)
        engine.copy("host->device", (host.k, host.v), [2, 3, 5], out, [0, 1, 2], codec=codec).wait()
        assert torch.equal(out[0][:3], want[0][[2, 3, 0]]) and torch.equal(out[1][:3], want[1][[2, 3, 0]])
        disk.write([1, 4], kq[:2], vq[:2])
        out = torch.zeros_like(k), torch.zeros_like(v)
        engine.disk_read(disk, [4, 1], out[0][:2], out[1][:2], codec=codec).wait()
        assert torch.equal(out[0][:2], want[0][[1, 0]]) and torch.equal(out[1][:2], want[1][[1, 0]])
        assert engine.bytes_moved == {"device->host": 4 * codec.page_bytes, "host->device": 3 * codec.page_bytes,
                                      "host->disk": 0, "disk->host": 2 * codec.page_bytes}
    finally:
        engine.close()
        host.close()
        disk.close()


def test_the_streaming_path_over_packed_disk_pages_stays_close_to_full_precision(model, tmp_path):
    """k8v4 with a small host tier and pages on disk (decode steps through the load ring, each read unpacked on
    its way) against the same budgets at full precision: close logits, the same greedy tokens nearly everywhere,
    packed pages on disk, and no file left behind."""
    ids = _ids(300)
    packed = PageCodec.of("k8v4", 2, PAGE, 16).page_bytes
    opts = dict(device_budget=20 * PAGE_BYTES, host_budget=6 * packed, disk_dir=str(tmp_path))
    base, s0 = _stepwise(model, ids, 260, **opts)
    got, s = _stepwise(model, ids, 260, kv_quant="k8v4", **opts)
    assert s["resident_bytes"]["disk"] > 0 and s["bytes_moved"]["disk->host"] > 0
    assert s["resident_bytes"]["disk"] % packed == 0 and s["bytes_moved"]["disk->host"] % packed == 0
    assert not torch.equal(got, base)
    assert float((got - base).abs().max()) < 0.1 * float(base.abs().max())
    assert float((got.argmax(-1) == base.argmax(-1)).float().mean()) >= 0.9
    assert list(tmp_path.iterdir()) == []  # the page file went with the runtime


def test_sparse_summaries_come_from_full_precision_keys(model):
    """The selection's block summaries are computed before a page is packed: with and without k4v2 they are the
    same after a prefill (every layer's keys are then the same), and stay the same in layer 0 over decode steps
    (later layers' keys depend on attention outputs, which quantized pages change)."""
    ids = _ids(300)
    opts = dict(attention="sparse", device_budget=30 * PAGE_BYTES, host_budget="1MiB", dense_layers=0)
    after_prefill, after_decode = [], []
    for setting in ("none", "k4v2"):
        with offload(model, page_size=PAGE, kv_quant=setting, **opts) as rt, torch.no_grad():
            cache = rt.cache()
            model(ids[:, :260], past_key_values=cache)
            after_prefill.append(rt.selection.summaries.clone())
            for t in range(260, 300):
                model(ids[:, t:t + 1], past_key_values=cache)
            assert rt.stats()["resident_bytes"]["host"] > 0
            after_decode.append(rt.selection.summaries[0].clone())
    # Bytes compared: the sketch's codes are bytes held in the keys' dtype, some of them NaN as floats.
    assert torch.equal(after_prefill[0].view(torch.uint8), after_prefill[1].view(torch.uint8))
    assert torch.equal(after_decode[0].view(torch.uint8), after_decode[1].view(torch.uint8))
    assert not torch.equal(after_decode[0].view(torch.uint8), after_prefill[0][0].view(torch.uint8))  # more pages


def test_budgets_hold_more_tokens_when_pages_are_packed(model):
    """The host budget counts packed pages: a prompt that does not fit at full precision fits with k8v4."""
    ids = _ids(400)
    opts = dict(device_budget=12 * PAGE_BYTES, host_budget=12 * PAGE_BYTES)
    with offload(model, page_size=PAGE, **opts) as rt:
        with pytest.raises(ValueError, match="budgets: .* raise host_budget"):
            rt.expect_tokens(400)
    with offload(model, page_size=PAGE, kv_quant="k8v4", **opts) as rt, torch.no_grad():
        rt.expect_tokens(400)
        model(ids, past_key_values=rt.cache())
        assert rt.host_tier.capacity == 12 * PAGE_BYTES // PageCodec.of("k8v4", 2, PAGE, 16).page_bytes


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["k8", "int8", "", None, 4])
def test_a_bad_kv_quant_is_a_one_line_error_listing_the_settings(bad):
    with pytest.raises(ValueError) as err:
        OffloadConfig(kv_quant=bad)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("kv_quant: expected one of none, k8v8, k8v4, k4v2")


def test_the_cli_refuses_a_bad_kv_quant_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "offload.cli", "generate", "--kv-quant", "k2v1", "--prompt", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--kv-quant" in lines[0] and "k8v4" in lines[0], run.stderr


def test_the_packed_shape_is_its_own_page_shape():
    shape, codec = _packed()
    plain = dataclasses.replace(shape, packed=None)
    assert shape.page_bytes == codec.page_bytes and plain.page_bytes == 2 * plain.half_bytes
    assert shape.k_dims == (codec.k_bytes,) and plain.k_dims == plain.dims
    assert shape.store_dtype == torch.uint8 and plain.store_dtype == torch.float32
