"""Linux native AIO (io_setup / io_submit / io_getevents) for the disk tier's O_DIRECT file: many positioned reads
and writes in flight from one submitting call, completions reaped by one thread.

Why: scattered pages are small (48 KiB for SmolLM2), and a device reaches its bandwidth on small requests only
with many in flight. A pool of threads each blocked in one preadv keeps as many in flight as it has threads; one
io_submit puts a whole request's calls in the device queue at once. On the project's CPU machine the raw device
read random 48 KiB blocks at 1.02 GB/s with 4 calls in flight and 1.28 with 32, and the tier's 16-page requests of
scattered 48 KiB pages went from 0.81 GB/s (4 threads) to 1.20 with AIO (BENCHMARKS.md, "Two I/O engines").

Why not a package: the four system calls and two fixed structs below are the whole interface; the PyPI bindings
either need a C library (libaio) the machines may lack or, for io_uring (liburing), crashed on this machine's CPU.
ctypes lets go of the GIL around each call. Only O_DIRECT I/O is asynchronous in the kernel (buffered AIO runs
inside io_submit), so the tier uses this only with O_DIRECT.

Lifecycle: `Ring(depth)` (raises OSError where the kernel has no AIO) -> `submit(ops)` from any thread -> `close()`.
At most `depth` operations are in the kernel at once; `submit` waits for room. Each op's `done(res)` runs on the
reaping thread with the kernel's result: bytes moved, or -errno; -ESHUTDOWN when the ring was closed, or its
thread died, before the op completed (`alive()` tells which).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# System call numbers of io_setup, io_destroy, io_submit, io_getevents.
_NUMBERS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4)}
_OP_PREADV, _OP_PWRITEV = 7, 8  # IOCB_CMD_PREADV, IOCB_CMD_PWRITEV


class _Iocb(ctypes.Structure):  # struct iocb (linux/aio_abi.h), little-endian field order
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fd", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):  # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


@dataclass
class Op:
    """One positioned vectored read or write: `buffers` are (address, length) pairs that stay valid until `done`
    has run; `done(res)` gets the bytes moved or -errno."""

    write: bool
    fd: int
    offset: int
    buffers: Sequence[tuple[int, int]]
    done: Callable[[int], None]
    _iocb: _Iocb = field(default_factory=_Iocb, repr=False)
    _iov: ctypes.Array | None = field(default=None, repr=False)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return libc
    except OSError:
        return None


_LIBC = _libc() if platform.system() == "Linux" else None


def unavailable() -> str | None:
    """Why this platform can't use native AIO, or None when it can."""
    if _LIBC is None:
        return "native AIO is Linux's (this is " + platform.system() + ")"
    if platform.machine() not in _NUMBERS:
        return f"no AIO system call numbers for {platform.machine()}"
    return None


class Ring:
    """One AIO context (up to `depth` operations in the kernel) and its reaping thread."""

    # How long the reaping thread waits in one io_getevents call while operations are in flight; it then looks at
    # whether the ring was closed.
    POLL_SECONDS = 1.0

    def __init__(self, depth: int = 256, name: str = "offload-aio"):
        if (why := unavailable()) is not None:
            raise OSError(errno.ENOSYS, why)
        self._setup, self._destroy, self._submit, self._getevents = _NUMBERS[platform.machine()]
        self.depth, self.name = depth, name
        self._ctx = ctypes.c_ulong(0)
        if _LIBC.syscall(self._setup, ctypes.c_uint(depth), ctypes.byref(self._ctx)) < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"io_setup: {os.strerror(code)}")
        self._room = threading.Semaphore(depth)
        self._lock = threading.Condition()
        self._ops: dict[int, Op] = {}  # in the kernel, by id (the iocb's data)
        self._next_id = 0
        self._closed = False
        self._events = (_Event * depth)()
        self._thread = threading.Thread(target=self._reap, name=name, daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._ops)

    def alive(self) -> bool:
        """Whether the reaping thread still runs (an op submitted to a ring without it never completes)."""
        return self._thread.is_alive()

    def submit(self, ops: Sequence[Op]) -> None:
        """Puts `ops` in the kernel, waiting for room when the ring is full. An op the kernel refuses gets
        `done(-errno)` at once, on this thread."""
        i = 0
        while i < len(ops):
            # At least one op at a time, as many as there is room for without waiting.
            self._room.acquire()
            batch = [ops[i]]
            while i + len(batch) < len(ops) and self._room.acquire(blocking=False):
                batch.append(ops[i + len(batch)])
            i += len(batch)
            self._submit_batch(batch)

    def _submit_batch(self, batch: list[Op]) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                for op in batch:
                    self._prepare(op, self._next_id)
                    self._ops[self._next_id] = op
                    self._next_id += 1
                self._lock.notify()
        if not closed:
            self._enter(batch)
            return
        for op in batch:
            self._room.release()
            op.done(-errno.ESHUTDOWN)

    def _enter(self, batch: list[Op]) -> None:
        """io_submit until the kernel holds every op of `batch`; an op it refuses gets done(-errno) here."""
        pointers = (ctypes.POINTER(_Iocb) * len(batch))(*(ctypes.pointer(op._iocb) for op in batch))
        done = 0
        while done < len(batch):
            n = _LIBC.syscall(self._submit, self._ctx, ctypes.c_long(len(batch) - done),
                              ctypes.byref(pointers, done * ctypes.sizeof(ctypes.c_void_p)))
            if n > 0:
                done += n
                continue
            code = ctypes.get_errno() if n < 0 else errno.EIO
            if code in (errno.EAGAIN, errno.EINTR):
                continue  # the kernel was briefly out of requests; the semaphore keeps us within depth
            # io_submit stops at the first op it can't take (a bad descriptor, say): that one fails, the rest go on.
            op = batch[done]
            with self._lock:
                del self._ops[op._iocb.data]
            self._room.release()
            op.done(-code)
            done += 1

    @staticmethod
    def _prepare(op: Op, op_id: int) -> None:
        op._iov = (_Iovec * len(op.buffers))(*((addr, n) for addr, n in op.buffers))
        cb = op._iocb
        cb.data, cb.opcode, cb.fd = op_id, _OP_PWRITEV if op.write else _OP_PREADV, op.fd
        cb.buf, cb.nbytes, cb.offset = ctypes.addressof(op._iov), len(op.buffers), op.offset

    def _reap(self) -> None:
        try:
            self._loop()
        finally:
            # Left normally (closed, nothing in flight) or by an exception that killed the thread: either way no
            # completion will come for what is still registered, and the ring takes nothing more.
            with self._lock:
                ops, self._ops = list(self._ops.values()), {}
                self._closed = True
            for op in ops:
                self._room.release()
                self._finish(op, -errno.ESHUTDOWN)

    def _loop(self) -> None:
        timeout = _Timespec(int(self.POLL_SECONDS), int(self.POLL_SECONDS % 1 * 1e9))
        while True:
            with self._lock:
                while not self._ops and not self._closed:
                    self._lock.wait()
                if self._closed and not self._ops:
                    return
            n = _LIBC.syscall(self._getevents, self._ctx, ctypes.c_long(1), ctypes.c_long(self.depth),
                              self._events, ctypes.byref(timeout))
            if n < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                logger.error("disk tier: io_getevents failed (%s); failing the %d operations in flight",
                             os.strerror(code), self.in_flight)
                return
            for event in self._events[:n]:
                with self._lock:
                    op = self._ops.pop(event.data)
                self._room.release()
                self._finish(op, event.res)

    @staticmethod
    def _finish(op: Op, res: int) -> None:
        try:
            op.done(res)
        except Exception:  # a callback's bug must not stop the completions of everything else
            logger.exception("disk tier: an I/O completion callback failed")

    def close(self, wait: float) -> bool:
        """Stops taking ops, waits up to `wait` seconds for those in flight, and frees the context. False when some
        are still in the kernel (a stuck device): the context is then left to the process's exit, since
        io_destroy would wait for them."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(wait)
        if self._thread.is_alive():
            return False
        _LIBC.syscall(self._destroy, self._ctx)
        return True
