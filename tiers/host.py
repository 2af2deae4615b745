"""Host RAM: one pool allocated at start-up, pinned when CUDA is present, page-aligned.

Page alignment lets the disk tier read and write slots with O_DIRECT straight into this pool. The pinned pool is
an anonymous mapping of exactly its size (rounded up to the OS page size) registered with cudaHostRegister, not a
block of torch's caching host allocator, which would round it up to a power of two (see tiers/pinned.py);
`pinned_bytes()` says how much this process holds pinned that way.
"""

from __future__ import annotations

import math
import mmap

import torch

from tiers.base import MemoryTier, PageShape
from tiers.pinned import page_round, pinned_bytes, pinned_host_tensor, release_pinned

__all__ = ["HostTier", "aligned_host_tensor", "pinned_bytes"]


def aligned_host_tensor(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A flat host tensor whose storage starts on a page boundary and spans exactly `numel` elements rounded up to
    the OS page size; page-locked (registered with CUDA) if `pin`. Always a normal tensor, never an inference
    tensor, so that it can be updated in place outside inference mode (e.g. on I/O threads). Pinned memory is
    unregistered by `release_pinned(t)`, or when the tensor is freed."""
    with torch.inference_mode(False):
        return _aligned_host_tensor(numel, dtype, pin)


def _aligned_host_tensor(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    if pin:
        return pinned_host_tensor(numel, dtype)
    buf = mmap.mmap(-1, page_round(numel * torch.empty((), dtype=dtype).element_size()))  # page-aligned
    return torch.frombuffer(buf, dtype=dtype, count=numel)  # the storage keeps `buf` alive


class HostTier(MemoryTier):
    name = "host"

    def __init__(self, shape: PageShape, capacity: int, pin: bool | None = None,
                 storage: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`storage`: the K and V pools ([capacity, H, P, D] each, page-aligned) when the caller allocated them."""
        super().__init__(shape, capacity)
        if storage is not None:
            self.pinned = False
            self.k, self.v = storage
            self._storage = None
            return
        self.pinned = torch.cuda.is_available() if pin is None else pin
        nk, nv = (capacity * math.prod(dims) for dims in (shape.k_dims, shape.v_dims))
        # K and V share one allocation: K's [capacity, *k_dims], then V's.
        self._storage = aligned_host_tensor(nk + nv, shape.store_dtype, self.pinned)
        with torch.inference_mode(False):  # views of a normal tensor made inside the mode would not be normal
            self.k = self._storage[:nk].view(capacity, *shape.k_dims)
            self.v = self._storage[nk:].view(capacity, *shape.v_dims)

    def close(self) -> None:
        """Unregisters the pinned pool (idempotent) and drops this tier's references to it."""
        if self._storage is not None:  # None: the caller owns the storage
            release_pinned(self._storage)
        self._storage = torch.empty(0)
        super().close()
