"""The disk tier's faults, at the tier level (no model): damage done to its file (flipped bytes, a page copied
over another, truncation, deletion) and failing system calls (EIO, ENOSPC, short reads). Each must come back as a
PageError naming exactly the slots concerned, the rest of the file must stay readable, and close() must leave the
directory empty.

Every test runs over a page shape that takes O_DIRECT (halves a multiple of 4 KiB: no padding), with each I/O
engine (native AIO, the thread pool), and an odd one (buffered, padded slots: the thread pool), so every I/O path
and both file layouts are covered.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import faults
from faults import Faults, FaultyDisk
import tiers.disk
from tiers.base import PageError, PageShape
from tiers.disk import DiskTier

ALIGNED = PageShape(kv_heads=2, page_size=16, head_dim=64, dtype=torch.float32)  # 8 KiB halves
ODD = PageShape(kv_heads=3, page_size=5, head_dim=7, dtype=torch.float32)  # 420 B halves, padded slots
# The cases: a page shape and the I/O engine its tiers use.
CASES = {"aligned-aio": (ALIGNED, "aio"), "aligned-threads": (ALIGNED, "threads"), "odd": (ODD, "threads")}

MakeTier = Callable[..., FaultyDisk]


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def shape(case: str) -> PageShape:
    return CASES[case][0]


@pytest.fixture
def make(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakeTier]:
    """Builds FaultyDisk tiers (no fault planned unless `faults` is given) in tmp_path, with the case's I/O engine
    (the thread pool in tests without cases); closes them at the end and checks that nothing is left in the
    directory."""
    made: list[FaultyDisk] = []
    engine = CASES[request.getfixturevalue("case")][1] if "case" in request.fixturenames else "threads"
    if engine == "aio":
        faults.skip_without_aio(tmp_path)

    def build(shape: PageShape, capacity: int = 8, plan: Faults | None = None, **kwargs: object) -> FaultyDisk:
        kwargs.setdefault("engine", engine)
        tier = FaultyDisk(shape, capacity, str(tmp_path), **kwargs)  # type: ignore[arg-type]
        tier.faults = plan or Faults()
        made.append(tier)
        return tier

    yield build
    for tier in made:
        tier.close()
    assert os.listdir(tmp_path) == []


def pages(shape: PageShape, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random, distinct K and V pages, [n, H, P, D] each."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, *shape.dims), generator=g) + 3).to(shape.dtype), \
        (torch.randn((n, *shape.dims), generator=g) - 3).to(shape.dtype)


def read(tier: DiskTier, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.zeros((len(slots), *tier.shape.dims), dtype=tier.shape.dtype)
    v = torch.zeros_like(k)
    tier.read(slots, k, v)
    return k, v


def assert_pages(tier: DiskTier, slots: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
    got_k, got_v = read(tier, slots)
    assert torch.equal(got_k.view(torch.int32), k.view(torch.int32))
    assert torch.equal(got_v.view(torch.int32), v.view(torch.int32))


def read_error(tier: DiskTier, slots: list[int]) -> PageError:
    with pytest.raises(PageError) as info:
        read(tier, slots)
    assert info.value.tier == "disk"
    return info.value


def filled(make: MakeTier, shape: PageShape, capacity: int = 8, **kwargs: object):
    """A tier whose every slot holds a page; returns it and the pages."""
    tier = make(shape, capacity, **kwargs)
    k, v = pages(shape, capacity, seed=capacity)
    tier.write(list(range(capacity)), k, v)
    return tier, k, v


# --- damage to the file ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", ["K", "V"])
def test_flipped_bytes_fail_only_their_slot(make: MakeTier, shape: PageShape, half: str) -> None:
    tier, k, v = filled(make, shape)
    inside = 3 if half == "K" else shape.k_bytes + 3
    faults.flip(tier.path, 5 * tier.slot_bytes + inside, 4)
    error = read_error(tier, list(range(8)))
    assert error.slots == [5] and error.errno == errno.EIO
    assert error.cause == f"checksum mismatch in the {half} half"
    assert str(error) == f"[Errno 5] disk: slot 5: checksum mismatch in the {half} half"
    alone = read_error(tier, [5])
    assert alone.slots == [5]
    others = [0, 1, 2, 3, 4, 6, 7]
    assert_pages(tier, others, k[others], v[others])


def test_damage_in_several_calls_is_one_error_listing_every_slot(make: MakeTier, shape: PageShape) -> None:
    """A read cut into 4 calls (4 threads) with two damaged pages in different calls: one PageError, both slots."""
    tier, k, v = filled(make, shape, threads=4)
    faults.flip(tier.path, 1 * tier.slot_bytes + 8)
    faults.flip(tier.path, 6 * tier.slot_bytes + shape.k_bytes + 8)
    error = read_error(tier, [7, 6, 5, 4, 3, 2, 1, 0])
    assert error.slots == [1, 6]
    assert "checksum mismatch in the K half" in error.cause and "checksum mismatch in the V half" in error.cause


def test_padding_is_not_checked(make: MakeTier) -> None:
    """Only the page bytes are hashed: damage in a slot's padding changes nothing read back."""
    tier, k, v = filled(make, ODD)
    assert tier.slot_bytes > ODD.page_bytes
    faults.flip(tier.path, 2 * tier.slot_bytes + ODD.page_bytes, 16)
    assert_pages(tier, list(range(8)), k, v)


def test_a_page_copied_over_another_slot_is_caught(make: MakeTier, shape: PageShape) -> None:
    """The checksums are seeded with the slot: a page that is intact but in the wrong place fails."""
    tier, k, v = filled(make, shape)
    with open(tier.path, "r+b") as f:
        f.seek(2 * tier.slot_bytes)
        page = f.read(tier.slot_bytes)
        f.seek(6 * tier.slot_bytes)
        f.write(page)
    error = read_error(tier, [2, 6])
    assert error.slots == [6] and error.cause == "checksum mismatch in both halves"
    assert_pages(tier, [2], k[2:3], v[2:3])


def test_truncated_file_is_a_short_read_naming_the_call(make: MakeTier, shape: PageShape) -> None:
    tier, k, v = filled(make, shape, threads=1)
    faults.truncate(tier.path, 4 * tier.slot_bytes)
    error = read_error(tier, [6, 5, 7])  # one call: slots 5..7, all past the end
    want = 2 * tier.slot_bytes + shape.page_bytes
    assert error.slots == [5, 6, 7] and error.cause == f"short read: got 0 of {want} bytes"
    error = read_error(tier, [3, 4])  # one call, cut in its middle
    assert error.slots == [3, 4] and error.cause == f"short read: got {tier.slot_bytes} of " \
        f"{tier.slot_bytes + shape.page_bytes} bytes"
    assert_pages(tier, [0, 1, 2], k[:3], v[:3])


def test_a_deleted_file_still_works_until_close(make: MakeTier, shape: PageShape, tmp_path: Path) -> None:
    """Linux keeps the inode of an open file: pages can still be written and read; close() leaves no file."""
    tier, k, v = filled(make, shape)
    faults.delete(tier.path)
    assert os.listdir(tmp_path) == []
    k2, v2 = pages(shape, 2, seed=99)
    tier.write([7, 1], k2, v2)
    k[7], v[7], k[1], v[1] = k2[0], v2[0], k2[1], v2[1]
    assert_pages(tier, list(range(8)), k, v)
    tier.close()  # the fixture checks the directory again


# --- failing system calls -------------------------------------------------------------------------------------


def test_read_eio_names_the_slots_of_the_call(make: MakeTier, shape: PageShape) -> None:
    tier, k, v = filled(make, shape, threads=1)
    tier.faults.read_eio = 1
    error = read_error(tier, [4, 2, 3])
    assert error.slots == [2, 3, 4] and error.errno == errno.EIO
    assert error.cause == "read failed: [Errno 5] Input/output error"
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.EIO
    assert tier.faults.injected == ["read EIO"]
    assert_pages(tier, [4, 2, 3], k[[4, 2, 3]], v[[4, 2, 3]])  # a transient error: the pages are intact


def test_read_eio_in_every_call_lists_every_slot(make: MakeTier, shape: PageShape) -> None:
    tier, _, _ = filled(make, shape, threads=4)
    tier.faults.read_eio = -1
    future = tier.read_async([0, 2, 4, 6, 1], *pages(shape, 5, seed=1))
    error = future.exception(timeout=10)
    assert isinstance(error, PageError) and error.slots == [0, 1, 2, 4, 6] and error.errno == errno.EIO
    # Threads: [0, 1], [2] (ceil(5 / 4) = 2 pages a call), [4], [6]; AIO: [0, 1, 2], [4], [6].
    assert tier.faults.reads == (3 if tier.engine == "aio" else 4)


def test_a_failed_call_names_its_slots_only(make: MakeTier, shape: PageShape) -> None:
    """One thread, two calls ([0, 1] and [5]): the first fails; the error names its slots, not slot 5's."""
    tier, k, v = filled(make, shape, threads=1)
    tier.faults.read_eio = 1
    error = read_error(tier, [5, 1, 0])
    assert error.slots == [0, 1] and tier.faults.reads == 2
    tier.faults.write_eio = 1
    with pytest.raises(PageError) as info:
        tier.write([5, 1, 0], k[[5, 1, 0]], v[[5, 1, 0]])
    assert info.value.slots == [0, 1]
    assert read_error(tier, [0, 1, 5]).slots == [0, 1]
    assert_pages(tier, [5], k[5:6], v[5:6])


def test_write_eio_names_the_slots_and_leaves_them_unreadable(make: MakeTier, shape: PageShape) -> None:
    """A failed write may have left a page half old, half new: its slots must fail when read, not return the old
    page as good, until they are written again."""
    tier, k, v = filled(make, shape, threads=1)
    tier.faults.write_eio = 1
    k2, v2 = pages(shape, 2, seed=5)
    with pytest.raises(PageError) as info:
        tier.write([4, 3], k2, v2)
    error = info.value
    assert error.slots == [3, 4] and error.errno == errno.EIO
    assert error.cause == "write failed: [Errno 5] Input/output error"
    assert isinstance(error.__cause__, OSError)
    error = read_error(tier, [2, 3, 4, 5])
    assert error.slots == [3, 4] and error.cause == "its last write failed"
    assert_pages(tier, [2, 5], k[[2, 5]], v[[2, 5]])
    tier.write([4, 3], k2, v2)  # written again: readable again
    assert_pages(tier, [3, 4], k2[[1, 0]], v2[[1, 0]])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_a_full_disk_is_enospc(make: MakeTier, shape: PageShape, monkeypatch: pytest.MonkeyPatch,
                               code: int) -> None:
    tier = make(shape, 4, threads=1)

    def full(self: DiskTier, iov: list[memoryview], offset: int) -> int:
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as m:
        m.setattr(DiskTier, "_pwritev", full)
        m.setattr(FaultyDisk, "_completed", lambda self, write, iov, offset, res: -code if write else res)
        future = tier.write_async([1, 2], *pages(shape, 2, seed=6))
        error = future.exception(timeout=10)
    assert isinstance(error, PageError) and error.errno == errno.ENOSPC and error.slots == [1, 2]
    assert error.cause.startswith("write failed: the disk is full")
    assert read_error(tier, [1]).cause == "its last write failed"


def test_enospc_from_the_fault_plan_in_one_of_several_calls(make: MakeTier, shape: PageShape) -> None:
    """Two calls, the second fails with ENOSPC: the error names its slots only, and says the disk is full."""
    tier = make(shape, 8, Faults(write_enospc=1, after_writes=1), threads=2)
    k, v = pages(shape, 4, seed=7)
    with pytest.raises(PageError) as info:
        tier.write([0, 1, 4, 5], k, v)  # calls [0, 1] and [4, 5], in flight together: either may be second
    assert info.value.errno == errno.ENOSPC and info.value.slots in ([0, 1], [4, 5])
    assert "the disk is full" in info.value.cause
    good = [0, 1] if info.value.slots == [4, 5] else [2, 3]
    assert_pages(tier, [s for s in (0, 1, 4, 5) if s not in info.value.slots], k[good], v[good])


def test_short_read_from_the_fault_plan(make: MakeTier, shape: PageShape) -> None:
    tier, k, v = filled(make, shape, threads=1)
    tier.faults.short_read = 1
    error = read_error(tier, [0, 1])
    want = tier.slot_bytes + shape.page_bytes
    assert error.slots == [0, 1] and error.cause == f"short read: got {want // 2} of {want} bytes"
    assert_pages(tier, [0, 1], k[:2], v[:2])


# --- slots that hold no page ----------------------------------------------------------------------------------


def test_a_slot_never_written_or_released_cant_be_read(make: MakeTier, shape: PageShape) -> None:
    tier = make(shape, 4)
    slots = tier.allocate(2)
    assert slots == [0, 1]
    k, v = pages(shape, 1, seed=8)
    tier.write([0], k, v)
    error = read_error(tier, [0, 1])
    assert error.slots == [1] and error.cause == "never written"
    tier.release([0])
    assert read_error(tier, [0]).cause == "never written"
    tier.write([1], k, v)
    tier.reset()
    assert read_error(tier, [1]).slots == [1]


def test_checksums_off_is_a_measurement_switch(make: MakeTier, shape: PageShape,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Off, pages are neither hashed nor checked; pages written while it was off are never checked."""
    tier, k, v = filled(make, shape)
    monkeypatch.setattr(DiskTier, "checksums", False)
    k2, v2 = pages(shape, 1, seed=9)
    tier.write([3], k2, v2)
    faults.flip(tier.path, 3 * tier.slot_bytes + 4)
    faults.flip(tier.path, 5 * tier.slot_bytes + 4)
    read(tier, [3, 5])  # damaged, but nothing is checked
    monkeypatch.setattr(DiskTier, "checksums", True)
    assert read_error(tier, [3, 4, 5]).slots == [5]  # slot 3 was written unhashed


# --- fewer, larger calls --------------------------------------------------------------------------------------


def count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Records the bytes of every preadv and pwritev the tier makes (AIO calls: as they complete)."""
    calls: dict[str, list[int]] = {"read": [], "write": []}
    real_read, real_write, real_completed = DiskTier._preadv, DiskTier._pwritev, FaultyDisk._completed

    def counted_completed(self: DiskTier, write: bool, iov: list[memoryview], offset: int, res: int) -> int:
        calls["write" if write else "read"].append(sum(len(b) for b in iov))
        return real_completed(self, write, iov, offset, res)

    def counted_read(self: DiskTier, iov: list[memoryview], offset: int) -> int:
        calls["read"].append(sum(len(b) for b in iov))
        return real_read(self, iov, offset)

    def counted_write(self: DiskTier, iov: list[memoryview], offset: int) -> int:
        calls["write"].append(sum(len(b) for b in iov))
        return real_write(self, iov, offset)

    monkeypatch.setattr(DiskTier, "_preadv", counted_read)
    monkeypatch.setattr(DiskTier, "_pwritev", counted_write)
    monkeypatch.setattr(FaultyDisk, "_completed", counted_completed)
    return calls


@pytest.mark.parametrize(("threads", "calls"), [(1, 1), (2, 2), (4, 4)])
def test_shuffled_consecutive_slots_are_one_call_per_thread(make: MakeTier, shape: PageShape,
                                                             monkeypatch: pytest.MonkeyPatch, threads: int,
                                                             calls: int) -> None:
    """The thread pool cuts a run into a call per thread; AIO into calls of at most AIO_CALL_BYTES."""
    tier = make(shape, 16, threads=threads)
    counted = count_calls(monkeypatch)
    slots = [9, 3, 14, 0, 7, 12, 5, 1, 10, 15, 2, 8, 6, 13, 4, 11]
    k, v = pages(shape, 16, seed=10)
    tier.write(slots, k, v)
    assert_pages(tier, slots[::-1], k.flip(0), v.flip(0))
    if tier.engine == "aio":
        calls = -(-16 * tier.slot_bytes // tiers.disk.AIO_CALL_BYTES)
    assert len(counted["write"]) == len(counted["read"]) == calls


def test_aio_cuts_long_runs_into_calls_in_flight_together(make: MakeTier, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """A run longer than AIO_CALL_BYTES is several calls, each at most that long, all in the kernel at once."""
    faults.skip_without_aio(tmp_path)
    monkeypatch.setattr(tiers.disk, "AIO_CALL_BYTES", 4 * ALIGNED.page_bytes)
    tier = make(ALIGNED, 16, engine="aio")
    counted = count_calls(monkeypatch)
    k, v = pages(ALIGNED, 14, seed=11)
    tier.write(list(range(14)), k, v)
    assert counted["write"] == [4 * ALIGNED.page_bytes] * 3 + [2 * ALIGNED.page_bytes] or \
        sorted(counted["write"]) == [2 * ALIGNED.page_bytes] + [4 * ALIGNED.page_bytes] * 3
    assert_pages(tier, list(range(14)), k, v)
    assert sorted(counted["read"]) == sorted(counted["write"])


def test_allocate_hands_out_ascending_slots(make: MakeTier, shape: PageShape) -> None:
    """Released slots come back off the free stack in reverse; allocate() sorts them, so the pages of one
    allocation are one run of the file."""
    tier = make(shape, 8)
    assert tier.allocate(8) == list(range(8))
    tier.release([2, 3, 4, 5])
    assert tier.allocate(4) == [2, 3, 4, 5]
