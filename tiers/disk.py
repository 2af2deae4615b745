"""A directory on disk: one file of page slots, preallocated in steps, read and written with positioned I/O,
every page checked against a checksum when it is read back.

Size: the file starts with `reserve` slots (what the runtime expects the sequence to need) and `allocate()`
grows it, with fallocate, in steps of at least a quarter of its size (and GROW_STEP_BYTES) whenever it hands out
a slot past the end, never beyond `capacity` slots (the disk budget). Growing never moves existing slots, so pages
already written stay where they are and I/O in flight is unaffected. A full disk at any step is a ValueError
naming disk_dir, as at construction.

Layout: the file `offload-<pid>-<hex>.kv` holds up to `capacity` slots of `slot_bytes` = page_bytes rounded up to
4 KiB. Slot s keeps K at byte s * slot_bytes and V right after it, at s * slot_bytes + k_bytes; the rest
of the slot is padding. When k_bytes and v_bytes are multiples of 4 KiB both halves start on a 4 KiB boundary, there
is no padding, and a run of consecutive slots is one contiguous extent: that is the only layout in which
O_DIRECT is used (`direct`). Any other page shape gets buffered I/O.

Requests: a request's slots are sorted and cut into runs of consecutive slots, whatever the order of the pages
in the caller's buffers (an iovec may point anywhere in them). `allocate()` hands out ascending slots, so the pages
of one allocation are one run. Calls touch disjoint bytes, so they need no lock. Two engines (`engine`,
the runtime's `io_engine`):

- "threads" (the default; see the NOTE at IO_ENGINES): runs are cut into calls of at most ceil(n / threads)
  pages, one preadv/pwritev each, and the calls are grouped into at most `threads` tasks for the tier's pool, so
  that every thread has work. Positioned I/O releases the GIL.
- "aio" (O_DIRECT only): runs are cut into calls of at most AIO_CALL_BYTES, and one io_submit puts all of a
  request's calls in the kernel at once (tiers/aio.py); the ring's thread checks each call's pages as it
  completes. Scattered 48 KiB pages need many calls in flight to reach the device's bandwidth, which a pool of a
  few threads, one blocking call each, can't give.
NOTE: reading through small gaps between runs (into scratch) to make fewer, longer calls was measured
(benchmarks/disk_tier.py's device) and dropped: the bytes of the gaps cost more than the calls saved.

Checksums: per slot, an xxh3-64 of the K half and one of the V half, seeded with the slot number, so that a page
read from the wrong place fails too; padding is not hashed. A task records them, from the source buffers, once its
pwritev calls succeeded; it checks the pages it read right after its preadv calls, before anything is copied out
(a bounce buffer's copy-back comes after). They live in memory only (2 x capacity uint64, and a state byte per
slot), for the life of the file. Failures are `PageError`s (tiers/base.py) that name the slots concerned:

- a checksum mismatch names only the damaged slots, and the half (K, V) that differs;
- a slot never written since it was handed out, or whose last write failed, can't be read either;
- a short read (a truncated file), or an OSError from preadv/pwritev, names every slot of the call;
- a failed write leaves its slots unreadable until they are written again; ENOSPC and EDQUOT are errno ENOSPC,
  "the disk is full".

A request whose calls fail raises one PageError listing the slots of all of them.

NOTE: the async calls fan the tasks out and join them with a done-callback, never with a worker waiting on
other workers: a worker blocked on tasks queued behind it would deadlock a busy pool. The sync calls are
the async ones plus `.result()`.

Lifecycle: construct (removes files of dead processes, checks free space, preallocates the reserve) ->
allocate (grows the file when needed) / read / write / release ->
close(), which removes the file; a weakref.finalize removes it at exit if close() was never called.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import psutil
import torch
import xxhash

from tiers import aio
from tiers.base import PageError, PageShape, Tier, WorkerDied
from tiers.host import aligned_host_tensor

logger = logging.getLogger(__name__)

# O_DIRECT wants file offsets, lengths and buffer addresses aligned to the logical block size; 4 KiB
# covers the devices we meet (512 B and 4 KiB sectors).
ALIGN = 4096
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
# One call carries at most IOV_MAX iovecs (3 per page: K, V, padding) and Linux moves at most ~2 GiB per call.
_MAX_IOVECS = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
_MAX_CALL_BYTES = 1 << 30
_FILE_RE = re.compile(r"offload-(\d+)-[0-9a-f]+\.kv")
# How long closing the tier waits for calls still running (a failing device may never answer).
CLOSE_WAIT_SECONDS = 30.0
# The smallest growth step: fallocate calls stay few even when pages are small.
GROW_STEP_BYTES = 16 << 20

# The I/O engines (`io_engine`): "threads" (a pool of threads, one preadv/pwritev each at a time; the default)
# and "aio" (Linux native AIO, tiers/aio.py; O_DIRECT only).
# NOTE: aio reads scattered small pages faster (benchmarks/disk_tier.py: 16-page random requests of 48 KiB pages at
# 0.69 of the raw 1 MiB read rate, against 0.47 with 4 threads), but exact decode on the 2-core CPU machine, with
# 83% of the KV on disk, stalled more with it (benchmarks/disk_stall.py, side by side: 22-25% of decode time against
# 14-17%, steps 334-385 ms against 286-315): the calls of the next request enter the device queue beside those of
# the one attention waits for, where the pool serves requests in order (BENCHMARKS.md, "Two I/O engines").
# With the deeper load ring (load_buffers 4, the default with a disk tier) both stall about 1% or less, and the
# pool's steps are still the faster (340-346 ms against 383-411). Hence threads by default.
IO_ENGINES = ("threads", "aio")
# aio: the most bytes one call moves (runs of consecutive slots are cut there, so that a long run is several
# calls the device serves side by side), and the most calls in the kernel at once per tier.
AIO_CALL_BYTES = 256 << 10
AIO_DEPTH = 256

# Slot states. A slot is readable only when INTACT (its checksums are checked) or UNHASHED (written while
# `checksums` was off: never checked).
_NEVER, _INTACT, _LOST, _UNHASHED = 0, 1, 2, 3


def _format_size(n: float) -> str:
    # Local twin of offload.sizes.format_size: tiers must not import the offload package (import cycle).
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, no copy (bf16 has no numpy dtype; uint8 does)."""
    return memoryview(t.detach().view(torch.uint8).reshape(-1).numpy())


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def remove_stale_files(directory: str) -> None:
    """Removes slot files of dead processes, so a killed run neither fills the disk nor blocks the next one."""
    for entry in os.scandir(directory):
        m = _FILE_RE.fullmatch(entry.name)
        if m is None or psutil.pid_exists(int(m.group(1))):
            continue
        try:
            size = entry.stat().st_size
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another process cleaned it up first
        except OSError as e:
            # Someone else's file (another user in a shared directory): not ours to fail on.
            logger.warning("disk tier: can't remove stale %s: %s", entry.path, e)
            continue
        logger.info("disk tier: removed %s (%s) left by dead process %s", entry.path, _format_size(size), m.group(1))


def _space_message(directory: str, free: int, need: int, more: bool = False) -> str:
    return (
        f"disk_dir: {directory} has {_format_size(free)} free, the disk tier needs {_format_size(need)}"
        f"{' more' if more else ''}; lower disk_budget or free space"
    )


def _preallocate(fd: int, start: int, end: int) -> None:
    """Makes bytes [start, end) of the file real blocks, so a full disk fails here, not at some later write."""
    if end > start and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, start, end - start)
        except OSError as e:
            # Only a file system without fallocate may fall back to a sparse file.
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, end)  # a no-op after posix_fallocate


def _create_file(path: str, nbytes: int) -> int:
    """Creates and preallocates the slot file; leaves nothing behind when that fails."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        _preallocate(fd, 0, nbytes)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def _cleanup(held: dict, path: str) -> None:
    """Removes the slot file and ends its I/O: `held` has what exists so far ("fd", "pool", "ring"; None until
    made), as the tier's constructor may stop at any point (a signal raising KeyboardInterrupt)."""
    # The name goes first: a call stuck on a failing device (which the runtime gave up on after io_timeout) keeps
    # the close waiting below, and the directory is already clean if the process is killed meanwhile.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # not raised from a finalizer: the I/O below must still end
        logger.warning("disk tier: could not remove %s (%s)", path, e.strerror or e)
    # Calls in flight still use fd: it is closed once they end. A call stuck for longer than CLOSE_WAIT_SECONDS
    # keeps it open (the process's exit frees it) rather than hang the exit.
    ring, pool, fd = held["ring"], held["pool"], held["fd"]
    finished = True
    if ring is not None:
        finished = ring.close(CLOSE_WAIT_SECONDS)
    elif pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        for t in list(pool._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        finished = not any(t.is_alive() for t in pool._threads)
    if fd is None:
        return
    if finished:
        os.close(fd)
    else:
        logger.warning("disk tier: a call on %s is stuck; its file descriptor stays open", path)


class DiskTier(Tier):
    name = "disk"
    # A measurement switch, not an option (benchmarks/checksum_cost.py times what checksums cost): False stops
    # hashing pages written and checking pages read. Pages written while it is False are never checked.
    checksums: bool = True

    def __init__(
        self, shape: PageShape, capacity: int, directory: str, threads: int = 4, direct: bool | None = None,
        reserve: int | None = None, engine: str = "threads",
    ):
        """`direct`: None uses O_DIRECT where the file system and the page shape allow it, False never, True
        raises ValueError where it can't. `reserve`: slots preallocated now (None: all `capacity`); the file
        grows from there as slots are allocated. `engine`: one of IO_ENGINES; "aio" raises ValueError where it
        can't be used. `threads`: the pool's threads (engine "threads")."""
        super().__init__(shape, capacity)
        if threads < 1:
            raise ValueError(f"disk: threads must be >= 1, got {threads}")
        if engine not in IO_ENGINES:
            raise ValueError(f"io_engine: expected one of {', '.join(IO_ENGINES)}, got {engine!r}")
        self.slot_bytes = -(-shape.page_bytes // ALIGN) * ALIGN
        self._threads = threads
        self._pages_per_call = max(1, min(_MAX_IOVECS // 3, _MAX_CALL_BYTES // self.slot_bytes))
        # The xxh3 of each slot's K half (at 2 s) and V half (at 2 s + 1), and each slot's state (_NEVER, ...).
        # NOTE: np.zeros maps large arrays lazily (calloc), so a big capacity costs memory only for the slots
        # handed out, and those are the lowest.
        self._sums = np.zeros(2 * capacity, dtype=np.uint64)
        self._state = np.zeros(capacity, dtype=np.uint8)
        # NOTE: the I/O threads read and write them one slot at a time through memoryviews (Python ints), never
        # with numpy calls: numpy may let go of the GIL inside a call, and taking it back can wait for the
        # compute thread for up to the interpreter's switch interval; a few such waits per request, measured
        # in a decode step, cost more than hashing the pages.
        self._sums_at, self._state_at = memoryview(self._sums), memoryview(self._state)
        directory = os.fspath(directory)
        self._directory = directory
        # At least one slot: the O_DIRECT probe needs a block to read.
        self.reserved = capacity if reserve is None else max(min(1, capacity), min(int(reserve), capacity))
        need = self.reserved * self.slot_bytes
        self._path = os.path.join(directory, f"offload-{os.getpid()}-{secrets.token_hex(6)}.kv")
        # The cleanup is registered before the file exists: a KeyboardInterrupt (Ctrl-C, or SIGTERM in the CLI)
        # may land anywhere below, and the file must not outlive the process (at the latest, the finalizer runs
        # at its exit).
        held: dict = {"fd": None, "pool": None, "ring": None}
        self._finalizer = weakref.finalize(self, _cleanup, held, self._path)
        try:
            os.makedirs(directory, exist_ok=True)
            remove_stale_files(directory)
            if (free := _free_bytes(directory)) < need:
                raise ValueError(_space_message(directory, free, need))
            fd = held["fd"] = _create_file(self._path, need)
        except BaseException as e:
            self._finalizer()
            if not isinstance(e, OSError):
                raise
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ValueError(_space_message(directory, _free_bytes(directory), need)) from e
            raise ValueError(f"disk_dir: {directory} is not writable ({e.strerror or e})") from e
        try:
            self.direct = self._enable_direct(fd, directory, direct)
            self._ring = held["ring"] = self._start_ring(engine)
            self.engine = engine
            self._fd = fd
            # The padding between two pages of one call (buffered I/O only): zeros to write, scratch to read into.
            pad = self.slot_bytes - shape.page_bytes
            self._zeros, self._scratch = memoryview(bytes(pad)), memoryview(bytearray(pad))
            self._pool = held["pool"] = (None if self._ring else
                                         cf.ThreadPoolExecutor(threads, thread_name_prefix="offload-disk"))
        except BaseException:
            self._finalizer()
            raise
        logger.debug("disk tier: %s, %d of %d slots of %d B, direct=%s, engine %s", self._path, self.reserved,
                     capacity, self.slot_bytes, self.direct, self.engine)

    def _enable_direct(self, fd: int, directory: str, want: bool | None) -> bool:
        if want is False:
            self._no_direct = "direct=False"
            return False
        if (odd := next((b for b in (self.shape.k_bytes, self.shape.v_bytes) if b % ALIGN), None)) is not None:
            reason = f"the half-page size {odd} B is not a multiple of {ALIGN}"
        elif not _O_DIRECT:
            reason = "this platform has no O_DIRECT"
        else:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
                if self.reserved:
                    # Some file systems accept the flag and only fail the first aligned I/O: probe one.
                    os.preadv(fd, [_byte_view(aligned_host_tensor(ALIGN, torch.uint8, pin=False))], 0)
                return True
            except OSError as e:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
                reason = f"the file system refuses it ({e.strerror or e})"
        if want:
            raise ValueError(f"disk_dir: {directory} can't use O_DIRECT: {reason}")
        logger.info("disk tier: buffered I/O in %s, no O_DIRECT: %s", directory, reason)
        self._no_direct = reason
        return False

    def _start_ring(self, engine: str) -> aio.Ring | None:
        """The AIO ring for engine "aio" (or ValueError naming io_engine where it can't be used), None for the
        thread pool."""
        if engine == "threads":
            return None
        why = None if self.direct else f"it needs O_DIRECT, which this tier can't use: {self._no_direct}"
        if why is None and (why := aio.unavailable()) is None:
            try:
                return aio.Ring(AIO_DEPTH, name="offload-disk-aio")
            except OSError as e:
                why = f"the kernel refuses it ({e.strerror or e})"
        raise ValueError(f"io_engine: aio can't be used for {self._directory}: {why}")

    @property
    def path(self) -> str:
        return self._path

    @property
    def file_bytes(self) -> int:
        """Bytes the slot file takes now (grows with the slots handed out, up to capacity * slot_bytes)."""
        return self.reserved * self.slot_bytes

    def allocate(self, n: int) -> list[int] | None:
        """Takes `n` free slots, in ascending order (or returns None), growing the file first when one lies past
        its end; raises ValueError naming disk_dir, and takes no slot, when the disk has no room to grow."""
        slots = super().allocate(n)
        if slots and (top := max(slots)) >= self.reserved:
            try:
                self._grow(top + 1)
            except BaseException:
                self._free.extend(reversed(slots))  # back on the stack in the order they came off
                raise
        # Ascending: pages written in order land in runs of consecutive slots, read back in few calls.
        return sorted(slots) if slots is not None else None

    def release(self, slots: Sequence[int]) -> list[int]:
        freed = super().release(slots)
        self._state[freed] = _NEVER  # a freed slot holds no page: reading it is an error
        return freed

    def reset(self, reserved: int = 0) -> None:
        super().reset(reserved)
        self._state[reserved:] = _NEVER

    def _grow(self, slots: int) -> None:
        if self.closed:
            raise RuntimeError(f"disk: tier {self._path} is closed")
        step = max(self.reserved // 4, -(-GROW_STEP_BYTES // self.slot_bytes))
        target = min(self.capacity, max(slots, self.reserved + step))
        start, end = self.reserved * self.slot_bytes, target * self.slot_bytes
        free = _free_bytes(self._directory)
        if free < end - start:
            # Short of a whole step: take just what is needed if that still fits.
            target = slots
            end = target * self.slot_bytes
            if free < end - start:
                raise ValueError(_space_message(self._directory, free, end - start, more=True))
        try:
            _preallocate(self._fd, start, end)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)  # give back what a failed fallocate may have taken
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ValueError(
                    _space_message(self._directory, _free_bytes(self._directory), end - start, more=True)
                ) from e
            raise
        logger.debug("disk tier: %s grown to %d slots (%s)", self._path, target, _format_size(end))
        self.reserved = target

    def write(self, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        self.write_async(slots, k, v).result()

    def read(self, slots: Sequence[int], k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        self.read_async(slots, k_out, v_out).result()

    def write_async(self, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> cf.Future[None]:
        """Starts a write. k and v must stay unchanged until the future is done (unless they needed a bounce
        copy, which is taken before this returns). The future's exception is a PageError naming the slots that
        were not written; they can't be read until written again."""
        slots = self._check(slots, k, v)
        k_buf, v_buf = (self._bounce(t).copy_(t) if self._needs_bounce(t) else t for t in (k, v))
        return self._submit(True, slots, k_buf, v_buf, None)

    def read_async(self, slots: Sequence[int], k_out: torch.Tensor, v_out: torch.Tensor) -> cf.Future[None]:
        """Starts a read; k_out and v_out hold the pages once the future is done. The future's exception is a
        PageError naming the slots that could not be read intact (k_out and v_out are then undefined)."""
        slots = self._check(slots, k_out, v_out)
        k_buf, v_buf = (self._bounce(t) if self._needs_bounce(t) else t for t in (k_out, v_out))

        def copy_back() -> None:
            # Runs on a pool thread, where inference mode is off; `out` may be an inference tensor.
            with torch.inference_mode():
                for buf, out in ((k_buf, k_out), (v_buf, v_out)):
                    if buf is not out:
                        out.copy_(buf)

        return self._submit(False, slots, k_buf, v_buf, copy_back)

    def close(self) -> None:
        if not self.closed:
            self._finalizer()
        super().close()

    def _check(self, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> list[int]:
        if self.closed:
            raise RuntimeError(f"disk: tier {self._path} is closed")
        slots = [int(s) for s in slots]
        dtype = self.shape.store_dtype
        for t, dims in ((k, self.shape.k_dims), (v, self.shape.v_dims)):
            expected = (len(slots), *dims)
            if tuple(t.shape) != expected or t.dtype != dtype or t.device.type != "cpu":
                raise ValueError(
                    f"disk: expected CPU {dtype} pages of shape {expected}, "
                    f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        for s in slots:
            if not 0 <= s < self.capacity:
                raise ValueError(f"disk: slot {s} out of range 0..{self.capacity - 1}")
        return slots

    def _needs_bounce(self, t: torch.Tensor) -> bool:
        # An empty request moves nothing, and aligned_host_tensor can't make an empty buffer.
        return t.numel() > 0 and (not t.is_contiguous() or (self.direct and t.data_ptr() % ALIGN != 0))

    @staticmethod
    def _bounce(like: torch.Tensor) -> torch.Tensor:
        # A fresh buffer per request rather than a shared one: requests run concurrently.
        return aligned_host_tensor(like.numel(), like.dtype, pin=False).view(like.shape)

    def _plan(self, slots: list[int]) -> list[list[list[int]]]:
        """The request as tasks for the pool, each a list of calls, each call a list of page indexes: consecutive
        ascending slots, at most ceil(n / threads) pages a call; the calls grouped, in slot order, into at most
        `threads` tasks of about as many pages each."""
        per_call = min(self._pages_per_call, max(1, math.ceil(len(slots) / self._threads)))
        calls = _calls(slots, per_call)
        # NOTE: a task per call would cost a future, a callback and the checks' numpy overhead per call, more than
        # the call itself when pages are small and scattered; tasks of several calls keep every thread busy
        # with one submission each.
        tasks: list[list[list[int]]] = []
        size = per_call
        for call in calls:
            if size >= per_call:
                tasks.append([])
                size = 0
            tasks[-1].append(call)
            size += len(call)
        return tasks

    def _aio_calls(self, slots: list[int]) -> list[list[int]]:
        """The request as AIO calls, each a list of page indexes: consecutive ascending slots, at most
        AIO_CALL_BYTES (and IOV_MAX iovecs) a call."""
        return _calls(slots, max(1, min(self._pages_per_call, AIO_CALL_BYTES // self.slot_bytes)))

    def _submit(
        self, write: bool, slots: list[int], k: torch.Tensor, v: torch.Tensor, finish: Callable[[], None] | None
    ) -> cf.Future[None]:
        result: cf.Future[None] = cf.Future()
        result.set_running_or_notify_cancel()  # started I/O can't be called back, so the future can't be either
        k_bytes, v_bytes = _byte_view(k), _byte_view(v)  # they keep k and v (maybe bounce buffers) alive
        tasks = self._aio_calls(slots) if self._ring is not None else self._plan(slots)
        lock = threading.Lock()
        pending = len(tasks)
        errors: list[BaseException] = []

        def complete() -> None:
            try:
                if errors:
                    raise _merged(errors)
                if finish is not None:
                    finish()
            except BaseException as e:
                result.set_exception(e)
            else:
                result.set_result(None)

        def part_done(e: BaseException | None) -> None:
            nonlocal pending
            with lock:
                pending -= 1
                if e is not None:
                    errors.append(e)
                last = pending == 0
            if last:
                complete()

        if not tasks:
            complete()
        elif self._ring is not None:
            self._ring.submit([self._aio_op(write, [slots[i] for i in call], call, k, v, k_bytes, v_bytes, part_done)
                               for call in tasks])
        else:
            for calls in tasks:
                self._pool.submit(self._io, write, slots, calls, k_bytes, v_bytes).add_done_callback(
                    lambda f: part_done(f.exception()))
        return result

    def _aio_op(
        self, write: bool, at: list[int], call: list[int], k: torch.Tensor, v: torch.Tensor, k_bytes: memoryview,
        v_bytes: memoryview, part_done: Callable[[BaseException | None], None],
    ) -> aio.Op:
        """One AIO call: the pages `call` (indexes into k and v) at the consecutive slots `at`; on completion its
        outcome and checks go to `part_done` (on the ring's thread)."""
        kb, vb = self.shape.k_bytes, self.shape.v_bytes
        halves = [(k_bytes[i * kb:(i + 1) * kb], v_bytes[i * vb:(i + 1) * vb]) for i in call]
        k_at, v_at = k.data_ptr(), v.data_ptr()
        buffers = [b for i in call for b in ((k_at + i * kb, kb), (v_at + i * vb, vb))]
        offset = at[0] * self.slot_bytes

        def done(res: int) -> None:
            if res == -errno.ESHUTDOWN and not self._ring.alive():
                # Not a disk fault (nothing to recover from another copy): the tier can't do I/O any more.
                part_done(WorkerDied(errno.EIO, f"io: the I/O thread {self._ring.name} died; a disk "
                                             f"{'write' if write else 'read'} of {len(call)} pages can't finish"))
                return
            try:
                res = self._completed(write, [h for pair in halves for h in pair], offset, res)
                got: int | OSError = res if res >= 0 else OSError(-res, os.strerror(-res))
                error = self._outcome(write, at, len(call) * (kb + vb), got)
                if error is None:
                    error = self._settle(write, at, halves)
            except BaseException as e:  # a bug, not a disk fault: fail the request rather than lose it
                error = e
            part_done(error)

        return aio.Op(write, self._fd, offset, buffers, done)

    # The tier's only system calls on the slot file, and the AIO engine's completions (tests override them to
    # inject faults).
    def _completed(self, write: bool, iov: list[memoryview], offset: int, res: int) -> int:
        """An AIO call on the bytes `iov` at `offset` finished with `res` (bytes moved, or -errno)."""
        return res

    def _preadv(self, iov: list[memoryview], offset: int) -> int:
        return os.preadv(self._fd, iov, offset)

    def _pwritev(self, iov: list[memoryview], offset: int) -> int:
        return os.pwritev(self._fd, iov, offset)

    def _io(self, write: bool, slots: list[int], calls: list[list[int]], k: memoryview, v: memoryview) -> None:
        """One task: the calls `calls` (page indexes into the request, ascending slots), one after the other,
        each page to or from k and v. Every call is made; those that fail, and the pages that fail their checks,
        are one PageError at the end."""
        kb, vb = self.shape.k_bytes, self.shape.v_bytes
        errors: list[PageError] = []
        at: list[int] = []  # the slots, and the K and V bytes, of the calls that went through
        halves: list[tuple[memoryview, memoryview]] = []
        for call in calls:
            call_at = [slots[i] for i in call]
            call_halves = [(k[i * kb:(i + 1) * kb], v[i * vb:(i + 1) * vb]) for i in call]
            if (error := self._call(write, call_at, call_halves)) is None:
                at += call_at
                halves += call_halves
            else:
                errors.append(error)
        if at and (error := self._settle(write, at, halves)) is not None:
            errors.append(error)
        if errors:
            raise _merged(errors)

    def _settle(self, write: bool, at: list[int], halves: list[tuple[memoryview, memoryview]]) -> PageError | None:
        """After calls that went through: records the checksums of the pages written at the slots `at`, or checks
        those read; the PageError of pages that fail."""
        if not self.checksums:
            if write:
                for s in at:
                    self._state_at[s] = _UNHASHED
            return None
        if not write:
            return self._verify(at, halves)
        sums, state = self._sums_at, self._state_at
        for (kh, vh), s in zip(halves, at):
            sums[2 * s], sums[2 * s + 1], state[s] = _hash(kh, s), _hash(vh, s), _INTACT
        return None

    def _call(self, write: bool, at: list[int], halves: list[tuple[memoryview, memoryview]]) -> PageError | None:
        """One preadv or pwritev of the pages `halves` at the consecutive slots `at`; the error, if it failed."""
        pad = self._zeros if write else self._scratch
        iov: list[memoryview] = []
        for kh, vh in halves:
            if pad and iov:
                iov.append(pad)
            iov += (kh, vh)
        offset = at[0] * self.slot_bytes
        try:
            got: int | OSError = (self._pwritev if write else self._preadv)(iov, offset)
        except OSError as e:
            got = e
        return self._outcome(write, at, sum(len(b) for b in iov), got)

    def _outcome(self, write: bool, at: list[int], want: int, got: int | OSError) -> PageError | None:
        """The error of a call at the slots `at` that was to move `want` bytes and moved `got` (or failed with
        it); a failed write leaves its slots unreadable."""
        if write:
            if isinstance(got, OSError):
                self._lost(at)
                return _chained(_write_error(at, got), got)
            if got != want:
                self._lost(at)
                return PageError(self.name, at, f"short write: wrote {got} of {want} bytes")
            return None
        if isinstance(got, OSError):
            return _chained(PageError(self.name, at, f"read failed: {got}", got.errno or errno.EIO), got)
        if got != want:
            return PageError(self.name, at, f"short read: got {got} of {want} bytes")
        return None

    def _lost(self, at: list[int]) -> None:
        """Slots whose write failed: their bytes may be half old, half new, so they can't be read any more."""
        for s in at:
            self._state_at[s] = _LOST

    def _verify(self, at: list[int], halves: list[tuple[memoryview, memoryview]]) -> PageError | None:
        """A PageError naming the slots of `at` whose pages, just read into `halves`, are not what was written
        there; None when all are (or were written unhashed)."""
        sums, state = self._sums_at, self._state_at
        bad: dict[str, list[int]] = {}
        for (kh, vh), s in zip(halves, at):
            if (st := state[s]) == _INTACT:
                k_bad, v_bad = _hash(kh, s) != sums[2 * s], _hash(vh, s) != sums[2 * s + 1]
                if k_bad or v_bad:
                    what = "in both halves" if k_bad and v_bad else "in the K half" if k_bad else "in the V half"
                    bad.setdefault(f"checksum mismatch {what}", []).append(s)
            elif st != _UNHASHED:
                bad.setdefault("never written" if st == _NEVER else "its last write failed", []).append(s)
        if not bad:
            return None
        if len(bad) == 1:
            cause = next(iter(bad))
        else:
            cause = "; ".join(f"{what}: slot{'s' if len(s) > 1 else ''} {_shown(s)}" for what, s in bad.items())
        return PageError(self.name, sorted(s for slots in bad.values() for s in slots), cause)


def _calls(slots: list[int], per_call: int) -> list[list[int]]:
    """The indexes of `slots` as calls: runs of consecutive ascending slots, at most `per_call` pages each."""
    calls: list[list[int]] = []
    last = -2
    for i in sorted(range(len(slots)), key=slots.__getitem__):
        if slots[i] != last + 1 or len(calls[-1]) == per_call:
            calls.append([])
        calls[-1].append(i)
        last = slots[i]
    return calls


def _chained(error: PageError, cause: OSError) -> PageError:
    error.__cause__ = cause
    return error


def _hash(half: memoryview, slot: int) -> int:
    # NOTE: xxhash lets go of the GIL only for buffers over 64 KiB. Measured here: two threads hashing 48 KiB
    # halves run no faster than one (0.97x), 128 KiB ones 1.6x faster on two cores. Halves under 64 KiB are hashed
    # with the GIL held, at 10-15 GB/s from memory (40 from cache): ~5 us for a 96 KiB page, while its read
    # takes ~100 us.
    return xxhash.xxh3_64_intdigest(half, slot)


def _shown(slots: list[int]) -> str:
    return ", ".join(map(str, slots[:4])) + (", ..." if len(slots) > 4 else "")


def _write_error(slots: list[int], e: OSError) -> PageError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return PageError("disk", slots, f"write failed: the disk is full ({e})", errno.ENOSPC)
    return PageError("disk", slots, f"write failed: {e}", e.errno or errno.EIO)


def _merged(errors: list[BaseException]) -> BaseException:
    """One exception for the calls and checks that failed: a PageError listing every slot concerned, or the first
    exception that is not a PageError (a bug, not a disk fault)."""
    if len(errors) == 1 or not all(isinstance(e, PageError) for e in errors):
        return next((e for e in errors if not isinstance(e, PageError)), errors[0])
    causes = list(dict.fromkeys(e.cause for e in errors))  # type: ignore[attr-defined]
    cause = "; ".join(causes[:3]) + (f"; and {len(causes) - 3} more" if len(causes) > 3 else "")
    full = next((e for e in errors if e.errno == errno.ENOSPC), None)
    merged = PageError("disk", sorted({s for e in errors for s in e.slots}), cause,  # type: ignore[attr-defined]
                       (full or errors[0]).errno or errno.EIO)
    merged.__cause__ = errors[0].__cause__
    return merged
