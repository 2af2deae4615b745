"""The tier interface: a pool of page slots under a byte budget.

A page holds the keys and the values of `page_size` tokens of one layer, all KV heads:
K and V each have shape [H_kv, page_size, head_dim] (`PageShape`), or, in the tiers below the device with
`kv_quant` set, are rows of bytes holding quantized codes and their scales (`PageShape.packed`). A tier stores `capacity` pages in slots
numbered 0..capacity-1. Tiers only store; what lives where is decided by the runtime and `policies/`, and
bytes are moved by the transfer engine (`offload/engine.py`), which dispatches on (source tier, destination tier).

Lifecycle: construct (storage is allocated once, here) -> allocate/release slots, read/write pages -> close().

Memory tiers (device, host) expose their storage as two tensors `k` and `v` of shape
[capacity, H_kv, page_size, head_dim] ([capacity, bytes] when packed), so copies are plain tensor ops. The disk tier has no tensors: it reads
and writes pages into host tensors with positioned I/O.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch


class PageError(OSError):
    """Pages a tier could not store or return intact (an I/O error, a short read, a checksum mismatch): the tier's
    name, the slots concerned and the cause. The runtime maps slots to layers and pages, and recovers or fails
    naming them."""

    def __init__(self, tier: str, slots: Sequence[int], cause: str, err: int = errno.EIO):
        self.tier, self.slots, self.cause = tier, [int(s) for s in slots], cause
        shown = ", ".join(map(str, self.slots[:4])) + (", ..." if len(self.slots) > 4 else "")
        super().__init__(err, f"{tier}: slot{'s' if len(self.slots) != 1 else ''} {shown}: {cause}")


class WorkerDied(OSError):
    """The threads that would run or complete a copy have died: it never will (not a damaged page)."""


@dataclass(frozen=True)
class PageShape:
    kv_heads: int
    page_size: int
    head_dim: int
    dtype: torch.dtype
    # Packed pages (quantized, offload/quant.py): K and V are rows of `packed` = (K bytes, V bytes) uint8 each,
    # codes and scales together. None: K and V are [H, P, D] tensors of `dtype`.
    packed: tuple[int, int] | None = None

    @property
    def half_bytes(self) -> int:
        """Bytes of the K (or the V) half of one full-precision page."""
        return self.kv_heads * self.page_size * self.head_dim * self.dtype.itemsize

    @property
    def k_bytes(self) -> int:
        """Bytes of the K half of one page as stored."""
        return self.packed[0] if self.packed else self.half_bytes

    @property
    def v_bytes(self) -> int:
        return self.packed[1] if self.packed else self.half_bytes

    @property
    def page_bytes(self) -> int:
        return self.k_bytes + self.v_bytes

    @property
    def dims(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.page_size, self.head_dim)

    @property
    def k_dims(self) -> tuple[int, ...]:
        """The shape of the K half of one page as stored: [H, P, D], or [K bytes] when packed."""
        return (self.packed[0],) if self.packed else self.dims

    @property
    def v_dims(self) -> tuple[int, ...]:
        return (self.packed[1],) if self.packed else self.dims

    @property
    def store_dtype(self) -> torch.dtype:
        return torch.uint8 if self.packed else self.dtype


class Tier(ABC):
    """A fixed number of page slots. Subclasses allocate their storage in __init__ and free it in close()."""

    name: ClassVar[str]

    def __init__(self, shape: PageShape, capacity: int):
        if capacity < 0:
            raise ValueError(f"{self.name}: capacity must be >= 0 pages, got {capacity}")
        self.shape = shape
        self.capacity = capacity
        # Free slots as a stack; the lowest slot numbers are handed out first.
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        # References beyond the first, of slots that several pages hold (beams sharing their common pages): such a
        # slot is freed by its last release.
        self.refs: dict[int, int] = {}
        self.closed = False

    @property
    def page_bytes(self) -> int:
        return self.shape.page_bytes

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.num_used * self.page_bytes

    def allocate(self, n: int) -> list[int] | None:
        """Takes `n` free slots, or none at all and returns None when fewer than `n` are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def reset(self, reserved: int = 0) -> None:
        """Frees every slot but the first `reserved` (held for good, e.g. staging), for a new sequence."""
        self._free = list(range(self.capacity - 1, reserved - 1, -1))
        self.refs.clear()

    def share(self, slots: Sequence[int]) -> None:
        """One more page holds each of `slots` (held already): each needs one more release to be freed."""
        for s in slots:
            self.refs[s] = self.refs.get(s, 0) + 1

    def release(self, slots: Sequence[int]) -> list[int]:
        """Drops one reference to each slot; returns those freed (no page holds them any more)."""
        free, freed = set(self._free), []
        for s in slots:
            if not 0 <= s < self.capacity:
                raise ValueError(f"{self.name}: slot {s} out of range 0..{self.capacity - 1}")
            if s in free:
                raise RuntimeError(f"{self.name}: slot {s} was released twice")
            if self.refs.get(s):
                self.refs[s] -= 1
                if not self.refs[s]:
                    del self.refs[s]
                continue
            free.add(s)
            freed.append(s)
        self._free.extend(freed)
        return freed

    @abstractmethod
    def write(self, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores pages: k and v are [len(slots), H_kv, page_size, head_dim]. Synchronous."""

    @abstractmethod
    def read(self, slots: Sequence[int], k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """Loads pages into k_out and v_out, each [len(slots), H_kv, page_size, head_dim]. Synchronous."""

    def close(self) -> None:
        """Frees the storage. Idempotent."""
        self.closed = True


class MemoryTier(Tier):
    """A tier whose storage is two tensors on one torch device."""

    k: torch.Tensor  # [capacity, H_kv, page_size, head_dim]
    v: torch.Tensor

    def write(self, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        idx = torch.as_tensor(list(slots), dtype=torch.long, device=self.k.device)
        self.k.index_copy_(0, idx, k.to(self.k.device))
        self.v.index_copy_(0, idx, v.to(self.v.device))

    def read(self, slots: Sequence[int], k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        idx = torch.as_tensor(list(slots), dtype=torch.long, device=self.k.device)
        k_out.copy_(self.k.index_select(0, idx))
        v_out.copy_(self.v.index_select(0, idx))

    def close(self) -> None:
        self.k = self.v = torch.empty(0)
        super().close()
