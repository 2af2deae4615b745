"""Selection policies: score blocks of keys from compact summaries kept on the device.

- `minmax` keeps the per-channel minimum and maximum of each block's keys (as Quest does). For a query q,
  sum_d max(q_d * min_d, q_d * max_d) is an upper bound of q.k over every key k of the block.
- `channels` keeps the same summaries but sums that bound over the channels where |q| is largest only (partial
  channels, as InfiniGen does): fewer terms, and the channels that carry little of q.k add no slack.
- `landmark` keeps each block's mean key (its landmark, as ShadowKV does) and scores q.landmark. Blocks whose keys
  stray far from their landmark (outliers) are always chosen: the mean says little about them.
- `sketch` keeps minmax's summaries and, for every key, a code of `bits` bits per channel: which of 2**bits equal
  steps between the block's minimum and maximum of that channel the key falls in (per-channel key quantization, as
  KIVI does, at two bits). Each key is rebuilt at its step's middle and the block scores its keys' largest q.k: an
  estimate from every key, where the other policies bound or guess it from a block-wide summary.
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
    def summary_size(self, block: int, dtype: torch.dtype) -> int:
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

    def summary_size(self, block: int, dtype: torch.dtype) -> int:
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

    def query_batch(self, layers: list[int], q: torch.Tensor) -> torch.Tensor:
        # The rows' averages in one tensor, updated at once; each row's entry is then a view of it. A row's first
        # query is its own average, as in `query`.
        q = q.float()
        have = [self.history.get(layer) for layer in layers]
        fresh = [a is None or a.shape != q.shape[1:] or a.device != q.device for a in have]
        avg = torch.stack([q[i] if new else a for i, (a, new) in enumerate(zip(have, fresh))])
        if not all(fresh):
            old = torch.tensor([not new for new in fresh], device=q.device)
            avg = torch.where(old[:, None, None, None], avg.mul(self.decay).add_(q, alpha=1 - self.decay), avg)
        for i, layer in enumerate(layers):
            self.history[layer] = avg[i]
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


# Per (bits, dtype, device): the rebuilt position of each code in a byte, [256, 8 // bits]: code c of 2**bits steps
# sits at (c + 1/2) / 2**bits of the way from the block's minimum to its maximum.
_SKETCH_WEIGHTS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def sketch_weights(bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (bits, dtype, torch.device(device))
    table = _SKETCH_WEIGHTS.get(key)
    if table is None:
        codes = (torch.arange(256)[:, None] >> torch.arange(0, 8, bits)) & ((1 << bits) - 1)
        table = _SKETCH_WEIGHTS[key] = ((codes.double() + 0.5) / (1 << bits)).to(dtype=dtype, device=device)
    return table


@SELECTION.register("sketch")
class SketchSelection(SelectionPolicy):
    """Summaries [n, 2 + c, H, D]: the block's per-channel minimum and maximum (minmax's), then the codes of its keys
    packed into the c vectors' bytes, token-major: for token t, head h and channel d, byte (t * H + h) * D / k + d // k
    at bit (d % k) * bits, k = 8 // bits codes per byte. c = ceil(block * bits / (8 * itemsize)) vectors; where they
    hold room for more tokens than the block's, the block's codes repeat (token t holds token t % block's). At two
    bits and 2-byte keys, 8-token blocks take 3 vectors (3/8 of the keys' bytes) and 16-token blocks 4 (1/4).

    The block's weight (`block_weight`) is the largest score of its rebuilt keys ("max"), or their logsumexp (an
    estimate of the block's attention mass, "logsumexp", which covers slightly less of it on the measurements below).

    On SmolLM2 at a 10% budget (benchmarks/selection_recall.py, prose, kv mode, 2K / 4K,
    benchmarks/results/selectors-sketch-cpu.json), 16-token blocks: two bits cover 0.832 / 0.873 of the attention
    mass with "max" and 0.831 / 0.871 with "logsumexp", one bit 0.811 / 0.854, minmax 0.804 / 0.844, and an oracle
    that picks blocks by their true mass 0.840 / 0.880. `bits` is 2; the block size is learned from `summary_size`
    or `summarize`."""

    bits = 2
    block_weight = "max"

    def __init__(self) -> None:
        self.block = 0

    def summary_size(self, block: int, dtype: torch.dtype) -> int:
        self.block = block
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 + -(-block * self.bits // (8 * itemsize))

    def _tokens(self, summaries: torch.Tensor) -> int:
        """Tokens the code vectors of `summaries` [..., S, H, D] hold room for (the block's, then padding)."""
        return (summaries.shape[-3] - 2) * summaries.element_size() * 8 // self.bits

    def summarize(self, k: torch.Tensor) -> torch.Tensor:
        n, h, block, d = k.shape
        per = 8 // self.bits
        if d % per:
            raise ValueError(f"selection: sketch packs {per} channels per byte; head_dim {d} is not a multiple")
        self.block = block
        sketch_weights(self.bits, k.dtype, k.device)  # made here, with the prefill, rather than in a decode step
        lo, hi = k.amin(dim=2), k.amax(dim=2)  # [n, H, D], in the keys' dtype: the codes step from these values
        levels = 1 << self.bits
        step = (hi.float() - lo.float()).div_(levels)
        codes = (k.float() - lo.float()[:, :, None]).div_(step.clamp_min(1e-30)[:, :, None]).floor_()
        codes = codes.clamp_(0, levels - 1).to(torch.uint8).transpose(1, 2)  # [n, B, H, D]
        c = self.summary_size(block, k.dtype) - 2
        tokens = c * k.element_size() * per
        if tokens > block:  # room left: repeat the block's own codes, which leaves its largest score as it is
            codes = codes[:, torch.arange(tokens, device=k.device) % block]  # [n, T, H, D]
        shifts = torch.arange(0, 8, self.bits, dtype=torch.uint8, device=k.device)
        packed = (codes.reshape(n, tokens, h, d // per, per) << shifts).sum(dim=-1, dtype=torch.uint8)
        space = packed.view(n, c, h, d * k.element_size()).view(k.dtype)  # the bytes as c vectors of each head
        return torch.cat([lo[:, None], hi[:, None], space], dim=1)

    def bound(self, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> torch.Tensor:
        return self._bound(q, summaries, scaling)

    def bound_batch(self, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> torch.Tensor:
        # The code vectors hold a block's codes token-major over its heads: a sequence's heads stay together.
        return self._bound(q[:, None, None], summaries, scaling)

    def _bound(self, q: torch.Tensor, summaries: torch.Tensor, scaling: float) -> torch.Tensor:
        """Summaries [..., S, H, D] (any leading dims; blocks last of them) and queries broadcastable to
        [..., 1, H, M, D] -> [..., H, M]."""
        *lead, s, h, d = summaries.shape
        tokens = self._tokens(summaries)
        table = sketch_weights(self.bits, summaries.dtype, summaries.device)
        lo, hi, codes = summaries.split([1, 1, s - 2], dim=-3)  # [..., 1, H, D] twice, [..., c, H, D]
        weights = table[codes.view(torch.uint8).long()].view(*lead, tokens, h, d)
        keys = torch.lerp(lo, hi, weights).unsqueeze(-2)  # [..., T, H, 1, D]
        scores = (keys * q).sum(-1)  # [..., T, H, M]
        if self.block_weight == "logsumexp":
            return scores.narrow(-3, 0, self.block).mul_(scaling).logsumexp(-3)
        return scores.amax(-3).mul_(scaling)  # past the block, repeated keys: the largest score is the block's
