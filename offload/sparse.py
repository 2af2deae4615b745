"""Sparse attention's selection: page summaries, the pages a decode step attends to within the token budget, the
speculated query of the next layer (InfiniGen-style prefetch), and the recall diagnostic.

`SparseSelection` owns the summaries (on the compute device), the selection policy, the speculation hooks and the
prefetch context. It decides; the runtime moves. Its inputs are the page table and the tiers, passed per call.
"""

from __future__ import annotations

import torch

from offload import attention_math as am
from offload.config import OffloadConfig
from offload.models import apply_rotary, decoder_layers, query_before_rotary
from offload.pagetable import PageTable, window_start
from policies import SELECTION, PrefetchContext


class SparseSelection:
    def __init__(self, model: torch.nn.Module, config: OffloadConfig, windows: list[int | None], page_size: int,
                 max_pages: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 speculate: bool):
        self.model, self.config, self.windows, self.page_size = model, config, windows, page_size
        self.layers = len(windows)
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.selector = SELECTION.create(config.selection)
        # Key summaries of every page, kept on the device: [layers, max_pages, S, H, D]. Not KV bytes.
        self.summaries = torch.zeros((self.layers, max_pages, self.selector.summary_size(), kv_heads, head_dim),
                                     dtype=dtype, device=device)
        self.summary_rows = list(self.summaries)  # per-layer views, made once
        self.device = device
        self.hooks: list = []
        self.hidden: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = {}
        # Sparse selection's fixed part per (first, last, sinks, recent start): see `fixed`.
        self.fixed_cache: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor, int]] = {}
        if speculate:
            self._install_speculation()
        self.new_sequence()

    def new_sequence(self) -> None:
        self.context = PrefetchContext()
        self.mass: torch.Tensor | None = None  # the predicted attention share of the pages chosen last
        self.recall_sum = [0.0] * self.layers
        self.recall_n = [0] * self.layers

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    # -- summaries -------------------------------------------------------------------------------------------
    def summarize(self, layer: int, pages: list[int], k: torch.Tensor) -> None:
        """Summaries of full pages `pages` (consecutive) of `layer` from their keys k [n, H, P, D]."""
        if pages:
            self.summaries[layer, pages[0]:pages[-1] + 1] = self.selector.summarize(k)

    def summarize_page(self, layer: int, page: int, k: torch.Tensor) -> None:
        """The summary of one page that just filled, from its keys k [1, H, P, D]."""
        self.summaries[layer, page] = self.selector.summarize(k)[0]

    # -- selection -------------------------------------------------------------------------------------------
    def budget_pages(self, layer: int, n: int) -> tuple[int, int, int, int] | None:
        """With n tokens stored (the tail page holding the last ones): (first, last, valid, k_pages), the window's
        first page, the tail page, its tokens and the full pages the budget allows; None when the budget covers
        every token the query sees (the step is exact)."""
        P = self.page_size
        first, off = window_start(self.windows[layer], n, P)
        last = -(-n // P) - 1
        valid = n - last * P
        visible = n - first * P - off
        budget = self.config.token_budget_for(visible)
        k_pages = max(0, (budget - valid) // P)
        if budget >= visible or k_pages >= last - first:
            return None
        return first, last, valid, k_pages

    def fixed(self, first: int, last: int, valid: int, k_pages: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The selection's fixed part among full pages first..last-1: the sink pages and the recent window, as
        device tensors (page ids, and a bias that is -inf on them over first..last-1), and how many pages the
        scores add (the budget's pages less the fixed ones; none when those already take it all). Cached: they
        change at page boundaries and as the tail fills past a page of the recent window."""
        P = self.page_size
        sinks = min(last, -(-self.config.sink_tokens // P))
        recent = max(0, self.config.recent_tokens - valid)
        lo = max(0, last - -(-recent // P)) if recent else last
        key = (first, last, sinks, lo)
        hit = self.fixed_cache.get(key)
        if hit is None:
            # NOTE: pages before `first` were released by a sliding window; they can't be chosen.
            ids = [p for p in range(first, last) if p < sinks or p >= lo]
            bias = torch.zeros(last - first, dtype=torch.float32)
            bias[[p - first for p in ids]] = float("-inf")
            hit = (torch.tensor(ids, dtype=torch.long, device=self.device), bias.to(self.device), len(ids))
            if len(self.fixed_cache) > 64:
                self.fixed_cache.clear()
            self.fixed_cache[key] = hit
        forced, bias, count = hit
        return forced, bias, k_pages - count

    def scores(self, layer: int, q: torch.Tensor, first: int, last: int, scaling: float) -> torch.Tensor:
        """Predicted share of attention of pages first..last-1 for queries q [H, M, D] (float32)."""
        return self.selector.score(q, self.summary_rows[layer].narrow(0, first, last - first), scaling)

    def choose(self, layer: int, q: torch.Tensor, n: int, scaling: float) -> torch.Tensor:
        """Full pages (CPU ids, in page order) a query attends to with n tokens stored: every page of the window
        when the budget covers it, else the fixed part and the best-scored others. Sets `mass` to the predicted
        share of the pages chosen by score (None when none were)."""
        self.mass = None  # never the one of an earlier layer or sequence
        plan = self.budget_pages(layer, n)
        if plan is None:
            first = window_start(self.windows[layer], n, self.page_size)[0]
            return torch.arange(first, -(-n // self.page_size) - 1)
        first, last, valid, k_pages = plan
        forced, bias, free = self.fixed(first, last, valid, k_pages)
        if free <= 0:
            return forced.cpu()
        scores = self.scores(layer, q, first, last, scaling)
        top = torch.topk(scores + bias, free).indices
        chosen, order = torch.sort(torch.cat([forced, top + first]))
        # The predicted share of attention of each chosen page feeds the score eviction policy.
        self.mass = torch.cat([scores[forced - first], scores[top]])[order].cpu()
        return chosen.cpu()

    def select(self, layer: int, q: torch.Tensor, n: int, scaling: float, softcap: float | None,
               table: PageTable, tiers) -> torch.Tensor:
        """`choose`, remembered for temporal prefetch, and measured against dense attention when asked."""
        chosen = self.choose(layer, q, n, scaling)
        self.context.last_selected[layer] = chosen
        if self.config.measure_recall:
            self._measure_recall(layer, q, chosen, n, scaling, softcap, table, tiers)
        return chosen

    # -- speculation (InfiniGen) -----------------------------------------------------------------------------
    def _install_speculation(self) -> None:
        """Captures each attention module's input so that layer L can guess layer L+1's query. Gemma 3 rotates
        local and global layers with different frequencies: there the rotary embedding's output is captured per
        layer type, since layer L+1's may differ from layer L's."""
        model = self.model
        self.attn_modules = [layer.self_attn for layer in decoder_layers(model)[: self.layers]]
        self.model_type = model.config.model_type
        self.rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rope_types: list[str] | None = None

        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is not None and hidden.shape[1] == 1:
                self.hidden[module.layer_idx] = (hidden, kwargs.get("position_embeddings"))

        for m in self.attn_modules:
            self.hooks.append(m.register_forward_pre_hook(capture, with_kwargs=True))
        rotary = getattr(model.model, "rotary_emb", None)
        if self.model_type == "gemma3_text" and rotary is not None:
            self.rope_types = list(model.config.layer_types)

            def capture_rope(module, args, kwargs, output):
                layer_type = args[2] if len(args) > 2 else kwargs.get("layer_type")
                self.rope[layer_type] = output

            self.hooks.append(rotary.register_forward_hook(capture_rope, with_kwargs=True))

    def speculate(self, layer: int, scaling: float, tokens_next: int) -> None:
        """Predicts the pages of layer+1 (holding `tokens_next` tokens) from layer's input and layer+1's own query
        projection, q-norm and rotary (see `models.query_before_rotary` for each architecture)."""
        nxt = layer + 1
        captured = self.hidden.pop(layer, None)
        if nxt >= self.layers or captured is None or tokens_next == 0:
            return
        q = self.speculated_query(nxt, *captured)
        if q is None:
            return  # no rotary to apply: no prediction (the layer then loads what it misses on demand)
        mass = self.mass
        self.context.predicted_pages[nxt] = self.choose(nxt, am.group_queries(q, self.kv_heads), tokens_next + 1,
                                                        scaling)
        self.mass = mass  # the prediction's mass is not this layer's

    def speculated_query(self, nxt: int, hidden: torch.Tensor,
                         rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        """Layer `nxt`'s query [1, Hq, 1, D] for the attention input `hidden` [1, 1, hidden], rotated by `rope`
        (the position embeddings the previous layer got; Gemma 3: those of `nxt`'s layer type)."""
        if self.rope_types is not None:
            rope = self.rope.get(self.rope_types[nxt])
        if rope is None:
            return None
        module = self.attn_modules[nxt]
        return apply_rotary(module, query_before_rotary(self.model_type, module, hidden, self.head_dim), *rope)

    # -- recall diagnostic -----------------------------------------------------------------------------------
    def _measure_recall(self, layer: int, q: torch.Tensor, chosen: torch.Tensor, n: int, scaling: float,
                        softcap: float | None, table: PageTable, tiers) -> None:
        """Dense attention over every page in the layer's window, to find the share of attention mass the chosen
        pages hold. `tiers`: (name, tier) pairs to read pages from."""
        P = self.page_size
        first, off = window_start(self.windows[layer], n, P)
        last = -(-n // P) - 1
        valid = n - last * P
        count = last + 1 - first
        dims = (self.kv_heads, P, self.head_dim)
        k = torch.empty((count, *dims), dtype=self.summaries.dtype)
        v = torch.empty_like(k)
        for name, tier in tiers:
            slots = table.slot[name][layer, first: last + 1]
            have = (slots >= 0).nonzero().flatten()
            if have.numel() and tier is not None:
                kk = torch.empty((have.numel(), *dims), dtype=k.dtype)
                vv = torch.empty_like(kk)
                tier.read(slots[have].tolist(), kk, vv)
                k[have], v[have] = kk, vv
        k = k.to(self.device)
        s = torch.matmul(q.float()[None], k.float().transpose(-1, -2)) * scaling  # [pages, H, M, P]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s[count - 1, :, :, valid:] = float("-inf")
        s[0, :, :, :off] = float("-inf")  # before the sliding window's start
        p = torch.softmax(s.permute(1, 2, 0, 3).reshape(s.shape[1], s.shape[2], -1), dim=-1)
        mass = p.view(s.shape[1], s.shape[2], count, P).sum(-1).mean(dim=(0, 1))  # [pages]
        covered = float(mass[(chosen - first).to(mass.device)].sum() + mass[count - 1])
        self.recall_sum[layer] += covered
        self.recall_n[layer] += 1

    def recall(self) -> dict | None:
        if not any(self.recall_n):
            return None
        per_layer = [s / n if n else None for s, n in zip(self.recall_sum, self.recall_n)]
        seen = [r for r in per_layer if r is not None]
        return {"per_layer": per_layer, "mean": sum(seen) / len(seen)}
