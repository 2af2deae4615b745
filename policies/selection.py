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
    (the other channels' terms are left out, not bounded).

    `share`: on SmolLM2 (benchmarks/selection_recall.py, prose at 2K and 4K tokens, every head mode, block of 16 to 64
    and budget of 10% and 20%), half the channels keep the recall within 0.001 of minmax in every case; a quarter
    loses up to 0.002 on average and up to 0.006, an eighth 0.004 to 0.006 and up to 0.016."""

    share = 0.5

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
    key of the block and that mean (the rest zeros). `keep` flags blocks where it falls below `outlier_cosine`.

    Being a minimum over the block's keys, it flags a share of blocks about proportional to the block size. At 0.3,
    on SmolLM2 prose (benchmarks/selection_recall.py), 2.5% of 16-token blocks, 5% of 32-token blocks and 9-10% of 64-token
    blocks are outliers, and the recall is 0.003 to 0.006 above minmax on average; with no outliers it is 0.02 below
    (0.05 below with 16-token blocks); at 0.1 (1% of 16-token blocks) 0.005 to 0.007 below; at 0.5 0.002 to 0.007
    above, with 5%, 8% and 15% outliers."""

    outlier_cosine = 0.3

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
    `weight` * q + (1 - weight) * that average (which includes q); a layer's first query is its own average.

    On SmolLM2 prose (benchmarks/selection_recall.py, the history starting from the prompt's last 32 queries) every blend
    tried (decay 0.5 to 0.98, weight 0.3 to 0.9) is within 0.002 of minmax on average; 0.95 and 0.8 are among the
    best, 0.001 above, and make the heads agree a little more (0.36 of the pages touched against 0.37)."""

    decay = 0.95
    weight = 0.8

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

    def reorder(self, sources: dict[int, int]) -> None:
        before = dict(self.history)
        for row, src in sources.items():
            if src in before:
                self.history[row] = before[src].clone()
            else:
                self.history.pop(row, None)

    def reset(self) -> None:
        self.history.clear()
