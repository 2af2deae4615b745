"""Eviction policies: `lru` (least recently attended first) and `score` (lowest decayed attention mass first)."""

from __future__ import annotations

import torch

from policies.base import EvictionPolicy
from policies.registry import EVICTION


def _lowest(key: torch.Tensor, eligible: torch.Tensor, n: int) -> list[tuple[int, int]]:
    flat = torch.where(eligible, key, torch.full_like(key, float("inf"))).flatten()
    count = min(n, int(eligible.sum()))
    if count == 0:
        return []
    idx = torch.topk(flat, count, largest=False, sorted=True).indices
    cols = eligible.shape[1]
    return [(int(i) // cols, int(i) % cols) for i in idx]


@EVICTION.register("lru")
class LRUEviction(EvictionPolicy):
    """Evicts the page attended longest ago; among equals, the oldest page (lowest index) first."""

    def victims(self, eligible: torch.Tensor, n: int) -> list[tuple[int, int]]:
        t = self.table
        # Ties broken by page index so the order is deterministic.
        key = t.last_use.double() * t.max_pages + torch.arange(t.max_pages, dtype=torch.float64)[None, :]
        return _lowest(key, eligible, n)


@EVICTION.register("score")
class ScoreEviction(EvictionPolicy):
    """Keeps the pages with the highest decayed attention mass: score <- decay * score + mass at each use."""

    decay = 0.9

    def on_use(self, layer: int, pages: torch.Tensor, step: int, mass: torch.Tensor | None = None) -> None:
        super().on_use(layer, pages, step, mass)
        row = self.table.score[layer]
        row.mul_(self.decay)
        if mass is not None:
            row.index_add_(0, pages.long(), mass.float().cpu())
        else:
            row.index_add_(0, pages.long(), torch.ones(pages.numel()))

    def absorb(self, use_step: torch.Tensor, mass: torch.Tensor) -> None:
        # Steps on the device are decayed together: once per page boundary, not once per step.
        super().absorb(use_step, mass)
        self.table.score.mul_(self.decay).add_(mass)

    def victims(self, eligible: torch.Tensor, n: int) -> list[tuple[int, int]]:
        t = self.table
        key = t.score.double() + 1e-9 * torch.arange(t.max_pages, dtype=torch.float64)[None, :]
        return _lowest(key, eligible, n)
