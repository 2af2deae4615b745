"""Sparse attention's part of the runtime: page summaries, selection within the token budget, the speculated
query of the next layer (InfiniGen-style prefetch), and the recall diagnostic. Mixed into `Runtime`."""

from __future__ import annotations

import torch

from offload import attention_math as am


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
        within the token budget (the tail page's tokens count against it)."""
        P = self.page_size
        n = last * P + valid
        budget = self.config.token_budget_for(n)
        k_pages = max(0, (budget - valid) // P)
        if k_pages >= last:
            return torch.arange(last)
        forced = torch.zeros(last, dtype=torch.bool)
        forced[: -(-self.config.sink_tokens // P)] = True
        recent = max(0, self.config.recent_tokens - valid)
        if recent:
            forced[max(0, last - -(-recent // P)):] = True
        free = k_pages - int(forced.sum())
        self.mass = None
        if free > 0:
            scores = self.selector.score(q, self.summaries[layer, :last], scaling)
            ranked = scores.clone()
            ranked[forced.to(scores.device)] = float("-inf")
            top = torch.topk(ranked, free).indices.cpu()
            forced[top] = True
            chosen = forced.nonzero().flatten()
            # The predicted share of attention of each chosen page feeds the score eviction policy.
            self.mass = scores.cpu()[chosen]
            return chosen
        return forced.nonzero().flatten()

    def _install_speculation(self) -> None:
        """Captures each attention module's input so that layer L can guess layer L+1's query (InfiniGen)."""
        attn = [layer.self_attn for layer in self.model.model.layers]
        self.attn_modules = attn

        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is not None and hidden.shape[1] == 1:
                self.hidden[module.layer_idx] = (hidden, kwargs.get("position_embeddings"))

        for m in attn:
            self.hooks.append(m.register_forward_pre_hook(capture, with_kwargs=True))

    def _speculate(self, layer: int, scaling: float) -> None:
        """Predicts the pages of layer+1 from layer's input and layer+1's query weights."""
        nxt = layer + 1
        captured = self.hidden.pop(layer, None)
        if nxt >= self.layers or captured is None or self.table.tokens[nxt] == 0:
            return
        hidden, (cos, sin) = captured
        module = self.attn_modules[nxt]
        q = module.q_proj(hidden).view(1, 1, -1, self.head_dim).transpose(1, 2)  # [1, Hq, 1, D]
        from transformers.models.llama.modeling_llama import rotate_half

        q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        n = self.table.tokens[nxt] + 1  # the token it is about to append
        last = -(-n // self.page_size) - 1
        valid = n - last * self.page_size
        pages = self._choose(nxt, am.group_queries(q, self.kv_heads), last, valid, scaling)
        self.pf_context.predicted_pages[nxt] = pages

    def _measure_recall(self, layer: int, q: torch.Tensor, chosen: torch.Tensor, last: int, valid: int,
                        scaling: float) -> None:
        """Dense attention over every page, to find the share of attention mass the chosen pages hold."""
        k = torch.empty((last + 1, *self.shape.dims), dtype=self.dtype)
        v = torch.empty_like(k)
        for name, tier in (("device", self.device_tier), ("host", self.host_tier), ("disk", self.disk_tier)):
            slots = self.table.slot[name][layer, : last + 1]
            have = (slots >= 0).nonzero().flatten()
            if have.numel() and tier is not None:
                kk = torch.empty((have.numel(), *self.shape.dims), dtype=self.dtype)
                vv = torch.empty_like(kk)
                tier.read(slots[have].tolist(), kk, vv)
                k[have], v[have] = kk, vv
        k = k.to(self.device)
        s = torch.matmul(q.float()[None], k.float().transpose(-1, -2)) * scaling  # [pages, H, M, P]
        s[last, :, :, valid:] = float("-inf")
        p = torch.softmax(s.permute(1, 2, 0, 3).reshape(s.shape[1], s.shape[2], -1), dim=-1)
        mass = p.view(s.shape[1], s.shape[2], last + 1, self.page_size).sum(-1).mean(dim=(0, 1))  # [pages]
        covered = float(mass[chosen.to(mass.device)].sum() + mass[last])
        self.recall_sum[layer] += covered
        self.recall_n[layer] += 1

    def _select(self, layer: int, q: torch.Tensor, last: int, valid: int, scaling: float) -> torch.Tensor:
        """Full pages (ids < last) this step attends to."""
        if not self.sparse:
            return torch.arange(last)
        chosen = self._choose(layer, q, last, valid, scaling)
        self.pf_context.last_selected[layer] = chosen
        if self.config.measure_recall:
            self._measure_recall(layer, q, chosen, last, valid, scaling)
        return chosen

    def _recall(self) -> dict | None:
        if not any(self.recall_n):
            return None
        per_layer = [s / n if n else None for s, n in zip(self.recall_sum, self.recall_n)]
        seen = [r for r in per_layer if r is not None]
        return {"per_layer": per_layer, "mean": sum(seen) / len(seen)}
