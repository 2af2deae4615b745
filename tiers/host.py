"""Host RAM: one pool allocated at start-up, pinned when CUDA is present, page-aligned.

Page alignment lets the disk tier read and write slots with O_DIRECT straight into this pool.
"""

from __future__ import annotations

import mmap

import torch

from tiers.base import MemoryTier, PageShape


def aligned_host_tensor(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A flat host tensor whose storage starts on a 4 KiB boundary. Always a normal tensor, never an inference
    tensor, so that it can be updated in place outside inference mode (e.g. on I/O threads)."""
    with torch.inference_mode(False):
        return _aligned_host_tensor(numel, dtype, pin)


def _aligned_host_tensor(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    if pin:
        # cudaHostAlloc returns page-aligned memory.
        return torch.empty(numel, dtype=dtype, pin_memory=True)
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    buf = mmap.mmap(-1, numel * torch.empty((), dtype=dtype).element_size())  # anonymous mappings are page-aligned
    return torch.frombuffer(buf, dtype=dtype, count=numel)


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
        n = capacity * shape.kv_heads * shape.page_size * shape.head_dim
        # K and V share one allocation: [2, capacity, H, P, D].
        self._storage = aligned_host_tensor(2 * n, shape.dtype, self.pinned)
        with torch.inference_mode(False):  # views of a normal tensor made inside the mode would not be normal
            both = self._storage.view(2, capacity, *shape.dims)
            self.k, self.v = both[0], both[1]

    def close(self) -> None:
        self._storage = torch.empty(0)
        super().close()
