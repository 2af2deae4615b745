"""Selection policies: score blocks of keys from compact summaries kept on the device.

- `minmax` keeps the per-channel minimum and maximum of each block's keys (as Quest does). For a query q,
  sum_d max(q_d * min_d, q_d * max_d) is an upper bound of q.k over every key k of the block.
- `channels` keeps the same summaries but sums that bound over the channels where |q| is largest only (partial
  channels, as InfiniGen does): fewer terms, and the channels that carry little of q.k add no slack.
- `landmark` keeps each block's mean key (its landmark, as ShadowKV does) and scores q.landmark. Blocks whose keys
  stray far from their landmark (outliers) are always chosen: the mean says little about them.
- `probe` scores the min/max bound of a probe, a blend of the step's query and a decayed average of the layer's
  recent queries (as ActQKV's activation-aware probe does): attention tends to return where recent queries went.

Per-head bounds become a probability per block through a softmax over blocks (see `SelectionPolicy.score`); with
grouped-query attention, several query heads share one KV head and so one summary.
"""

from __future__ import annotations

import math

import torch

from policies.base import SelectionPolicy
from policies.registry import SELECTION


def minmax_bound(q: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """q [H, M, D], summaries [n, 2, H, D] (min, max) -> upper bound of q.k per block [n, H, M]."""
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


@SELECTION.register("channels")
class ChannelsSelection(MinMaxSelection):
    """The min/max bound over the `ceil(share * head_dim)` channels of each head and query row where |q| is largest
    (the other channels' terms are left out, not bounded)."""

    share = 0.25

    def channels(self, head_dim: int) -> int:
        return max(1, min(head_dim, math.ceil(self.share * head_dim)))

    def bound(self, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> torch.Tensor:
        qf = q.float()
        top = qf.abs().topk(self.channels(qf.shape[-1]), dim=-1).indices  # [H, M, r]
        # q with its other channels zeroed: their terms max(0 * min, 0 * max) vanish from the sum.
        partial = torch.zeros_like(qf).scatter_(-1, top, qf.gather(-1, top))
        return minmax_bound(partial, summaries).mul_(scaling)


@SELECTION.register("landmark")
class LandmarkSelection(SelectionPolicy):
    """Summaries: the block's mean key, and a vector whose channel 0 holds the smallest cosine similarity between a
    key of the block and that mean (the rest zeros). `keep` flags blocks where it falls below `outlier_cosine`."""

    outlier_cosine = 0.5

    def summary_size(self) -> int:
        return 2

    def summarize(self, k: torch.Tensor) -> torch.Tensor:
        kf = k.float()
        mean = kf.mean(dim=2)  # [n, H, D]
        cos = torch.cosine_similarity(kf, mean[:, :, None, :], dim=-1, eps=1e-6)  # [n, H, B]
        stat = torch.zeros_like(mean)
        stat[..., 0] = cos.amin(dim=-1)
        return torch.stack([mean, stat], dim=1).to(k.dtype)

    def bound(self, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> torch.Tensor:
        return torch.einsum("hmd,nhd->nhm", q.float(), summaries[:, 0].float()).mul_(scaling)

    def keep(self, summaries: torch.Tensor) -> torch.Tensor:
        return summaries[:, 1, :, 0].float() < self.outlier_cosine


@SELECTION.register("probe")
class ProbeSelection(MinMaxSelection):
    """`query` keeps per layer the average of its queries decayed by `decay` each step, and returns
    `weight` * q + (1 - weight) * that average (which includes q); a layer's first query is its own average."""

    decay = 0.9
    weight = 0.5

    def __init__(self) -> None:
        self.history: dict[int, torch.Tensor] = {}

    def query(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        q = q.float()
        avg = self.history.get(layer)
        if avg is None or avg.shape != q.shape or avg.device != q.device:
            avg = q.clone()
            self.history[layer] = avg
        else:
            avg.mul_(self.decay).add_(q, alpha=1 - self.decay)
        return torch.lerp(avg, q, self.weight)

    def reset(self) -> None:
        self.history.clear()
