"""The three policy interfaces. Policies decide; they never move bytes (the runtime's engine does).

- SelectionPolicy: which pages a decode step attends to in sparse mode (scores pages from key summaries).
- PrefetchPolicy: which pages of the next layer to start loading while the current layer computes.
- EvictionPolicy: which resident pages of a tier to give up when room is needed. `victims` has no side effects.

Each kind has a registry (policies.registry) mapping a name to a class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from offload.pagetable import PageTable


class EvictionPolicy(ABC):
    name: str

    def __init__(self, table: PageTable):
        self.table = table

    def on_use(self, layer: int, pages: torch.Tensor, step: int, mass: torch.Tensor | None = None) -> None:
        """Pages of `layer` were attended at `step` (mass: their share of the attention, when known)."""
        self.table.last_use[layer, pages] = step

    def absorb(self, use_step: torch.Tensor, mass: torch.Tensor) -> None:
        """Uses recorded on the device since the last page boundary, handed over there: `use_step` [layers,
        max_pages] the step each page was last attended (-1: not since), `mass` its summed predicted share of
        attention."""
        torch.maximum(self.table.last_use, use_step, out=self.table.last_use)

    @abstractmethod
    def victims(self, eligible: torch.Tensor, n: int) -> list[tuple[int, int]]:
        """Up to `n` (layer, page) pairs to evict among `eligible` (bool [layers, max_pages]), best victim first."""


class PrefetchPolicy(ABC):
    name: str

    @abstractmethod
    def predict(self, layer: int, context: PrefetchContext) -> torch.Tensor | None:
        """Page ids of `layer` to load ahead of its attention, or None for no prediction."""


class PrefetchContext:
    """What a prefetch policy may look at: the previous selection per layer, and a scorer for a predicted query."""

    def __init__(self) -> None:
        self.last_selected: dict[int, torch.Tensor] = {}
        self.predicted_pages: dict[int, torch.Tensor] = {}


class SelectionPolicy(ABC):
    name: str

    @abstractmethod
    def summary_size(self) -> int:
        """Vectors of length head_dim kept per page and KV head."""

    @abstractmethod
    def summarize(self, k: torch.Tensor) -> torch.Tensor:
        """Keys of full pages [n, H, P, D] -> summaries [n, summary_size, H, D]."""

    @abstractmethod
    def score(self, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> torch.Tensor:
        """Queries [H, M, D] and summaries [n, S, H, D] -> a score per page [n]; higher attends more."""
