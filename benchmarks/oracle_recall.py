"""How much attention mass whole pages can cover at a token budget: the min/max selection against an oracle that
picks the pages holding the most true attention, per page size, on SmolLM2 with natural text (CPU).

    python benchmarks/oracle_recall.py --context 3000 --budget 0.1 --pages 16,64

It runs the model with its ordinary DynamicCache, captures each layer's decode queries, and scores the pages of
the cached keys offline, with the same sink page and recent window as the runtime's defaults.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from offload.models import load_model  # noqa: E402
from policies.selection import minmax_bound  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def capture(model, ids: torch.Tensor, steps: int):
    """(DynamicCache after prefill + steps, {layer: [decode queries]})."""
    from transformers import AttentionInterface, DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    queries: dict[int, list[torch.Tensor]] = {}

    def record(module, q, k, v, mask, **kw):
        if q.shape[2] == 1:
            queries.setdefault(module.layer_idx, []).append(q.detach())
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("oracle-capture", record)
    before = model.config._attn_implementation
    model.set_attn_implementation("oracle-capture")
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            nxt = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            for _ in range(steps):
                nxt = model(input_ids=nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
    finally:
        model.set_attn_implementation(before)
    return cache, queries


def covered(p: torch.Tensor, scores: torch.Tensor, pages: int, page: int, budget: int, sink: int, recent: int) -> float:
    """Attention mass [H, G, T] held by the tail, the forced pages and the top-scored pages within `budget`."""
    valid = p.shape[-1] - pages * page
    mass = p[..., :pages * page].reshape(*p.shape[:2], pages, page).sum(-1)
    chosen = torch.zeros(pages, dtype=torch.bool)
    chosen[: -(-sink // page)] = True
    if recent > valid:
        chosen[max(0, pages - -(-(recent - valid) // page)):] = True
    free = (budget - valid) // page - int(chosen.sum())
    if free > 0:
        ranked = scores.clone()
        ranked[chosen] = float("-inf")
        chosen[torch.topk(ranked, free).indices] = True
    return float((mass[..., chosen].sum(-1) + p[..., pages * page:].sum(-1)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=3000)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--pages", default="16,64")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    model, tok = load_model()
    text = open(os.path.join(ROOT, "examples", "long_context.txt")).read()
    ids = tok(text, return_tensors="pt").input_ids[:, : a.context]
    cache, queries = capture(model, ids, a.steps)
    c = model.config
    kv_heads, head_dim = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    group = c.num_attention_heads // kv_heads
    print(f"context {ids.shape[1]} tokens, budget {a.budget:.0%}, {c.num_hidden_layers} layers, {a.steps} steps")
    for page in (int(x) for x in a.pages.split(",")):
        results = {"oracle": [], "minmax": []}
        for layer in range(c.num_hidden_layers):
            keys = cache.layers[layer].keys[0]  # [H, T, D]
            for step, q in enumerate(queries[layer]):
                t = ids.shape[1] + step + 1
                k = keys[:, :t]
                qg = q[0].reshape(kv_heads, group, head_dim)
                scale = head_dim ** -0.5
                p = torch.softmax(torch.einsum("hgd,htd->hgt", qg, k) * scale, -1)
                pages = t // page
                kp = k[:, : pages * page].reshape(kv_heads, pages, page, head_dim).transpose(0, 1)
                summaries = torch.stack([kp.amin(2), kp.amax(2)], 1)
                mass = p[..., : pages * page].reshape(kv_heads, group, pages, page).sum(-1)
                bound = minmax_bound(qg, summaries) * scale
                budget = int(a.budget * t)
                results["oracle"].append(covered(p, mass.sum((0, 1)), pages, page, budget, 16, 64))
                results["minmax"].append(covered(p, torch.softmax(bound, 0).sum((1, 2)), pages, page, budget, 16, 64))
        print(f"page {page:4d}: oracle {sum(results['oracle']) / len(results['oracle']):.3f}  "
              f"minmax {sum(results['minmax']) / len(results['minmax']):.3f}")


if __name__ == "__main__":
    main()
