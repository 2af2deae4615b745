"""Prefetch policies: which pages of layer L+1 to start loading while layer L computes.

- `none`: nothing ahead of time; pages are loaded when the selection asks for them.
- `temporal`: the pages layer L+1 selected at the previous step (attention repeats from step to step).
- `speculative`: the pages layer L+1 would select for a query approximated from layer L's input and
  layer L+1's query weights, as InfiniGen does (the runtime computes that query; see SparseSelection.speculate).
- `history`: the pages holding the blocks with the most attention in layer L+1's decayed history of predicted
  attention per block and head (AttentionPredictor-style; needs `history` > 0, else nothing is predicted).
In exact mode every page is needed, so the runtime prefetches the missing pages of the next layer whatever the policy.
"""

from __future__ import annotations

import torch

from policies.base import PrefetchContext, PrefetchPolicy
from policies.registry import PREFETCH


@PREFETCH.register("none")
class NoPrefetch(PrefetchPolicy):
    def predict(self, layer: int, context: PrefetchContext) -> torch.Tensor | None:
        return None


@PREFETCH.register("temporal")
class TemporalPrefetch(PrefetchPolicy):
    def predict(self, layer: int, context: PrefetchContext) -> torch.Tensor | None:
        return context.last_selected.get(layer)


@PREFETCH.register("speculative")
class SpeculativePrefetch(PrefetchPolicy):
    # The runtime asks for a speculated query when this is set.
    needs_speculation = True

    def predict(self, layer: int, context: PrefetchContext) -> torch.Tensor | None:
        return context.predicted_pages.pop(layer, None)


@PREFETCH.register("history")
class HistoryPrefetch(PrefetchPolicy):
    def predict(self, layer: int, context: PrefetchContext) -> torch.Tensor | None:
        history = getattr(context, "history", None)
        return history(layer) if history is not None else None
