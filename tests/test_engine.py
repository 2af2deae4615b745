"""The transfer engine on the CPU: copies land exactly and leave their source alone, `Transfer.wait` is the only
point after which a destination may be read, bytes are counted per (source, destination) pair, and failures of a
tier surface from `wait()` (and, through the runtime, from `generate`) instead of being swallowed."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from offload import offload
from offload.engine import Transfer, TransferEngine
from tiers import DiskTier, PageShape

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SHAPE = PageShape(kv_heads=2, page_size=4, head_dim=8, dtype=torch.float32)
PAIRS = ("device->host", "host->device", "host->disk", "disk->host")


@pytest.fixture
def engine():
    e = TransferEngine(torch.device("cpu"), threads=2, tracer=None)
    yield e
    e.close()


def _pages(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE.dims, generator=g), torch.randn(n, *SHAPE.dims, generator=g)


class FakeDisk:
    """A disk tier stand-in: pages in a dict; `fail` makes read/write raise; `gate` holds reads until set."""

    def __init__(self, fail: str | None = None, gate: threading.Event | None = None):
        self.page_bytes = SHAPE.page_bytes
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fail = fail
        self.gate = gate

    def write(self, slots, k, v):
        if self.fail == "write":
            raise OSError(errno.EIO, "injected write failure")
        for i, s in enumerate(slots):
            self.store[s] = (k[i].clone(), v[i].clone())

    def read(self, slots, k_out, v_out):
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail == "read":
            raise OSError(errno.EIO, "injected read failure")
        for i, s in enumerate(slots):
            k_out[i].copy_(self.store[s][0])
            v_out[i].copy_(self.store[s][1])


# -- copies --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", ["host->device", "device->host"])
def test_copy_lands_every_page_exactly_and_leaves_the_source(engine, pair):
    src = _pages(6, seed=0)
    before = (src[0].clone(), src[1].clone())
    dst = (torch.full((8, *SHAPE.dims), -7.0), torch.full((8, *SHAPE.dims), -7.0))
    src_slots, dst_slots = [3, 1, 2, 5], [0, 5, 6, 7]  # one run (1,2 -> 5,6) and two single pages
    engine.copy(pair, src, src_slots, dst, dst_slots).wait()
    for s, d in zip(src_slots, dst_slots):
        assert torch.equal(dst[0][d], src[0][s])
        assert torch.equal(dst[1][d], src[1][s])
    untouched = [i for i in range(8) if i not in dst_slots]
    assert bool((dst[0][untouched] == -7.0).all()) and bool((dst[1][untouched] == -7.0).all())
    assert torch.equal(src[0], before[0]) and torch.equal(src[1], before[1])


def test_bytes_moved_counts_each_pair_separately(engine):
    assert engine.bytes_moved == dict.fromkeys(PAIRS, 0)
    src, dst = _pages(4, 0), _pages(4, 1)
    engine.copy("host->device", src, [0, 1, 2], dst, [0, 1, 2]).wait()
    assert engine.bytes_moved == {**dict.fromkeys(PAIRS, 0), "host->device": 3 * SHAPE.page_bytes}
    engine.copy("device->host", src, [3], dst, [3]).wait()
    disk = FakeDisk()
    engine.disk_write(disk, [4, 5], src[0][:2], src[1][:2]).wait()
    engine.disk_read(disk, [5], dst[0][:1], dst[1][:1]).wait()
    assert engine.bytes_moved == {
        "host->device": 3 * SHAPE.page_bytes,
        "device->host": SHAPE.page_bytes,
        "host->disk": 2 * SHAPE.page_bytes,
        "disk->host": SHAPE.page_bytes,
    }
    assert torch.equal(dst[0][0], src[0][1])


def test_disk_round_trip_through_a_real_disk_tier(engine, tmp_path: Path):
    disk = DiskTier(SHAPE, 8, str(tmp_path), threads=2)
    try:
        k, v = _pages(5, seed=3)
        engine.disk_write(disk, [6, 0, 1, 2, 4], k, v).wait()
        k_out, v_out = torch.zeros_like(k), torch.zeros_like(v)
        engine.disk_read(disk, [4, 2, 1, 0, 6], k_out, v_out).wait()
        assert torch.equal(k_out, k.flip(0)) and torch.equal(v_out, v.flip(0))
    finally:
        disk.close()
    assert os.listdir(tmp_path) == []


# -- wait ----------------------------------------------------------------------------------------------------
def test_destination_is_ready_only_after_wait(engine):
    gate = threading.Event()
    disk = FakeDisk(gate=gate)
    k, v = _pages(2, seed=4)
    disk.write([0, 1], k, v)
    k_out, v_out = torch.zeros_like(k), torch.zeros_like(v)
    t = engine.disk_read(disk, [1, 0], k_out, v_out)
    time.sleep(0.05)
    assert not t.done()
    assert bool((k_out == 0).all())  # the copy has not happened yet: reading now would see stale data
    threading.Timer(0.2, gate.set).start()
    waited = t.wait()
    assert waited >= 0.1  # wait() blocked until the copy ended, and says for how long
    assert t.done()
    assert torch.equal(k_out, k.flip(0)) and torch.equal(v_out, v.flip(0))
    assert t.wait() == 0.0  # a second wait does not block


def test_a_finished_transfer_is_done():
    t = Transfer()
    assert t.done()
    assert t.wait() >= 0.0


# -- failures ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fail", ["read", "write"])
def test_disk_failure_surfaces_from_wait(engine, fail):
    disk = FakeDisk(fail=fail)
    k, v = _pages(1, seed=5)
    disk.store[0] = (k[0].clone(), v[0].clone())
    call = engine.disk_read if fail == "read" else engine.disk_write
    t = call(disk, [0], k, v)
    with pytest.raises(OSError, match=f"injected {fail} failure"):
        t.wait()
    # The engine is still usable afterwards.
    engine.copy("host->device", _pages(1, 1), [0], (k, v), [0]).wait()


def test_real_disk_tier_io_error_surfaces_from_wait(engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    disk = DiskTier(SHAPE, 4, str(tmp_path), threads=2)
    try:
        def broken_io(*args, **kwargs):
            raise OSError(errno.EIO, "injected pread failure")

        monkeypatch.setattr(disk, "_io", broken_io)
        k, v = _pages(2, seed=6)
        with pytest.raises(OSError, match="injected pread failure"):
            engine.disk_read(disk, [0, 1], k, v).wait()
        with pytest.raises(OSError, match="injected pread failure"):
            engine.disk_write(disk, [2, 3], k, v).wait()
    finally:
        disk.close()
    assert os.listdir(tmp_path) == []


# -- failures through the runtime ----------------------------------------------------------------------------
def _three_tier_options(model, disk_dir: Path, page_size: int = 4) -> dict:
    mc = model.config
    head_dim = mc.hidden_size // mc.num_attention_heads
    page_bytes = 2 * mc.num_key_value_heads * page_size * head_dim * 4
    # Roomy enough for any workspace layout; the host holds 3 pages, so most pages go to disk.
    return dict(page_size=page_size, device_budget=(mc.num_hidden_layers + 8) * page_bytes,
                host_budget=3 * page_bytes, disk_dir=str(disk_dir))


def _model_state(model) -> tuple:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return model.config._attn_implementation, "generate" in model.__dict__, model.generation_config.to_dict(), hooks


@torch.no_grad()
def test_a_disk_that_fails_every_read_mid_decode_is_recovered_and_the_context_cleans_up(tiny_llama_model,
                                                                                         tmp_path: Path):
    """Every read fails from step 2 on: each load's pages are rebuilt (re-running the model over the tokens), so
    the tokens are those of plain generation; the block still cleans up after itself."""
    model = tiny_llama_model
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    reference = model.generate(prompt, max_new_tokens=6, do_sample=False)
    before = _model_state(model)
    tokens = []

    def failing_read(slots, k_out, v_out):
        raise OSError(errno.EIO, "injected disk read failure")

    with offload(model, **_three_tier_options(model, tmp_path)) as rt:
        cache = rt.cache()
        out = model(prompt, past_key_values=cache, use_cache=True)
        assert rt.disk_tier is not None and os.listdir(tmp_path) != []
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        for step in range(5):
            if step == 2:
                rt.disk_tier.read = failing_read  # the disk breaks in the middle of decoding
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        recovered = rt.stats()["faults"]["recomputed"]
    assert recovered > 0
    assert torch.equal(torch.cat(tokens, dim=1), reference[:, prompt.shape[1]:])
    assert os.listdir(tmp_path) == []
    assert _model_state(model) == before
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), reference)


@torch.no_grad()
def test_disk_write_failure_in_prefill_surfaces_from_generate(tiny_llama_model, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    model = tiny_llama_model
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(8))
    before = _model_state(model)

    def failing_write(self, slots, k, v):
        raise OSError(errno.ENOSPC, "injected disk write failure")

    monkeypatch.setattr(DiskTier, "write", failing_write)
    with pytest.raises(ValueError, match=r"^disk_dir: .* is full \(writing layer 0 page"):
        with offload(model, **_three_tier_options(model, tmp_path)):
            model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert os.listdir(tmp_path) == []
    assert _model_state(model) == before
