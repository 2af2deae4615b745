"""Sparse attention's part of the runtime: page summaries, selection within the token budget, the speculated
query of the next layer (InfiniGen-style prefetch), and the recall diagnostic. Mixed into `Runtime`."""

from __future__ import annotations

import torch

from offload import attention_math as am
from offload.models import apply_rotary, decoder_layers, query_before_rotary


class SparseMixin:
    """Methods of `Runtime` that only sparse attention uses (see offload/runtime.py for the state they share)."""

    def _summarize(self, layer: int, pages: list[int], k: torch.Tensor) -> None:
        if pages:
            self.summaries[layer, pages[0]:pages[-1] + 1] = self.selector.summarize(k)

    def _summarize_resident(self, layer: int, page: int) -> None:
        s = int(self.table.slot["device"][layer, page])
        self.summaries[layer, page] = self.selector.summarize(self.device_tier.k[s:s + 1])[0]

    def _choose(self, layer: int, q: torch.Tensor, last: int, valid: int, scaling: float) -> torch.Tensor:
        """Sparse selection among the full pages 0..last-1: sinks, recent window, then the top pages by score,
        within the token budget (the tail page's tokens count against it). On a layer with a sliding window only
        the pages in the window are candidates, the budget is a share of the window, and there are no sinks
        unless the window still reaches back to them."""
        P = self.page_size
        n = last * P + valid
        first, off = self._window_first(layer, n)
        visible = n - first * P - off
        budget = self.config.token_budget_for(visible)
        k_pages = max(0, (budget - valid) // P)
        # The mass of the pages chosen here, or None: never the one of an earlier layer or sequence.
        self.mass = None
        # NOTE: the window's first page holds only P - off visible tokens, so a budget covering the window may
        # count one page fewer than the window has.
        if budget >= visible or k_pages >= last - first:
            return torch.arange(first, last)
        forced = torch.zeros(last, dtype=torch.bool)
        forced[: -(-self.config.sink_tokens // P)] = True
        recent = max(0, self.config.recent_tokens - valid)
        if recent:
            forced[max(0, last - -(-recent // P)):] = True
        forced[:first] = False  # NOTE: released pages live nowhere; they can't be chosen
        free = k_pages - int(forced.sum())
        if free > 0:
            # Scores of the pages in the window only: [last - first].
            scores = self.selector.score(q, self.summaries[layer, first:last], scaling)
            ranked = scores.clone()
            ranked[forced[first:].to(scores.device)] = float("-inf")
            top = torch.topk(ranked, free).indices.cpu() + first
            forced[top] = True
            chosen = forced.nonzero().flatten()
            # The predicted share of attention of each chosen page feeds the score eviction policy.
            self.mass = scores.cpu()[chosen - first]
            return chosen
        return forced.nonzero().flatten()

    def _install_speculation(self) -> None:
        """Captures each attention module's input so that layer L can guess layer L+1's query (InfiniGen). Gemma 3
        rotates local and global layers with different frequencies: there the rotary embedding's output is captured
        per layer type, since layer L+1's may differ from layer L's."""
        attn = [layer.self_attn for layer in decoder_layers(self.model)[: self.layers]]
        self.attn_modules = attn
        self.rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rope_types: list[str] | None = None

        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is not None and hidden.shape[1] == 1:
                self.hidden[module.layer_idx] = (hidden, kwargs.get("position_embeddings"))

        for m in attn:
            self.hooks.append(m.register_forward_pre_hook(capture, with_kwargs=True))
        rotary = getattr(self.model.model, "rotary_emb", None)
        if self.model_type == "gemma3_text" and rotary is not None:
            self.rope_types = list(self.model.config.layer_types)

            def capture_rope(module, args, kwargs, output):
                layer_type = args[2] if len(args) > 2 else kwargs.get("layer_type")
                self.rope[layer_type] = output

            self.hooks.append(rotary.register_forward_hook(capture_rope, with_kwargs=True))

    def _speculate(self, layer: int, scaling: float) -> None:
        """Predicts the pages of layer+1 from layer's input and layer+1's own query projection, q-norm and rotary
        (see `models.query_before_rotary` for each architecture)."""
        nxt = layer + 1
        captured = self.hidden.pop(layer, None)
        if nxt >= self.layers or captured is None or self.table.tokens[nxt] == 0:
            return
        q = self._speculated_query(nxt, *captured)
        if q is None:
            return  # no rotary to apply: no prediction (the layer then loads what it misses on demand)
        n = self.table.tokens[nxt] + 1  # the token it is about to append
        last = -(-n // self.page_size) - 1
        valid = n - last * self.page_size
        pages = self._choose(nxt, am.group_queries(q, self.kv_heads), last, valid, scaling)
        self.pf_context.predicted_pages[nxt] = pages

    def _speculated_query(self, nxt: int, hidden: torch.Tensor,
                          rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
        """Layer `nxt`'s query [1, Hq, 1, D] for the attention input `hidden` [1, 1, hidden], rotated by `rope`
        (the position embeddings the previous layer got; Gemma 3: those of `nxt`'s layer type)."""
        if self.rope_types is not None:
            rope = self.rope.get(self.rope_types[nxt])
        if rope is None:
            return None
        module = self.attn_modules[nxt]
        q = query_before_rotary(self.model_type, module, hidden, self.head_dim)
        return apply_rotary(module, q, *rope)

    def _measure_recall(self, layer: int, q: torch.Tensor, chosen: torch.Tensor, last: int, valid: int,
                        scaling: float, softcap: float | None = None) -> None:
        """Dense attention over every page in the layer's window, to find the share of attention mass the chosen
        pages hold."""
        first, off = self._window_first(layer, last * self.page_size + valid)
        count = last + 1 - first
        k = torch.empty((count, *self.shape.dims), dtype=self.dtype)
        v = torch.empty_like(k)
        for name, tier in (("device", self.device_tier), ("host", self.host_tier), ("disk", self.disk_tier)):
            slots = self.table.slot[name][layer, first: last + 1]
            have = (slots >= 0).nonzero().flatten()
            if have.numel() and tier is not None:
                kk = torch.empty((have.numel(), *self.shape.dims), dtype=self.dtype)
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
        mass = p.view(s.shape[1], s.shape[2], count, self.page_size).sum(-1).mean(dim=(0, 1))  # [pages]
        covered = float(mass[(chosen - first).to(mass.device)].sum() + mass[count - 1])
        self.recall_sum[layer] += covered
        self.recall_n[layer] += 1

    def _select(self, layer: int, q: torch.Tensor, last: int, valid: int, scaling: float,
                softcap: float | None = None) -> torch.Tensor:
        """Full pages (ids < last, in the layer's window) this step attends to, in page order."""
        if not self.sparse:
            return torch.arange(self._window_first(layer, last * self.page_size + valid)[0], last)
        chosen = self._choose(layer, q, last, valid, scaling)
        self.pf_context.last_selected[layer] = chosen
        if self.config.measure_recall:
            self._measure_recall(layer, q, chosen, last, valid, scaling, softcap)
        return chosen
    def _recall(self) -> dict | None:
        if not any(self.recall_n):
            return None
        per_layer = [s / n if n else None for s, n in zip(self.recall_sum, self.recall_n)]
        seen = [r for r in per_layer if r is not None]
        return {"per_layer": per_layer, "mean": sum(seen) / len(seen)}
