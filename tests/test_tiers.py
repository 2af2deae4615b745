"""Contract tests for every tier, cheapest first: slot bookkeeping, then copy correctness, then what only
the disk tier has (its file, its failure paths, its async and concurrent I/O).

Every tier kind below must pass the contract; "disk-buffered" is the disk tier with O_DIRECT forced off, so
both I/O paths are covered whatever the file system under tmp_path supports.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import gc
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import faults
import tiers.aio
from tiers.base import PageShape, Tier
from tiers.device import DeviceTier
from tiers.disk import ALIGN, DiskTier
from tiers.host import HostTier

TIER_KINDS = ["device", "host", "disk", "disk-buffered"]

# Half-page sizes: 8 KiB and 4 KiB (O_DIRECT-able), 3 KiB (padded slots), 420 B (odd, padded).
SHAPES = [
    PageShape(kv_heads=2, page_size=16, head_dim=64, dtype=torch.float32),
    PageShape(kv_heads=2, page_size=16, head_dim=64, dtype=torch.bfloat16),
    PageShape(kv_heads=1, page_size=16, head_dim=96, dtype=torch.bfloat16),
    PageShape(kv_heads=3, page_size=5, head_dim=7, dtype=torch.float32),
]
SHAPE_IDS = [f"{s.kv_heads}x{s.page_size}x{s.head_dim}-{str(s.dtype)[6:]}" for s in SHAPES]
SMALL = SHAPES[0]

MakeTier = Callable[[PageShape, int], Tier]


def build_tier(kind: str, shape: PageShape, capacity: int, directory: Path) -> Tier:
    if kind == "device":
        return DeviceTier(shape, capacity, torch.device("cpu"))
    if kind == "host":
        return HostTier(shape, capacity, pin=False)
    return DiskTier(shape, capacity, str(directory), direct=False if kind == "disk-buffered" else None)


@pytest.fixture(params=TIER_KINDS)
def make_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeTier]:
    made: list[Tier] = []

    def make(shape: PageShape, capacity: int) -> Tier:
        made.append(build_tier(request.param, shape, capacity, tmp_path))
        return made[-1]

    yield make
    for tier in made:
        tier.close()


@pytest.fixture(params=[(None, "threads"), (None, "aio"), (False, "threads")],
                ids=["disk-threads", "disk-aio", "disk-buffered"])
def make_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., DiskTier]]:
    """Disk tiers with O_DIRECT where it can be used, and the thread pool or AIO (for shapes that take O_DIRECT); or
    buffered I/O (thread pool)."""
    made: list[DiskTier] = []

    def make(shape: PageShape = SMALL, capacity: int = 8, **kwargs: object) -> DiskTier:
        kwargs.setdefault("direct", request.param[0])
        # AIO where the shape allows O_DIRECT (halves a multiple of 4 KiB); the pool for the others.
        odd = shape.k_bytes % ALIGN or shape.v_bytes % ALIGN
        kwargs.setdefault("engine", "threads" if odd else request.param[1])
        if kwargs["engine"] == "aio":
            faults.skip_without_aio(tmp_path)
        made.append(DiskTier(shape, capacity, str(tmp_path), **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for tier in made:
        tier.close()


def random_pages(shape: PageShape, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (never all-zero) K and V pages, [n, H, P, D] each."""
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn((n, *shape.dims), generator=g) * 10 + 3).to(shape.dtype)
    v = (torch.randn((n, *shape.dims), generator=g) * 10 - 3).to(shape.dtype)
    return k, v


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so comparisons are exact (no float ==, no -0.0 == 0.0)."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(bits(actual), bits(expected))


def read_back(tier: Tier, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.zeros((len(slots), *tier.shape.dims), dtype=tier.shape.dtype)
    v = torch.zeros_like(k)
    tier.read(slots, k, v)
    return k, v


def kv_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".kv")


def dead_pid() -> int:
    """A pid no process has right now (counting down from the top of the pid space, where few live)."""
    pid_max_file = Path("/proc/sys/kernel/pid_max")
    top = int(pid_max_file.read_text()) if pid_max_file.exists() else 99999
    return next(pid for pid in range(top - 1, 1, -1) if not psutil.pid_exists(pid))


# --- bookkeeping --------------------------------------------------------------------------------------


def test_allocate_release_story(make_tier: MakeTier) -> None:
    tier = make_tier(SMALL, 3)
    assert (tier.num_free, tier.used_bytes) == (3, 0)
    assert tier.allocate(2) == [0, 1]  # lowest slots first
    assert tier.allocate(2) is None  # all or nothing: one free is not two
    assert tier.num_free == 1 and tier.used_bytes == 2 * SMALL.page_bytes
    assert tier.allocate(1) == [2]
    assert tier.allocate(1) is None
    assert tier.used_bytes == 3 * SMALL.page_bytes
    tier.release([1])
    assert tier.allocate(1) == [1]  # a released slot is handed out again
    tier.release([0, 1, 2])
    assert (tier.num_free, tier.used_bytes) == (3, 0)
    assert sorted(tier.allocate(3) or []) == [0, 1, 2]


def test_release_rejects_bad_slots(make_tier: MakeTier) -> None:
    tier = make_tier(SMALL, 2)
    tier.allocate(2)
    with pytest.raises(ValueError, match="out of range"):
        tier.release([2])
    with pytest.raises(ValueError, match="out of range"):
        tier.release([-1])
    assert tier.num_free == 0  # a rejected release changes nothing
    tier.release([0, 1])
    with pytest.raises(RuntimeError, match="released twice"):
        tier.release([1])


def test_double_release_is_caught_while_other_slots_are_in_use(make_tier: MakeTier) -> None:
    """Regression: release() once noticed a double release only when the free list overflowed."""
    tier = make_tier(SMALL, 2)
    tier.allocate(2)
    tier.release([0])
    with pytest.raises(RuntimeError):
        tier.release([0])


def test_a_shared_slot_is_freed_by_its_last_holder(make_tier: MakeTier) -> None:
    """Beams share pages: a slot held three times stays in use, and readable, until its third release."""
    tier = make_tier(SMALL, 2)
    slots = tier.allocate(2)
    k = torch.randn((2, *SMALL.dims), generator=torch.Generator().manual_seed(0)).to(SMALL.dtype)
    tier.write(slots, k, k)
    tier.share([0, 0])
    assert tier.release([0, 1]) == [1]  # slot 0 has two holders left
    assert tier.num_free == 1 and tier.allocate(2) is None
    out = torch.empty_like(k[:1])
    tier.read([0], out, out.clone())
    assert torch.equal(out, k[:1])  # still the page it held
    assert tier.release([0]) == []
    assert tier.release([0]) == [0]
    assert tier.num_free == 2 and not tier.refs
    with pytest.raises(RuntimeError, match="released twice"):
        tier.release([0])


def test_empty_tier(make_tier: MakeTier) -> None:
    """Regression: a host tier of capacity 0 once failed in torch.frombuffer(count=0)."""
    tier = make_tier(SMALL, 0)
    assert tier.allocate(0) == []
    assert tier.allocate(1) is None
    assert tier.used_bytes == 0


# --- copy correctness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_pages_round_trip_bit_for_bit(make_tier: MakeTier, shape: PageShape) -> None:
    tier = make_tier(shape, 16)
    # Unordered, with gaps and with runs of consecutive slots (the disk tier coalesces those).
    slots = [9, 10, 11, 12, 13, 2, 0, 15, 5, 6]
    k, v = random_pages(shape, len(slots), seed=1)
    k_src, v_src = k.clone(), v.clone()
    tier.write(slots, k, v)
    assert_same_bits(k, k_src)  # the source is left as it was
    assert_same_bits(v, v_src)
    k_out, v_out = read_back(tier, slots)
    assert_same_bits(k_out, k)
    assert_same_bits(v_out, v)
    # A different order and a subset read the same pages.
    order = [4, 0, 7]
    k_out, v_out = read_back(tier, [slots[i] for i in order])
    assert_same_bits(k_out, k[order])
    assert_same_bits(v_out, v[order])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_writing_a_slot_leaves_its_neighbours_alone(make_tier: MakeTier, shape: PageShape) -> None:
    tier = make_tier(shape, 5)
    k, v = random_pages(shape, 5, seed=2)
    tier.write(range(5), k, v)
    k_new, v_new = random_pages(shape, 1, seed=3)
    tier.write([2], k_new, v_new)
    k[2], v[2] = k_new[0], v_new[0]
    k_out, v_out = read_back(tier, list(range(5)))
    assert_same_bits(k_out, k)
    assert_same_bits(v_out, v)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_unaligned_and_strided_buffers(make_tier: MakeTier, shape: PageShape) -> None:
    tier = make_tier(shape, 6)
    slots = [4, 1, 2]
    k, v = random_pages(shape, 3, seed=4)
    # Non-contiguous sources: the same values stored as [n, P, H, D] and permuted.
    tier.write(slots, k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2))
    # Outputs that start one element into a bigger tensor, so they are not 4 KiB aligned.
    numel = k.numel()
    big = torch.zeros(2 * numel + 3, dtype=shape.dtype)
    k_out = big[1 : 1 + numel].view(k.shape)
    v_out = big[numel + 2 : 2 * numel + 2].view(v.shape)
    tier.read(slots, k_out, v_out)
    assert_same_bits(k_out, k)
    assert_same_bits(v_out, v)
    assert big[0] == 0 and big[numel + 1] == 0 and big[-1] == 0  # nothing written outside the views
    # A non-contiguous output.
    k_t = torch.zeros((3, shape.page_size, shape.kv_heads, shape.head_dim), dtype=shape.dtype).transpose(1, 2)
    v_t = torch.zeros_like(k_t)
    tier.read(slots, k_t, v_t)
    assert_same_bits(k_t, k)
    assert_same_bits(v_t, v)


def test_random_batches_match_a_model(make_tier: MakeTier) -> None:
    shape = SHAPES[2]
    tier = make_tier(shape, 12)
    model: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @settings(max_examples=25, deadline=None)
    @given(slots=st.lists(st.integers(0, 11), min_size=1, max_size=12, unique=True), seed=st.integers(0, 2**16))
    def write_then_check_all(slots: list[int], seed: int) -> None:
        k, v = random_pages(shape, len(slots), seed)
        tier.write(slots, k, v)
        model.update({s: (k[i], v[i]) for i, s in enumerate(slots)})
        known = sorted(model)
        k_out, v_out = read_back(tier, known)
        assert_same_bits(k_out, torch.stack([model[s][0] for s in known]))
        assert_same_bits(v_out, torch.stack([model[s][1] for s in known]))

    write_then_check_all()


# --- disk: the file -----------------------------------------------------------------------------------


def test_disk_file_lives_as_long_as_the_tier(make_disk: Callable[..., DiskTier], tmp_path: Path) -> None:
    tier = make_disk(SHAPES[3], 7)
    path = Path(tier.path)
    assert path.parent == tmp_path and re.fullmatch(rf"offload-{os.getpid()}-[0-9a-f]+\.kv", path.name)
    assert tier.slot_bytes % ALIGN == 0 and tier.slot_bytes >= SHAPES[3].page_bytes
    assert path.stat().st_size == 7 * tier.slot_bytes
    tier.close()
    assert not path.exists()
    tier.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tier.write([0], *random_pages(SHAPES[3], 1, seed=0))


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=[SHAPE_IDS[0], SHAPE_IDS[2]])
def test_disk_file_layout(make_disk: Callable[..., DiskTier], shape: PageShape) -> None:
    """Slot s keeps K at s * slot_bytes and V right after it, at s * slot_bytes + half_bytes."""
    tier = make_disk(shape, 4)
    k, v = random_pages(shape, 2, seed=13)
    tier.write([3, 1], k, v)
    raw = Path(tier.path).read_bytes()
    half = shape.half_bytes
    for i, s in enumerate([3, 1]):
        start = s * tier.slot_bytes
        assert raw[start : start + half] == k[i].view(torch.uint8).numpy().tobytes()
        assert raw[start + half : start + 2 * half] == v[i].view(torch.uint8).numpy().tobytes()


def test_disk_file_removed_when_tier_is_garbage_collected(tmp_path: Path) -> None:
    tier = DiskTier(SMALL, 2, str(tmp_path))
    path = Path(tier.path)
    assert path.exists()
    del tier
    gc.collect()
    assert not path.exists()


def test_disk_io_mode(tmp_path: Path) -> None:
    aligned = DiskTier(SMALL, 2, str(tmp_path))  # 8 KiB halves: O_DIRECT if the file system takes it
    forced = DiskTier(SMALL, 2, str(tmp_path), direct=False)
    odd = DiskTier(SHAPES[3], 2, str(tmp_path))
    try:
        assert forced.direct is False and odd.direct is False
        assert forced.engine == odd.engine == aligned.engine == "threads"  # the default
        if aligned.direct and tiers.aio.unavailable() is None:
            with_aio = DiskTier(SMALL, 2, str(tmp_path), engine="aio")
            assert with_aio.engine == "aio" and with_aio.direct
            with_aio.close()
        fdinfo = Path(f"/proc/self/fdinfo/{aligned._fd}")
        if fdinfo.exists():
            flags = int(re.search(r"flags:\s*([0-7]+)", fdinfo.read_text()).group(1), 8)  # type: ignore[union-attr]
            assert bool(flags & getattr(os, "O_DIRECT", 0)) == aligned.direct
    finally:
        for tier in (aligned, forced, odd):
            tier.close()
    with pytest.raises(ValueError, match=r"^disk_dir: .*O_DIRECT.*not a multiple of 4096"):
        DiskTier(SHAPES[3], 2, str(tmp_path), direct=True)
    with pytest.raises(ValueError, match=r"^io_engine: aio can't be used for .*: it needs O_DIRECT, which this tier "
                                         r"can't use: direct=False$"):
        DiskTier(SMALL, 2, str(tmp_path), direct=False, engine="aio")
    with pytest.raises(ValueError, match=r"^io_engine: aio can't be used for .*: it needs O_DIRECT, which this tier "
                                         r"can't use: the half-page size 420 B is not a multiple of 4096$"):
        DiskTier(SHAPES[3], 2, str(tmp_path), engine="aio")
    with pytest.raises(ValueError, match=r"^io_engine: expected one of threads, aio, got 'uring'$"):
        DiskTier(SMALL, 2, str(tmp_path), engine="uring")
    assert kv_files(tmp_path) == []


def test_stale_files_of_dead_processes_are_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    live = DiskTier(SMALL, 2, str(tmp_path))  # a file of this (live) process
    stale = tmp_path / f"offload-{dead_pid()}-deadbeef.kv"
    stale.write_bytes(b"\0" * 4096)
    unrelated = tmp_path / "offload-notes.kv"
    unrelated.write_text("not ours")
    try:
        with caplog.at_level("INFO", logger="tiers.disk"):
            second = DiskTier(SMALL, 2, str(tmp_path))
        assert not stale.exists()
        assert stale.name in caplog.text
        assert Path(live.path).exists() and unrelated.exists()
        k, v = random_pages(SMALL, 2, seed=5)
        live.write([0, 1], k, v)  # the live tier still works
        assert_same_bits(read_back(live, [0, 1])[0], k)
        second.close()
    finally:
        live.close()


def test_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^disk_dir: .*a-file/kv is not writable \(") as info:
        DiskTier(SMALL, 2, str(blocker / "kv"))
    assert isinstance(info.value.__cause__, OSError)


def test_not_enough_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """statvfs says no before any file is created or preallocated."""
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: pytest.fail("preallocated anyway"))
    shape = PageShape(kv_heads=64, page_size=4096, head_dim=256, dtype=torch.float32)  # 512 MiB pages
    st_fs = os.statvfs(tmp_path)
    capacity = st_fs.f_bavail * st_fs.f_frsize // shape.page_bytes + 2
    with pytest.raises(ValueError, match=r"^disk_dir: .* free, the disk tier needs .*disk_budget"):
        DiskTier(shape, capacity, str(tmp_path))
    assert kv_files(tmp_path) == []


def test_preallocation_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk found by posix_fallocate (after the statvfs check passed) is the same error, file removed."""

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(ValueError, match="disk_budget"):
        DiskTier(SMALL, 4, str(tmp_path))
    assert kv_files(tmp_path) == []


# --- disk: I/O paths ----------------------------------------------------------------------------------


def test_disk_rejects_bad_requests(make_disk: Callable[..., DiskTier]) -> None:
    tier = make_disk(SMALL, 4)
    k, v = random_pages(SMALL, 2, seed=6)
    with pytest.raises(ValueError, match="out of range"):
        tier.write([1, 4], k, v)
    with pytest.raises(ValueError, match="shape"):
        tier.write([1, 2, 3], k, v)
    with pytest.raises(ValueError, match="bfloat16"):
        tier.write([1, 2], k.to(torch.bfloat16), v.to(torch.bfloat16))


def test_disk_empty_request(make_disk: Callable[..., DiskTier]) -> None:
    tier = make_disk(SMALL, 4)
    big = torch.zeros(64, dtype=SMALL.dtype)
    empty = big[1:1].view(0, *SMALL.dims)
    tier.write([], empty, empty)
    tier.read_async([], empty, empty).result(timeout=10)


def test_disk_reads_straight_into_an_aligned_host_pool(
    make_disk: Callable[..., DiskTier], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slices of the page-aligned host pool need no bounce buffer, in either I/O mode."""
    disk = make_disk(SMALL, 4)
    host = HostTier(SMALL, 4, pin=False)
    k, v = random_pages(SMALL, 3, seed=7)
    disk.write([3, 0, 1], k, v)
    monkeypatch.setattr(DiskTier, "_bounce", staticmethod(lambda like: pytest.fail("bounced")))
    disk.read([3, 0, 1], host.k[1:4], host.v[1:4])
    assert_same_bits(host.k[1:4], k)
    assert_same_bits(host.v[1:4], v)
    host.close()


@pytest.mark.parametrize(
    ("slots", "threads", "calls"),
    # A request's slots are sorted first: 2, 3, 0, 1 is one run.
    [([0, 1, 2, 3, 4, 5, 6, 7], 1, 1), ([0, 1, 2, 3, 4, 5, 6, 7], 4, 4), ([6, 4, 2, 0], 1, 4), ([2, 3, 7, 0, 1], 1, 2)],
)
def test_disk_coalesces_consecutive_slots(
    make_disk: Callable[..., DiskTier], monkeypatch: pytest.MonkeyPatch, slots: list[int], threads: int, calls: int
) -> None:
    tier = make_disk(SHAPES[2], 8, threads=threads)  # padded slots: the padding iovecs must line up too
    real_pwritev = os.pwritev
    count = [0]

    def counting_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        count[0] += 1
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", counting_pwritev)
    k, v = random_pages(SHAPES[2], len(slots), seed=8)
    tier.write(slots, k, v)
    assert count[0] == calls
    k_out, v_out = read_back(tier, slots)
    assert_same_bits(k_out, k)
    assert_same_bits(v_out, v)


def test_disk_short_read_is_an_error(make_disk: Callable[..., DiskTier], monkeypatch: pytest.MonkeyPatch) -> None:
    tier = make_disk(SMALL, 4, threads=1)  # one thread: slots 0 and 1 are one call
    tier.write([0, 1], *random_pages(SMALL, 2, seed=9))
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: 100)
    monkeypatch.setattr(DiskTier, "_completed", lambda self, write, iov, offset, res: res if write else 100)
    k, v = random_pages(SMALL, 2, seed=9)
    with pytest.raises(OSError, match=r"disk: slots 0, 1: short read: got 100 of"):
        tier.read([0, 1], k, v)
    future = tier.read_async([1], k[:1], v[:1])
    assert isinstance(future.exception(timeout=10), OSError)


def test_disk_write_error_reaches_the_future(
    make_disk: Callable[..., DiskTier], monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = make_disk(SMALL, 4)

    def broken(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwritev", broken)
    monkeypatch.setattr(DiskTier, "_completed", lambda self, write, iov, offset, res: -errno.EIO if write else res)
    future = tier.write_async([0, 2], *random_pages(SMALL, 2, seed=10))
    error = future.exception(timeout=10)
    assert isinstance(error, OSError) and error.errno == errno.EIO


def test_disk_async_round_trip(make_disk: Callable[..., DiskTier]) -> None:
    tier = make_disk(SHAPES[1], 8)
    k, v = random_pages(SHAPES[1], 4, seed=11)
    write = tier.write_async([7, 3, 4, 5], k, v)
    assert isinstance(write, cf.Future)
    assert write.result(timeout=10) is None
    k_out, v_out = torch.zeros_like(k), torch.zeros_like(v)
    tier.read_async([7, 3, 4, 5], k_out, v_out).result(timeout=10)
    assert_same_bits(k_out, k)
    assert_same_bits(v_out, v)


def test_disk_many_concurrent_requests(make_disk: Callable[..., DiskTier]) -> None:
    """Many multi-page requests in flight on a 2-thread pool, from several caller threads at once."""
    shape = SHAPES[0]
    tier = make_disk(shape, 64, threads=2)
    groups = [list(range(i, 64, 16)) for i in range(16)]  # 16 requests of 4 non-consecutive slots
    pages = [random_pages(shape, 4, seed=100 + i) for i in range(16)]
    writes = [tier.write_async(g, k, v) for g, (k, v) in zip(groups, pages)]
    cf.wait(writes, timeout=20)
    assert all(f.done() and f.exception() is None for f in writes)

    outs = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in pages]
    reads: list[cf.Future[None]] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        future = tier.read_async(groups[i], *outs[i])
        with lock:
            reads.append(future)

    callers = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    done, not_done = cf.wait(reads, timeout=20)
    assert not not_done
    for (k, v), (k_out, v_out) in zip(pages, outs):
        assert_same_bits(k_out, k)
        assert_same_bits(v_out, v)


def test_disk_file_grows_from_its_reserve_and_keeps_its_pages(make_disk: Callable[..., DiskTier],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: the disk file was preallocated for the whole budget; it now starts at a reserve and allocate()
    grows it in steps, never past capacity, without moving pages already written."""
    import tiers.disk

    monkeypatch.setattr(tiers.disk, "GROW_STEP_BYTES", 0)
    tier = make_disk(SMALL, 40, reserve=2)
    path = Path(tier.path)
    assert path.stat().st_size == 2 * tier.slot_bytes == tier.file_bytes
    first = tier.allocate(2)
    k, v = random_pages(SMALL, 2, seed=21)
    tier.write(first, k, v)
    sizes = []
    for _ in range(38):
        (slot,) = tier.allocate(1)
        assert path.stat().st_size == tier.file_bytes > slot * tier.slot_bytes
        sizes.append(tier.file_bytes)
    assert tier.allocate(1) is None  # capacity is the cap
    assert sizes[-1] == 40 * tier.slot_bytes and 3 <= len(set(sizes)) < 38  # in steps, not page by page
    got_k, got_v = read_back(tier, first)
    assert_same_bits(got_k, k)
    assert_same_bits(got_v, v)


def test_disk_growth_without_space_takes_no_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug (growth's failure mode): a full disk while growing is the disk_dir error, and the slots stay free."""
    tier = DiskTier(SMALL, 8, str(tmp_path), reserve=1)
    try:
        monkeypatch.setattr("tiers.disk._free_bytes", lambda directory: 0)
        assert tier.allocate(1) == [0]  # inside the reserve: no growth needed
        with pytest.raises(ValueError, match=r"^disk_dir: .* free, the disk tier needs .* more"):
            tier.allocate(2)
        assert tier.num_free == 7 and Path(tier.path).stat().st_size == tier.slot_bytes
    finally:
        tier.close()
    assert kv_files(tmp_path) == []


# ---- host checksums --------------------------------------------------------------------------------------------


class _Copy:
    """A stand-in for the CUDA event of a copy still running: done once synchronized."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_host_pages_sealed_then_checked(dtype: torch.dtype) -> None:
    host = HostTier(PageShape(kv_heads=2, page_size=4, head_dim=8, dtype=dtype), 6, pin=False)
    slots = host.allocate(4)
    host.k[slots] = torch.randn(4, 2, 4, 8, dtype=dtype)
    host.v[slots] = torch.randn(4, 2, 4, 8, dtype=dtype)
    host.seal(slots[:3])  # slots[3] is never sealed: it passes whatever it holds
    assert host.damaged(slots) == []
    for slot, pool in ((slots[1], host.k), (slots[2], host.v), (slots[3], host.k)):
        raw = pool[slot].view(-1).view(torch.uint8)
        raw[-1] = raw[-1] ^ 1  # the last byte of the half
    assert host.damaged(slots) == [slots[1], slots[2]]
    host.release([slots[1]])  # a released slot is no longer sealed: the next page written there is sealed anew
    assert host.damaged(slots) == [slots[2]]
    host.seal([slots[2]])
    assert host.damaged(slots) == []
    # A page and its checksums copied to another slot fail there: the slot number seeds the hash, so a page
    # landing in the wrong slot is caught.
    moved = host.allocate(1)[0]
    host.k[moved], host.v[moved] = host.k[slots[0]], host.v[slots[0]]
    host.seal([moved])
    host._sums[2 * moved:2 * moved + 2] = host._sums[2 * slots[0]:2 * slots[0] + 2]
    assert host.damaged([moved]) == [moved]


def test_host_pages_of_a_running_copy_are_sealed_once_it_finishes() -> None:
    host = HostTier(PageShape(kv_heads=1, page_size=4, head_dim=8, dtype=torch.float32), 2, pin=False)
    slots = host.allocate(2)
    copy = _Copy()
    host.seal(slots, copy)  # the bytes may still change: nothing is hashed yet
    host.k[slots] = torch.randn(2, 1, 4, 8)  # what the copy writes
    assert host.damaged(slots) == [] and copy.done  # checking waited for the copy, then sealed what it wrote
    host.k[slots[0], 0, 0, 0] += 1
    assert host.damaged(slots) == [slots[0]]


def test_host_checksums_off_is_a_measurement_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HostTier, "checksums", False)
    host = HostTier(PageShape(kv_heads=1, page_size=4, head_dim=8, dtype=torch.float32), 2, pin=False)
    slots = host.allocate(1)
    host.seal(slots)
    host.k[slots[0]] += 1
    assert host.damaged(slots) == []


@pytest.mark.parametrize("where", ["_enable_direct", "_start_ring", "ThreadPoolExecutor"])
def test_an_interrupt_while_the_disk_tier_starts_leaves_no_file(tmp_path: Path, monkeypatch, where: str) -> None:
    """Bug: SIGTERM (raised as a KeyboardInterrupt by the CLI) landing after the slot file was created but before
    the tier had registered its cleanup left the file behind, as large as the disk budget (seen once in the CLI's
    SIGTERM test). Now the cleanup is registered before the file exists and runs on any exception in between."""
    import tiers.disk as disk

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target = disk.cf if where == "ThreadPoolExecutor" else DiskTier
    monkeypatch.setattr(target, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        DiskTier(SHAPES[0], 8, str(tmp_path / "kv"), engine="threads")
    assert list((tmp_path / "kv").iterdir()) == []
