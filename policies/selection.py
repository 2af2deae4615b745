"""Selection policies: score pages from compact key summaries kept on the device.

`minmax` keeps the per-channel minimum and maximum of each page's keys (as Quest does). For a query q,
sum_d max(q_d * min_d, q_d * max_d) is an upper bound of q.k over every key k of the page.
Per-head bounds become a probability per page through a softmax over pages, and the page's score is the sum over
the query heads (with grouped-query attention, several query heads share one KV head and so one summary).
"""

from __future__ import annotations

import torch

from policies.base import SelectionPolicy
from policies.registry import SELECTION


def minmax_bound(q: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """q [H, M, D], summaries [n, 2, H, D] (min, max) -> upper bound of q.k per page [n, H, M]."""
    lo, hi = summaries[:, 0].float(), summaries[:, 1].float()  # [n, H, D]
    qf = q.float()[None]  # [1, H, M, D]
    return torch.maximum(qf * lo[:, :, None, :], qf * hi[:, :, None, :]).sum(-1)


@SELECTION.register("minmax")
class MinMaxSelection(SelectionPolicy):
    def summary_size(self) -> int:
        return 2

    def summarize(self, k: torch.Tensor) -> torch.Tensor:
        return torch.stack([k.amin(dim=2), k.amax(dim=2)], dim=1)

    def bound(self, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> torch.Tensor:
        return minmax_bound(q, summaries).mul_(scaling)  # [n, H, M]
