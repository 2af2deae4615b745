"""The transfer engine: moves pages between tiers, asynchronously, and times it.

Dispatch is by (source tier, destination tier). Every copy is two-phase: `submit` returns a `Transfer` at once;
its destination may be read, and its source slots reused, only after `Transfer.wait()`. The runtime marks the pages
busy in the page table in between, so eviction never touches a page being copied.

On CUDA, host<->device copies run on one stream per direction over the pinned host pool, and completion is a CUDA
event that the compute stream waits on (the host does not block). On the CPU, and for disk I/O in both cases,
copies run on a thread pool (torch copies and positioned I/O release the GIL). Loads are submitted before stores.

Deadlines: a wait on a copy that runs on a thread gives up after `timeout` seconds (`io_timeout`) with a
TimeoutError naming the copy, and at once with an OSError when the pool's threads have died (no one would ever
run the copy). A failed copy may carry a `recover` callback (the runtime's: it refills the destination from another
copy of the pages, or recomputes them); the wait then returns as if the copy had succeeded, or raises what the
callback raises.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from offload.trace import Tracer
from tiers.base import WorkerDied


def runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Splits slot pairs into (src_start, dst_start, length) runs where both sides are consecutive."""
    out: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


def _stranded(pool: ThreadPoolExecutor, future: Future) -> threading.Thread | None:
    """A dead worker of `pool`, when `future` waits in its queue and no worker is left to run it (the pool spawns
    no more once it has its maximum): the copy would never run."""
    if pool._shutdown or future.running() or future.done():
        return None
    threads = list(pool._threads)
    if len(threads) < pool._max_workers or any(t.is_alive() for t in threads):
        return None
    return threads[0]


class Transfer:
    """One submitted copy. `wait()` returns the seconds the caller was blocked."""

    # How often a wait looks at the pool's threads while the copy runs.
    POLL_SECONDS = 0.25

    def __init__(self, future: Future | None = None, event: torch.cuda.Event | None = None,
                 gpu_waits: list | None = None, layer: int = -1, stream: torch.cuda.Stream | None = None,
                 what: str = "copy", timeout: float | None = None, pool: ThreadPoolExecutor | None = None):
        self.future = future
        self.event = event
        self.gpu_waits = gpu_waits
        self.layer = layer
        self.stream = stream  # the compute stream that waits
        self.what = what  # for errors: "a disk read of 12 pages of layer 3"
        self.timeout = timeout
        self.pool = pool
        self.recover: Callable[[BaseException], None] | None = None
        self.finished = False

    def done(self) -> bool:
        if self.future is not None and not self.future.done():
            return False
        return self.event is None or self.event.query()

    def wait(self) -> float:
        """Blocks until the copy is done (CPU) or orders the compute stream after it (CUDA)."""
        if self.finished:
            return 0.0
        t0 = time.perf_counter()
        if self.future is not None:
            try:
                result = self._result()
            except TimeoutError:
                raise  # the copy may still be running: nothing may touch its destination
            except Exception as exc:
                if self.recover is None:
                    raise
                self.recover(exc)  # refills the destination, or raises
                self.finished = True
                return time.perf_counter() - t0
            if isinstance(result, torch.cuda.Event):
                self.event = result
        if self.event is not None:
            stream = self.stream or torch.cuda.current_stream()
            if self.gpu_waits is not None:
                # The compute stream stalls from `before` until the copy's end, if that comes later.
                before = torch.cuda.Event(enable_timing=True)
                before.record(stream)
                self.gpu_waits.append((self.layer, before, self.event))
            stream.wait_event(self.event)
        waited = time.perf_counter() - t0
        self.finished = True
        return waited

    def _result(self):
        """The future's result, within the deadline; raises TimeoutError past it, OSError if a worker died."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return self.future.result(timeout=self.POLL_SECONDS if left is None else min(self.POLL_SECONDS, left))
            except TimeoutError:
                if self.future.done():
                    raise  # the copy itself raised a TimeoutError
                if self.pool is not None and (dead := _stranded(self.pool, self.future)) is not None:
                    raise WorkerDied(errno.EIO, f"io: the I/O thread {dead.name} died; {self.what} can't finish") \
                        from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, f"io_timeout: {self.what} did not finish in "
                                       f"{self.timeout:g} s (a stuck disk?); raise io_timeout if it is just slow") \
                        from None


class TransferEngine:
    def __init__(self, device: torch.device, threads: int, tracer: Tracer | None, timeout: float | None = None):
        self.device = device
        self.timeout = timeout
        self.cuda = device.type == "cuda"
        self.tracer = tracer
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="offload-io")
        self.bytes_moved = {"device->host": 0, "host->device": 0, "host->disk": 0, "disk->host": 0}
        self.gpu_waits: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        if self.cuda:
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)
            # Looked up once: torch.cuda.current_stream() costs tens of microseconds per call.
            self.compute = torch.cuda.current_stream(device)

    # -- memory to memory -------------------------------------------------------------------------------------
    def copy(self, pair: str, src: tuple[torch.Tensor, torch.Tensor], src_slots: list[int],
             dst: tuple[torch.Tensor, torch.Tensor], dst_slots: list[int], layer: int = -1,
             name: str = "load", codec=None) -> Transfer:
        """Copies pages src[k|v][src_slots] -> dst[k|v][dst_slots]; `pair` is "host->device" or "device->host".
        With a `codec` (offload.quant.PageCodec) the host side holds packed pages: a store packs the device's pages
        on the device before they cross, a load unpacks them on the device after; the bytes counted are those that
        cross."""
        side = src if pair == "host->device" else dst  # the host's pages, as they are stored
        nbytes = len(src_slots) * (side[0][0].numel() * side[0].element_size()
                                   + side[1][0].numel() * side[1].element_size())
        self.bytes_moved[pair] += nbytes
        plan = runs(src_slots, dst_slots)
        move = self._mover(pair, codec, dst[0].dtype)

        def body() -> None:
            for s, d, n in plan:
                move((src[0][s:s + n], src[1][s:s + n]), (dst[0][d:d + n], dst[1][d:d + n]))

        src_tier, dst_tier = pair.split("->")
        args = {"bytes": nbytes, "pages": len(src_slots), "layer": layer, "src": src_tier, "dst": dst_tier}
        if self.cuda:
            stream = self.h2d if pair == "host->device" else self.d2h
            # The copy must see everything the compute stream wrote, and must not overwrite what it still reads.
            stream.wait_stream(self.compute)
            start = torch.cuda.Event(enable_timing=True) if self.tracer else None
            done = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                if start is not None:
                    start.record()
                body()
                done.record()
            if self.tracer is not None:
                self.tracer.cuda_span(pair, name, start, done, thread=pair + " stream", **args)
            return Transfer(event=done, gpu_waits=self.gpu_waits, layer=layer, stream=self.compute)
        return self._on_pool(self.pool.submit(self._timed, pair, name, body, args),
                             f"a {pair} copy of {len(src_slots)} pages of layer {layer}")

    def _mover(self, pair: str, codec, dtype: torch.dtype) -> Callable:
        """copy(src pair, dst pair): as is, or through the codec on the compute device (on the copy's stream)."""
        nb = self.cuda

        def plain(src, dst) -> None:
            dst[0].copy_(src[0], non_blocking=nb)
            dst[1].copy_(src[1], non_blocking=nb)

        def unpack(src, dst) -> None:
            if kernel is not None and src[0].is_pinned():
                # CUDA: one launch reads the packed pages in place over the bus and writes them unpacked into dst:
                # no copy of them, packed or unpacked, is made on the way.
                rows = torch.arange(src[0].shape[0], dtype=torch.int32, device=dst[0].device)
                kernel(dst[0], dst[1], src[0], src[1], rows, codec)
                return
            k, v = codec.decode(src[0].to(dst[0].device, non_blocking=nb), src[1].to(dst[0].device, non_blocking=nb),
                                dtype)
            dst[0].copy_(k)
            dst[1].copy_(v)

        def pack(src, dst) -> None:
            kq, vq = codec.encode(src[0], src[1])
            dst[0].copy_(kq, non_blocking=nb)
            dst[1].copy_(vq, non_blocking=nb)

        if codec is None:
            return plain
        kernel = self._unpack_kernel()
        return unpack if pair.endswith("device") else pack

    def _unpack_kernel(self):
        """CUDA: the dequantizing page gather (offload.kernels.gather.gather_pages_packed), or None without triton;
        looked up at the first packed copy, once."""
        if not hasattr(self, "_kernel"):
            import importlib.util

            self._kernel = None
            if self.cuda and importlib.util.find_spec("triton") is not None:
                from offload.kernels.gather import gather_pages_packed

                self._kernel = gather_pages_packed
        return self._kernel

    def account(self, pair: str, nbytes: int, start: float, layer: int, name: str) -> None:
        """Counts a copy done synchronously by the caller (a CPU-side page copy), with its span."""
        self.bytes_moved[pair] += nbytes
        if self.tracer is not None:
            src, dst = pair.split("->")
            self.tracer.span(pair, name, start, time.perf_counter(), bytes=nbytes, pages=nbytes and 1, layer=layer,
                             src=src, dst=dst, thread="compute")

    def _timed(self, track: str, name: str, body: Callable[[], None], args: dict) -> None:
        t0 = time.perf_counter()
        # Inference mode is per thread: a caller inside it may hand us inference tensors, which only accept
        # in-place copies inside the mode. Normal tensors accept them there too, so workers always enter it.
        with torch.inference_mode():
            body()
        if self.tracer is not None:
            import threading

            self.tracer.span(track, name, t0, time.perf_counter(), thread=threading.current_thread().name, **args)

    # -- disk -----------------------------------------------------------------------------------------------
    def disk_read(self, disk, slots: list[int], k_out: torch.Tensor, v_out: torch.Tensor, layer: int = -1,
                  codec=None) -> Transfer:
        """Reads pages into k_out, v_out; with a `codec`, packed pages into a scratch buffer and then unpacked
        into k_out, v_out (full precision, on the CPU)."""
        nbytes = len(slots) * disk.page_bytes
        self.bytes_moved["disk->host"] += nbytes
        args = {"bytes": nbytes, "pages": len(slots), "layer": layer, "src": "disk", "dst": "host"}
        if codec is None:
            read = lambda: disk.read(slots, k_out, v_out)  # noqa: E731
        else:
            def read() -> None:
                kq, vq = self.scratch(disk.shape, len(slots))
                disk.read(slots, kq, vq)
                self._mover("host->device", codec, k_out.dtype)((kq, vq), (k_out, v_out))
        return self._on_pool(self.pool.submit(self._timed, "disk read", "load", read, args),
                             f"a disk read of {len(slots)} pages of layer {layer}")

    def _on_pool(self, future: Future, what: str, **kwargs) -> Transfer:
        return Transfer(future=future, what=what, timeout=self.timeout, pool=self.pool, **kwargs)

    @staticmethod
    def scratch(shape, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Page-aligned host buffers for n pages as `shape` stores them (disk reads go straight into them)."""
        from tiers.host import aligned_host_tensor

        return tuple(aligned_host_tensor(n * math.prod(dims), shape.store_dtype, pin=False).view(n, *dims)
                     for dims in (shape.k_dims, shape.v_dims))

    def disk_write(self, disk, slots: list[int], k: torch.Tensor, v: torch.Tensor, layer: int = -1) -> Transfer:
        nbytes = len(slots) * disk.page_bytes
        self.bytes_moved["host->disk"] += nbytes
        args = {"bytes": nbytes, "pages": len(slots), "layer": layer, "src": "host", "dst": "disk"}
        return self._on_pool(self.pool.submit(self._timed, "disk write", "store", lambda: disk.write(slots, k, v),
                                              args), f"a disk write of {len(slots)} pages of layer {layer}")

    def disk_to_device(self, disk, slots: list[int], staging: tuple[torch.Tensor, torch.Tensor],
                       dst: tuple[torch.Tensor, torch.Tensor], layer: int = -1, codec=None) -> Transfer:
        """CUDA: disk -> pinned staging -> device, chained in an I/O thread; the future yields the copy's event.
        With a `codec` the staging holds packed pages, unpacked on the device."""
        move = self._mover("host->device", codec, dst[0].dtype)
        n = len(slots)
        nbytes = n * disk.page_bytes
        self.bytes_moved["disk->host"] += nbytes
        self.bytes_moved["host->device"] += nbytes
        args = {"bytes": nbytes, "pages": n, "layer": layer}

        @torch.inference_mode()  # see _timed
        def body() -> torch.cuda.Event:
            self._timed("disk read", "load", lambda: disk.read(slots, staging[0], staging[1]),
                        {**args, "src": "disk", "dst": "host"})
            start = torch.cuda.Event(enable_timing=True) if self.tracer else None
            done = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.h2d):
                if start is not None:
                    start.record()
                move(staging, dst)
                done.record()
            if self.tracer is not None:
                self.tracer.cuda_span("host->device", "load", start, done, thread="host->device stream",
                                      **args, src="host", dst="device")
            return done

        # The copy must not overwrite the workspace while the compute stream still reads it.
        self.h2d.wait_stream(self.compute)
        return self._on_pool(self.pool.submit(body), f"a disk read of {n} pages of layer {layer}",
                             gpu_waits=self.gpu_waits, layer=layer, stream=self.compute)

    def resolve_gpu_waits(self, report: Callable[[int, float], None]) -> None:
        """Reports, per layer, how long the compute stream waited on copies (synchronizes the device)."""
        if not self.gpu_waits:
            return
        torch.cuda.synchronize(self.device)
        for layer, before, done in self.gpu_waits:
            waited = before.elapsed_time(done) / 1e3
            if waited > 0:
                report(layer, waited)
        self.gpu_waits.clear()

    def close(self) -> None:
        # A copy stuck past its deadline must not hang the exit: its thread is waited for io_timeout at most.
        self.pool.shutdown(wait=False, cancel_futures=True)
        for t in list(self.pool._threads):
            t.join(self.timeout)
        if self.cuda:
            self.h2d.synchronize()
            self.d2h.synchronize()
