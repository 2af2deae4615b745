"""The compute device's memory (GPU HBM; the CPU's RAM on a machine without a GPU)."""

from __future__ import annotations

import torch

from tiers.base import MemoryTier, PageShape


class DeviceTier(MemoryTier):
    name = "device"

    def __init__(self, shape: PageShape, capacity: int, device: torch.device,
                 storage: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`storage`: the K and V pools ([capacity, H, P, D] each) when the caller allocated them, e.g. as part of
        one allocation shared with the host tier where device and host memory are the same."""
        super().__init__(shape, capacity)
        self.device = torch.device(device)
        if storage is not None:
            self.k, self.v = storage
            return
        # Normal tensors even when built inside inference mode: the pool outlives it and is updated in place.
        with torch.inference_mode(False):
            self.k = torch.empty((capacity, *shape.dims), dtype=shape.dtype, device=self.device)
            self.v = torch.empty((capacity, *shape.dims), dtype=shape.dtype, device=self.device)
