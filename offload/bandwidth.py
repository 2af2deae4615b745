"""The host-to-device link speed, and the decode speed bound it puts on exact offloading.

With exact attention every cached token is read at every decode step, so the KV bytes that do not live on the
device must cross the host-to-device link once per generated token. The link bandwidth divided by those bytes is
therefore an upper bound on exact-offload decode speed (`exact_offload_bound`); benchmarks report how close the
runtime gets to it.

NOTE (CPU-only machines): the "device" tier is then ordinary RAM, and moving a page from host to device is a
host-to-host memcpy. `measure_h2d_bandwidth("cpu")` measures exactly that: a copy between two preallocated,
pre-faulted buffers of `nbytes`, which is the cost of the transfers the runtime does on such a machine.
"""

from __future__ import annotations

import statistics
import time

import torch

DEFAULT_NBYTES = 256 * 1024**2


def measure_h2d_bandwidth(device: str | torch.device, nbytes: int = DEFAULT_NBYTES, repeats: int = 5) -> float:
    """Median bytes/s of copying `nbytes` from pinned host memory to `device`, over `repeats` timed copies.

    CUDA: a pinned source, one warm-up copy, then each copy timed with CUDA events on the current stream.
    CPU: a host-to-host copy between two preallocated buffers (see the module note).
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes: expected an int >= 1, got {nbytes!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_h2d(device, nbytes, repeats)
    if device.type == "cpu":
        return _host_copy(nbytes, repeats)
    raise ValueError(f"device: bandwidth measurement supports cpu and cuda, got {device.type!r}")


def _cuda_h2d(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)  # fault the pages in before timing
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    seconds: list[float] = []
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        dst.copy_(src, non_blocking=True)  # warm-up: driver mappings, lazy init
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000.0)
    del src, dst
    return nbytes / statistics.median(seconds)


def _host_copy(nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    dst.copy_(src)  # warm-up: page faults on first touch
    seconds: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - t0)
    return nbytes / statistics.median(seconds)


def exact_offload_bound(bytes_per_token: float, bandwidth: float) -> float:
    """Upper bound on exact-offload decode tokens/s: `bandwidth` bytes/s over the `bytes_per_token` that must
    cross the link per generated token (the KV not resident on the device). Infinite when nothing must cross."""
    if bytes_per_token < 0:
        raise ValueError(f"bytes_per_token: expected >= 0, got {bytes_per_token!r}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth: expected > 0 bytes/s, got {bandwidth!r}")
    if bytes_per_token == 0:
        return float("inf")
    return bandwidth / bytes_per_token
