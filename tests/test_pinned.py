"""The host pool is page-aligned memory of exactly its size; pinned, it is registered with CUDA (cudaHostRegister)
rather than taken from torch's caching host allocator, which rounds up to a power of two.

The registration logic runs here against a stand-in for `torch.cuda.cudart()`; the tests marked gpu check the
real thing and are skipped without a CUDA device."""

from __future__ import annotations

import gc
import mmap

import pytest
import torch

import tiers.pinned as pinned_mod
from tiers.base import PageShape
from tiers.host import HostTier, aligned_host_tensor, pinned_bytes

PAGE = mmap.PAGESIZE
# 4.5 MiB plus a bit: neither a power of two nor a whole number of pages.
ODD_NUMEL = (9 << 19) + 100


def _page_round(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _odd_shape_and_capacity() -> tuple[PageShape, int]:
    """A host tier of 2 * 37 * 2 * 16 * 24 * 4 bytes = 454,656 bytes: not a power of two."""
    return PageShape(kv_heads=2, page_size=16, head_dim=24, dtype=torch.float32), 37


# ------------------------------------------------------------------------------------------------ CPU, not pinned


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32])
def test_unpinned_pool_is_page_aligned_and_exactly_the_asked_size(dtype: torch.dtype) -> None:
    t = aligned_host_tensor(ODD_NUMEL, dtype, pin=False)
    assert t.numel() == ODD_NUMEL and t.dtype == dtype
    assert t.data_ptr() % PAGE == 0
    nbytes = ODD_NUMEL * t.element_size()
    assert t.untyped_storage().nbytes() == nbytes  # not rounded up to a power of two
    assert nbytes <= _page_round(nbytes) < nbytes + PAGE
    t.fill_(3)  # writable, all of it
    assert int(t[-1]) == 3


def test_host_tier_storage_is_exact_and_close_is_idempotent() -> None:
    shape, capacity = _odd_shape_and_capacity()
    tier = HostTier(shape, capacity, pin=False)
    asked = 2 * capacity * shape.half_bytes
    assert tier._storage.untyped_storage().nbytes() == asked
    assert tier._storage.data_ptr() % PAGE == 0
    assert tier.k.shape == (capacity, *shape.dims) and tier.v.shape == (capacity, *shape.dims)
    before = pinned_bytes()
    tier.close()
    tier.close()
    assert tier.closed and pinned_bytes() == before


def test_pool_made_inside_inference_mode_is_a_normal_tensor() -> None:
    shape, capacity = _odd_shape_and_capacity()
    with torch.inference_mode():
        t = aligned_host_tensor(ODD_NUMEL, torch.float16, pin=False)
        tier = HostTier(shape, capacity, pin=False)
    assert not t.is_inference()
    assert not tier.k.is_inference() and not tier.v.is_inference()
    tier.k[0].fill_(1.0)  # in place, outside the mode
    tier.close()


def test_empty_pool() -> None:
    assert aligned_host_tensor(0, torch.float32, pin=False).numel() == 0
    assert aligned_host_tensor(0, torch.float32, pin=True).numel() == 0  # nothing to pin, no CUDA call


# ---------------------------------------------------------------- CPU, the registration against a stand-in cudart


class _FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister calls; `fail` makes registration fail like a locked-memory
    limit would (cudaErrorMemoryAllocation)."""

    class cudaError:  # noqa: N801 - the name torch's binding uses
        success = 0

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.registered: dict[int, int] = {}
        self.calls: list[tuple] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802
        self.calls.append(("register", ptr, size, flags))
        if self.fail:
            return 2
        assert ptr not in self.registered
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.calls.append(("unregister", ptr))
        return 0 if self.registered.pop(ptr, None) is not None else 712  # cudaErrorHostMemoryNotRegistered

    def cudaGetErrorString(self, err: int) -> str:  # noqa: N802
        return {2: "out of memory"}.get(err, f"error {err}")


@pytest.fixture
def fake_cudart(monkeypatch):
    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def test_pinned_pool_registers_exactly_its_page_rounded_size(fake_cudart) -> None:
    before = pinned_bytes()
    t = aligned_host_tensor(ODD_NUMEL, torch.float16, pin=True)
    nbytes = ODD_NUMEL * 2
    assert t.untyped_storage().nbytes() == nbytes and t.data_ptr() % PAGE == 0
    assert fake_cudart.calls == [("register", t.data_ptr(), _page_round(nbytes), 0)]
    assert pinned_bytes() - before == _page_round(nbytes)
    assert pinned_mod.release_pinned(t) is True
    assert pinned_mod.release_pinned(t) is False  # idempotent
    assert fake_cudart.registered == {} and pinned_bytes() == before
    assert [c[0] for c in fake_cudart.calls] == ["register", "unregister"]


def test_pinned_host_tier_close_unregisters_once(fake_cudart) -> None:
    shape, capacity = _odd_shape_and_capacity()
    before = pinned_bytes()
    with torch.inference_mode():
        tier = HostTier(shape, capacity, pin=True)
    assert not tier.k.is_inference()
    asked = 2 * capacity * shape.half_bytes
    assert pinned_bytes() - before == _page_round(asked) < asked + PAGE
    ptr = tier._storage.data_ptr()
    assert fake_cudart.registered == {ptr: _page_round(asked)}
    tier.close()
    tier.close()
    assert pinned_bytes() == before and fake_cudart.registered == {}
    assert fake_cudart.calls.count(("unregister", ptr)) == 1


def test_pinned_memory_is_unregistered_when_the_tensor_is_freed(fake_cudart) -> None:
    before = pinned_bytes()
    t = aligned_host_tensor(ODD_NUMEL, torch.uint8, pin=True)
    view = t[PAGE:]  # a view keeps the storage (and the mapping) alive
    del t
    gc.collect()
    assert pinned_bytes() - before == _page_round(ODD_NUMEL) and len(fake_cudart.registered) == 1
    view[-1] = 7  # still mapped
    del view
    gc.collect()
    assert pinned_bytes() == before and fake_cudart.registered == {}


def test_failed_registration_is_a_one_line_error_naming_host_budget(monkeypatch) -> None:
    fake = _FakeCudart(fail=True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    before = pinned_bytes()
    shape, capacity = _odd_shape_and_capacity()
    with pytest.raises(RuntimeError, match="host_budget") as info:
        HostTier(shape, capacity, pin=True)
    assert "\n" not in str(info.value) and "out of memory" in str(info.value)
    assert pinned_bytes() == before


# ------------------------------------------------------------------------------------------------------ CUDA only

def _host_alloc_bytes() -> int | None:
    if not hasattr(torch.cuda, "host_memory_stats"):
        return None
    return torch.cuda.host_memory_stats().get("allocated_bytes.current")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pinned_pool_is_registered_exactly_and_round_trips() -> None:
    torch.cuda.init()
    before = pinned_bytes()
    cached_before = _host_alloc_bytes()
    shape, capacity = _odd_shape_and_capacity()
    tier = HostTier(shape, capacity, pin=True)
    asked = 2 * capacity * shape.half_bytes
    assert pinned_bytes() - before == _page_round(asked)
    if cached_before is not None:
        assert _host_alloc_bytes() == cached_before  # torch's caching host allocator did not grow
    assert tier.k.is_pinned() and tier._storage.is_pinned()

    src = torch.randn(capacity, *shape.dims, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        tier.k.copy_(src, non_blocking=True)  # device -> registered host memory
        back = tier.k.to("cuda", non_blocking=True)  # and back
    stream.synchronize()
    assert torch.equal(back, src) and torch.equal(tier.k, src.cpu())

    tier.close()
    tier.close()
    assert pinned_bytes() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_run_pins_no_more_than_host_budget(tmp_path) -> None:
    from offload import offload
    from offload.models import tiny_llama

    model = tiny_llama(layers=3, hidden=96, heads=6, kv_heads=2, vocab=256).cuda()
    c = model.config
    pb = 2 * c.num_key_value_heads * 16 * (c.hidden_size // c.num_attention_heads) * model.dtype.itemsize
    host_budget = 20 * pb
    ids = torch.randint(0, 256, (1, 300), device="cuda")
    before = pinned_bytes()
    with torch.no_grad(), offload(model, page_size=16, device_budget=12 * pb, host_budget=host_budget,
                                  disk_dir=str(tmp_path)) as rt:
        model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        held = pinned_bytes() - before
        assert rt.host_tier is not None and rt.host_tier.k.is_pinned()
        assert rt.stats()["bytes_moved"]["disk->host"] > 0  # the pool was used, through disk staging too
    assert 0 < held <= _page_round(host_budget)  # host_budget is whole pages here: held <= host_budget
    assert pinned_bytes() == before


def test_host_checksums_refuse_a_slot_below_zero() -> None:
    """Bug: a page no longer on the host (slot -1) was checked as the pool's last slot (Python's negative index)
    and reported damaged; a slot below 0 is refused in one line instead."""
    shape, capacity = _odd_shape_and_capacity()
    tier = HostTier(shape, capacity, pin=False)
    try:
        slots = tier.allocate(capacity)
        tier.seal(slots)
        assert tier.damaged(slots) == []
        tier.k[slots[-1]].add_(1)  # the last slot really is damaged now
        assert tier.damaged([slots[-1]]) == [slots[-1]]
        with pytest.raises(ValueError, match=r"^host: checksums of slots \[-1\]: a slot below 0 holds no page$"):
            tier.damaged([-1])
    finally:
        tier.close()
