"""Faults below the device, injected: a disk tier whose system calls fail on request, and damage done to its file.

`FaultyDisk` is a DiskTier whose positioned reads and writes consult a `Faults` plan: before the system call on
the thread pool's path (`_preadv`, `_pwritev`), on completion on the AIO path (`_completed`, which turns the
kernel's result into the fault's). `install(monkeypatch, faults)` makes the runtime build it instead of the real
tier. The file itself is damaged from outside with `flip`, `truncate` and `delete`, as a failing disk or another program would.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field

import pytest
import torch

import tiers.disk
from tiers.base import PageShape
from tiers.disk import DiskTier


@dataclass
class Faults:
    """What goes wrong, and how often. Counts are the number of calls that fail (-1: every call), taken after
    `after` calls of that kind succeeded."""

    read_eio: int = 0
    write_eio: int = 0
    write_enospc: int = 0
    short_read: int = 0
    after_reads: int = 0
    after_writes: int = 0
    stall_read: float = 0.0  # seconds each faulty read sleeps before answering (a stuck device)
    bad_slots: set[int] = field(default_factory=set)  # bad blocks: every read or write that touches them fails
    reads: int = 0
    writes: int = 0
    injected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _take(self, kind: str, count_attr: str, after: int, calls: int) -> bool:
        left = getattr(self, count_attr)
        if calls < after or left == 0:
            return False
        if left > 0:
            setattr(self, count_attr, left - 1)
        self.injected.append(kind)
        return True


class FaultyDisk(DiskTier):
    faults: Faults = Faults()

    def _touches_bad(self, iov: list[memoryview], offset: int) -> bool:
        first, end = offset // self.slot_bytes, -(-(offset + sum(len(b) for b in iov)) // self.slot_bytes)
        return any(first <= s < end for s in self.faults.bad_slots)

    def _draw(self, write: bool, iov: list[memoryview], offset: int) -> str | None:
        """The fault this call gets: "EIO", "short read" (reads), "ENOSPC" (writes) or None."""
        f = self.faults
        kind = "write" if write else "read"
        with f.lock:
            calls = f.writes if write else f.reads
            setattr(f, kind + "s", calls + 1)
            after = f.after_writes if write else f.after_reads
            if self._touches_bad(iov, offset) or f._take(f"{kind} EIO", f"{kind}_eio", after, calls):
                return "EIO"
            name, count = ("write ENOSPC", "write_enospc") if write else ("short read", "short_read")
            return ("ENOSPC" if write else name) if f._take(name, count, after, calls) else None

    def _injected(self, write: bool, iov: list[memoryview], offset: int) -> int | None:
        """The fault this call gets, after the stall a read takes: an errno (EIO, ENOSPC), 0 for a short read, or
        None."""
        fault = self._draw(write, iov, offset)
        if not write and self.faults.stall_read and (fault or self.faults.stall_read < 0):
            threading.Event().wait(abs(self.faults.stall_read))
        return {None: None, "EIO": errno.EIO, "ENOSPC": errno.ENOSPC}.get(fault, 0)

    def _preadv(self, iov: list[memoryview], offset: int) -> int:
        fault = self._injected(False, iov, offset)
        if fault:
            raise OSError(fault, os.strerror(fault))
        got = super()._preadv(iov, offset)
        return got // 2 if fault == 0 else got

    def _pwritev(self, iov: list[memoryview], offset: int) -> int:
        if fault := self._injected(True, iov, offset):
            raise OSError(fault, os.strerror(fault))
        return super()._pwritev(iov, offset)

    def _completed(self, write: bool, iov: list[memoryview], offset: int, res: int) -> int:
        fault = self._injected(write, iov, offset)
        return -fault if fault else res // 2 if fault == 0 else res


def install(monkeypatch: pytest.MonkeyPatch, faults: Faults) -> list[FaultyDisk]:
    """Makes runtimes build FaultyDisk tiers that follow `faults`; returns the list the tiers built are added to."""
    built: list[FaultyDisk] = []

    class Tier(FaultyDisk):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    Tier.faults = faults
    monkeypatch.setattr(tiers.disk, "DiskTier", Tier)
    return built


def flip(path: str | os.PathLike, offset: int, nbytes: int = 16) -> None:
    """Inverts `nbytes` bytes of the file at `offset`, past any cache (O_DIRECT is not needed: reads see it)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(nbytes))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
        f.flush()
        os.fsync(f.fileno())


def truncate(path: str | os.PathLike, nbytes: int = 0) -> None:
    os.truncate(path, nbytes)


def delete(path: str | os.PathLike) -> None:
    os.unlink(path)


def skip_without_aio(directory: str | os.PathLike) -> None:
    """Skips the test where the disk tier can't use native AIO in `directory` (a file system without O_DIRECT, such
    as tmpfs, or a kernel without AIO): the aio cases can't run there."""
    try:
        DiskTier(PageShape(kv_heads=1, page_size=64, head_dim=16, dtype=torch.float32), 1, str(directory),
                 engine="aio").close()
    except ValueError as e:
        pytest.skip(str(e))
