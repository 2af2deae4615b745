"""The native AIO ring (tiers/aio.py) on its own: vectored O_DIRECT reads and writes, more ops than the ring holds,
ops the kernel refuses, and closing."""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import faults
from tiers import aio

BLOCK = 4096


@pytest.fixture
def direct_file(tmp_path: Path) -> Iterator[int]:
    """A file opened with O_DIRECT; the test is skipped where the disk tier itself couldn't use AIO here."""
    faults.skip_without_aio(tmp_path)
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(64 * BLOCK))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    yield fd
    os.close(fd)


def address(buf: mmap.mmap, offset: int = 0) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) + offset


class Results:
    """Collects the ops' results; `wait(n)` blocks until n have come."""

    def __init__(self) -> None:
        self.got: dict[int, int] = {}
        self.cv = threading.Condition()
        self.threads: set[str] = set()

    def done(self, key: int):
        def call(res: int) -> None:
            with self.cv:
                self.got[key] = res
                self.threads.add(threading.current_thread().name)
                self.cv.notify_all()
        return call

    def wait(self, n: int) -> dict[int, int]:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.got) >= n, timeout=10), self.got
        return self.got


def test_vectored_writes_and_reads_in_more_ops_than_the_ring_holds(direct_file: int) -> None:
    """20 ops on a ring of 4: submit waits for room, every op completes once, with its bytes."""
    ring = aio.Ring(depth=4, name="test-aio")
    src, dst = mmap.mmap(-1, 40 * BLOCK), mmap.mmap(-1, 40 * BLOCK)
    src.write(os.urandom(40 * BLOCK))
    try:
        # Op i writes blocks 2i and 2i + 1 of src, in the other order, to file blocks 2i, 2i + 1 (two iovecs).
        writes, results = [], Results()
        for i in range(20):
            buffers = [(address(src, (2 * i + 1) * BLOCK), BLOCK), (address(src, 2 * i * BLOCK), BLOCK)]
            writes.append(aio.Op(True, direct_file, 2 * i * BLOCK, buffers, results.done(i)))
        ring.submit(writes)
        assert results.wait(20) == {i: 2 * BLOCK for i in range(20)}
        assert results.threads == {"test-aio"}
        reads, back = [], Results()
        for i in range(20):
            reads.append(aio.Op(False, direct_file, 2 * i * BLOCK, [(address(dst, 2 * i * BLOCK), 2 * BLOCK)],
                                back.done(i)))
        ring.submit(reads)
        assert back.wait(20) == {i: 2 * BLOCK for i in range(20)}
        for i in range(20):
            a, b = 2 * i * BLOCK, (2 * i + 1) * BLOCK
            assert dst[a:b] == src[b:b + BLOCK] and dst[b:b + BLOCK] == src[a:b]
        assert ring.in_flight == 0
    finally:
        assert ring.close(5)
    assert not ring.alive()


def test_results_carry_short_reads_and_errors(direct_file: int, tmp_path: Path) -> None:
    """A read past the end moves 0 bytes; an unaligned O_DIRECT offset and a closed descriptor are -errno, the
    second refused at submission, on the submitting thread; the ring goes on serving."""
    ring = aio.Ring(depth=8)
    buf = mmap.mmap(-1, BLOCK)
    try:
        r = Results()
        ring.submit([aio.Op(False, direct_file, 64 * BLOCK, [(address(buf), BLOCK)], r.done(0)),
                     aio.Op(False, direct_file, 100, [(address(buf), BLOCK)], r.done(1))])
        assert r.wait(2) == {0: 0, 1: -errno.EINVAL}
        bad = os.open(tmp_path / "closed", os.O_CREAT | os.O_RDWR)
        os.close(bad)
        refused = Results()
        ring.submit([aio.Op(False, bad, 0, [(address(buf), BLOCK)], refused.done(0))])
        assert refused.got == {0: -errno.EBADF} and refused.threads == {threading.current_thread().name}
        # In the middle of a batch: only that op fails; those after it are still submitted.
        mixed = Results()
        ring.submit([aio.Op(False, direct_file, 0, [(address(buf), BLOCK)], mixed.done(0)),
                     aio.Op(False, bad, 0, [(address(buf), BLOCK)], mixed.done(1)),
                     aio.Op(False, direct_file, BLOCK, [(address(buf), BLOCK)], mixed.done(2))])
        assert mixed.wait(3) == {0: BLOCK, 1: -errno.EBADF, 2: BLOCK}
    finally:
        assert ring.close(5)


def test_a_closed_ring_refuses_ops_and_a_failing_callback_stops_nothing(direct_file: int) -> None:
    ring = aio.Ring(depth=2)
    buf = mmap.mmap(-1, BLOCK)

    def broken(res: int) -> None:
        raise RuntimeError("a bug in a callback")

    r = Results()
    ring.submit([aio.Op(False, direct_file, 0, [(address(buf), BLOCK)], broken),
                 aio.Op(False, direct_file, BLOCK, [(address(buf), BLOCK)], r.done(0))])
    assert r.wait(1) == {0: BLOCK}
    assert ring.alive()
    assert ring.close(5)
    late = Results()
    ring.submit([aio.Op(False, direct_file, 0, [(address(buf), BLOCK)], late.done(0))])
    assert late.got == {0: -errno.ESHUTDOWN}
