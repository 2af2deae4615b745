"""Page-locked host memory of exactly the requested size.

`torch.empty(..., pin_memory=True)` goes through torch's caching host allocator, which rounds every block up to
a power of two (4.5 GiB asked becomes 8 GiB locked). Here the memory is an anonymous mmap of the byte size rounded
up to the OS page size only, registered with `cudaHostRegister`. CUDA reports registered memory as host memory to
`cudaPointerGetAttributes`, so `tensor.is_pinned()` is True for it, and non_blocking copies to and from it are
asynchronous like those of cudaHostAlloc'ed memory.

The registration is dropped by `release_pinned()` (idempotent), else when the tensor's storage is freed (before the
mapping is unmapped), else at interpreter exit. `pinned_bytes()` counts what this process holds registered here.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import weakref

import torch

PAGE = mmap.PAGESIZE

_lock = threading.Lock()
_pinned = 0
_live: dict[int, _Registration] = {}  # storage data pointer -> its registration


def page_round(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def pinned_bytes() -> int:
    """Bytes of host memory this process currently holds registered (page-locked) through `pinned_host_tensor`."""
    with _lock:
        return _pinned


class _Registration:
    __slots__ = ("ptr", "nbytes", "active")

    def __init__(self, ptr: int, nbytes: int):
        self.ptr, self.nbytes, self.active = ptr, nbytes, True

    def release(self) -> None:
        global _pinned
        with _lock:
            if not self.active:
                return
            self.active = False
            _live.pop(self.ptr, None)
            _pinned -= self.nbytes
        try:
            cudart = torch.cuda.cudart()
            if cudart.cudaHostUnregister(self.ptr) != cudart.cudaError.success:
                _clear_last_cuda_error()  # e.g. the CUDA runtime is already unloading at exit; nothing left to do
        except Exception:  # noqa: BLE001 - at interpreter exit torch may be half torn down
            pass


class _Mapping(mmap.mmap):
    """An anonymous mapping that drops its CUDA registration before it is unmapped (mmap's own dealloc unmaps
    first and clears weak references after, so a weakref callback alone would come too late)."""

    registration: _Registration | None = None

    def __del__(self) -> None:
        if self.registration is not None:
            self.registration.release()


def _clear_last_cuda_error() -> None:
    """Best effort: reset the CUDA runtime's sticky "last error" left by a failed call, so that a later, unrelated
    `cudaGetLastError()` check in torch (e.g. after a non_blocking copy) does not report it."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart" in line.rsplit("/", 1)[-1]}
        for lib in libs:
            ctypes.CDLL(lib).cudaGetLastError()  # the already loaded library: same handle, same error state
    except Exception:  # noqa: BLE001
        pass


def pinned_host_tensor(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of `numel` elements over page-aligned, page-locked memory of exactly that size rounded up to
    the OS page size. Raises a one-line RuntimeError naming host_budget when CUDA can't lock that much memory."""
    global _pinned
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    size = page_round(nbytes)
    mapping = _Mapping(-1, size)  # anonymous mappings are page-aligned and zero-filled
    t = torch.frombuffer(mapping, dtype=dtype, count=numel)  # the tensor's storage keeps `mapping` alive
    ptr = t.data_ptr()
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, size, 0)  # cudaHostRegisterDefault; portable under unified addressing
    if err != cudart.cudaError.success:
        _clear_last_cuda_error()
        reason = cudart.cudaGetErrorString(err)
        raise RuntimeError(
            f"host_budget: could not pin {size} bytes of host memory (cudaHostRegister: {reason}); "
            "lower host_budget or raise the locked-memory limit (ulimit -l)")
    reg = _Registration(ptr, size)
    mapping.registration = reg
    with _lock:
        _live[ptr] = reg
        _pinned += size
    weakref.finalize(mapping, reg.release)  # at interpreter exit if still alive; holds `reg`, not `mapping`
    return t


def release_pinned(t: torch.Tensor) -> bool:
    """Unregisters the memory under `t` if `pinned_host_tensor` registered it. Idempotent; True if it released."""
    if t.numel() == 0 or t.device.type != "cpu":
        return False
    with _lock:
        reg = _live.get(t.untyped_storage().data_ptr())
    if reg is None:
        return False
    reg.release()
    return True
