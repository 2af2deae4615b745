"""The three policy interfaces. Policies decide; they never move bytes (the runtime's engine does).

- SelectionPolicy: which pages a decode step attends to in sparse mode (scores pages from key summaries).
- PrefetchPolicy: which pages of the next layer to start loading while the current layer computes.
- EvictionPolicy: which resident pages of a tier to give up when room is needed. `victims` has no side effects.

Each kind has a registry (policies.registry) mapping a name to a class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

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
    """What a prefetch policy may look at: the previous selection per layer, the pages chosen for a speculated
    query, and the attention history."""

    def __init__(self) -> None:
        self.last_selected: dict[int, torch.Tensor] = {}
        self.predicted_pages: dict[int, torch.Tensor] = {}
        # layer -> pages ranked highest by the attention history (None: no history kept).
        self.history: Callable[[int], torch.Tensor | None] | None = None


class SelectionPolicy(ABC):
    """Scores blocks of keys (`select_block` tokens of a page, the unit of selection) from compact summaries kept on
    the device. `bound` gives, per block, KV head and query row, a log-weight of the block: the largest scaled score
    q.k of its keys, or an estimate of the log of its summed attention weights; the runtime turns it into a share
    of attention per block and head (a softmax over blocks)
    and picks the top blocks of each head. Every method runs on the device and reads nothing back on the host."""

    name: str

    @abstractmethod
    def summary_size(self, block: int, dtype: torch.dtype) -> int:
        """Vectors of length head_dim (in `dtype`, the keys') kept per block of `block` tokens and KV head."""

    @abstractmethod
    def summarize(self, k: torch.Tensor) -> torch.Tensor:
        """Keys of full blocks [n, H, B, D] -> summaries [n, summary_size, H, D] (the keys' dtype)."""

    @abstractmethod
    def bound(self, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> torch.Tensor:
        """Queries [H, M, D] (float32; row g*T + t of KV head h is query head h*G + g at token t) and summaries
        [n, S, H, D] -> float32 [n, H, M], the block's log-weight (the largest score q.k * scaling of its keys, or
        an estimate of the log of its summed weights exp(q.k * scaling)); higher is attended more."""

    def keep(self, summaries: torch.Tensor) -> torch.Tensor | None:
        """Bool [n, H]: blocks always chosen whatever the query (outliers), or None for none."""
        return None

    def bound_batch(self, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> torch.Tensor:
        """`bound` for several sequences at once: queries [B, H, M, D] and each one's summaries [B, n, S, H, D] ->
        [B, n, H, M]. By default the sequences' heads go side by side as the heads of one sequence, which is right
        for a policy whose summary vectors each belong to one head; a policy whose vectors mix heads overrides it."""
        B, n, S, H, D = summaries.shape
        folded = summaries.permute(1, 2, 0, 3, 4).reshape(n, S, B * H, D)
        return self.bound(q.reshape(B * H, -1, D), folded, scaling).view(n, B, H, -1).transpose(0, 1)

    def keep_batch(self, summaries: torch.Tensor) -> torch.Tensor | None:
        """`keep` for several sequences' summaries [B, n, S, H, D] at once -> bool [B, n, H], or None."""
        B, n, S, H, D = summaries.shape
        keep = self.keep(summaries.view(B * n, S, H, D))
        return None if keep is None else keep.view(B, n, H)

    def query(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The queries to score `layer`'s blocks with, given this step's q [H, M, D] (float32); a policy may keep
        state per layer (a probe built from recent queries). Same shape as q."""
        return q

    def query_batch(self, layers: list[int], q: torch.Tensor) -> torch.Tensor:
        """`query` for rows `layers` of a batch's sequences at once, q [B, H, M, D] (float32): each row as `query`
        would take it alone. By default row by row when `query` is overridden (a policy keeping state per row may
        do it at once)."""
        if type(self).query is SelectionPolicy.query:
            return q
        return torch.stack([self.query(layer, q[i]) for i, layer in enumerate(layers)])

    def reorder(self, sources: dict[int, int]) -> None:
        """Beam search: row r goes on from row sources[r]; per-row state follows. Stateless selectors: nothing."""

    def reset(self) -> None:
        """A new sequence: forget state kept across steps."""

    def score(self, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> torch.Tensor:
        """Predicted share of attention per block [n]: the bound's softmax over blocks, summed over heads and
        rows (one set of blocks for every head)."""
        return torch.softmax(self.bound(q, summaries, scaling), dim=0).sum(dim=(1, 2))
