"""Host RAM: one pool allocated at start-up, pinned when CUDA is present, page-aligned.

Page alignment lets the disk tier read and write slots with O_DIRECT straight into this pool. The pinned pool is
an anonymous mapping of exactly its size (rounded up to the OS page size) registered with cudaHostRegister, not a
block of torch's caching host allocator, which would round it up to a power of two (see tiers/pinned.py);
`pinned_bytes()` says how much this process holds pinned that way.

Checksums: each page the runtime stores here is sealed once written (`seal`: an xxh3-64 of its K half and one of
its V half, seeded with the slot number, as the disk tier keeps them), and checked (`damaged`) whenever it is
copied out: written back to disk, loaded to the device, promoted, or used to rebuild another tier's copy. A copy
out of a damaged page would carry the damage on with a fresh checksum of its own, so the runtime rebuilds the page
first (offload/recover.py). Host pages are full pages, which never change once written, so one seal holds until
the slot is released. Reads in place (the CPU decode step's gather, the GPU's reads over the bus, attention on the
host) are not checked every step: that would hash every host page once per step, +12% a step on the CPU as
measured in BENCHMARKS.md ("Checksum cost"; `Runtime.check_in_place` turns it on for the CPU's exact steps).
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import numpy as np
import torch
import xxhash

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
    # A measurement switch, not an option (benchmarks/checksum_cost.py times what checksums cost): False seals and
    # checks nothing.
    checksums: bool = True

    def __init__(self, shape: PageShape, capacity: int, pin: bool | None = None,
                 storage: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`storage`: the K and V pools ([capacity, H, P, D] each, page-aligned) when the caller allocated them."""
        super().__init__(shape, capacity)
        # The xxh3 of each slot's K half (at 2 s) and V half (at 2 s + 1), and whether the slot is sealed.
        self._sums = np.zeros(2 * capacity, dtype=np.uint64)
        self._sums_at = memoryview(self._sums)  # Python ints in and out, exact (numpy scalars may round via float)
        self._sealed = np.zeros(capacity, dtype=np.bool_)
        self._pending: list[tuple[torch.cuda.Event, list[int]]] = []  # copies still running into sealed slots
        if storage is not None:
            self.pinned = False
            self.k, self.v = storage
            self._storage = None
            self._bind()
            return
        self.pinned = torch.cuda.is_available() if pin is None else pin
        nk, nv = (capacity * math.prod(dims) for dims in (shape.k_dims, shape.v_dims))
        # K and V share one allocation: K's [capacity, *k_dims], then V's.
        self._storage = aligned_host_tensor(nk + nv, shape.store_dtype, self.pinned)
        with torch.inference_mode(False):  # views of a normal tensor made inside the mode would not be normal
            self.k = self._storage[:nk].view(capacity, *shape.k_dims)
            self.v = self._storage[nk:].view(capacity, *shape.v_dims)
        self._bind()

    def _bind(self) -> None:
        # Flat byte views of the pools, for hashing a slot without a copy (numpy has no bfloat16: bytes).
        self._kb, self._vb = (memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
                              for t in (self.k, self.v))
        self._k_bytes, self._v_bytes = self.shape.k_bytes, self.shape.v_bytes

    def _hashes(self, s: int) -> tuple[int, int]:
        kb, vb = self._k_bytes, self._v_bytes
        return (xxhash.xxh3_64_intdigest(self._kb[s * kb:(s + 1) * kb], s),
                xxhash.xxh3_64_intdigest(self._vb[s * vb:(s + 1) * vb], s))

    def seal(self, slots: Sequence[int], event=None) -> None:
        """Records the checksums of the pages written to `slots`. `event`: the CUDA event of the copy that writes
        them, when it may still run; they are hashed once it has finished, at the latest before they are checked
        or released (None: the copy has finished)."""
        if not self.checksums:
            return
        self._settle(wait=False)
        if event is not None and not event.query():
            self._pending.append((event, [int(s) for s in slots]))
        else:
            self._record(slots)

    def _record(self, slots: Sequence[int]) -> None:
        sums = self._sums_at
        for s in map(int, slots):
            sums[2 * s], sums[2 * s + 1] = self._hashes(s)
            self._sealed[s] = True

    def _settle(self, wait: bool = True) -> None:
        """Seals the pages of copies that have finished (`wait`: of all, waiting for them)."""
        while self._pending and (wait or self._pending[0][0].query()):
            event, slots = self._pending.pop(0)
            event.synchronize()
            self._record(slots)

    def damaged(self, slots: Sequence[int]) -> list[int]:
        """The slots of `slots` whose pages differ from what was sealed there (unsealed slots pass)."""
        if not self.checksums:
            return []
        if any(int(s) < 0 for s in slots):
            raise ValueError(f"host: checksums of slots {list(map(int, slots))}: a slot below 0 holds no page")
        self._settle()
        sums, sealed = self._sums_at, self._sealed
        return [s for s in map(int, slots) if sealed[s] and self._hashes(s) != (sums[2 * s], sums[2 * s + 1])]

    def release(self, slots: Sequence[int]) -> list[int]:
        self._settle()
        freed = super().release(slots)
        self._sealed[freed] = False
        return freed

    def reset(self, reserved: int = 0) -> None:
        self._settle()
        super().reset(reserved)
        self._sealed[:] = False

    def close(self) -> None:
        """Unregisters the pinned pool (idempotent) and drops this tier's references to it."""
        if self._storage is not None:  # None: the caller owns the storage
            release_pinned(self._storage)
        self._storage = torch.empty(0)
        self._kb = self._vb = memoryview(b"")
        super().close()
