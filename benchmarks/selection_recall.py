"""How much attention mass each selection policy covers at a token budget, against an oracle that ranks blocks by
their true attention mass: per head mode, block size and budget, on SmolLM2 with natural text (CPU, offline).

    python benchmarks/selection_recall.py --context 2048,4096 --steps 8 --out selectors.json
    python benchmarks/selection_recall.py --texts passkey --out selectors-passkey.json
    python benchmarks/selection_recall.py --variants minmax --blocks 16 --allocation uniform,cover,cover:each=1,greedy

For each context and text it runs the model with its ordinary DynamicCache, captures each layer's decode queries
(and the queries of the prompt's last `--warm` tokens, the history a query probe starts from), then evaluates
every variant offline on the cached keys. A step with t visible tokens attends T = round(budget * t) tokens: the
tail (the tokens after the last full page) always, the first ceil(sink / B) blocks and the blocks of the recent
window (sink 16 and recent 64 tokens, the runtime's defaults), and each head's top-scored other blocks up to
(T - tail) // B blocks in all; blocks a policy's `keep` flags come first among those (in shared mode, flagged for
any KV head). Head modes:

- shared: one set of blocks per layer, scored by the bound's softmax over blocks summed over KV heads and rows;
- kv: each KV head chooses from its query heads' summed scores;
- query: each query head chooses alone.

Recall is the true attention mass (dense softmax over every visible key) of the tail and the chosen blocks, per
query head, averaged over heads, steps and texts; per layer, then over layers with the first 0..3 layers dense
(over the sparse layers only, and over all layers with the dense ones counted as 1.0). `pages` is the union of the
pages any head's blocks touch (tail included) as a share of the visible pages: what the step reads.

`--allocation` instead splits the token budget unevenly between the sparse layers (the layers after the first
`--dense`), at the same total: each step, the uniform count of blocks per layer U = (round(b * t) - tail) // B
(never fewer than the forced blocks nor more than all), times the sparse layers, is shared out between them,
each layer's count kept within [lo * U, hi * U] (default 0.5 and 3) and at least its forced blocks; then each
chooser of a layer (`--mode`) takes its best-scored blocks up to that count. b is the budget itself
(accounting "sparse": the dense layers left out) or what a budget over all layers leaves after the dense layers'
full attention, (L * budget - dense) / (L - dense) (accounting "all"). Rules, from each chooser's predicted
shares (its softmax over blocks of the bounds, summed over its query heads and normalised):

- uniform: U everywhere (the baseline; the first rule listed is the one the deltas are against);
- cover (`share`, default 0.8): counts proportional to the blocks a layer needs (forced ones first, then the best
  scored, averaged over choosers) to reach `share` of the predicted mass;
- entropy: proportional to exp(entropy) of the predicted shares (the effective number of blocks);
- greedy: the largest marginal predicted shares across layers (equal marginal share in every layer);
- pyramid (`ratio`, default 3): linear in depth, the first sparse layer `ratio` times the last (PyramidKV);
- oracle: greedy on the true recall of the blocks in the selection's order, each step (a ceiling, not a rule);
- profile: a fixed per-layer profile, the oracle's mean shares in an earlier run (`--profile`, e.g. on text
  further in: `--offset 8192`).

A rule is estimated at the first decode step and its weights kept for the sequence, or every step with `each=1`:
`cover:share=0.9:each=1`, `oracle:lo=0:hi=100`. The report gives recall over all layers (the dense ones 1.0),
over the sparse ones, the share of visible tokens attended, and the per-layer shares and recall.

On SmolLM2 (minmax, kv, 16-token blocks, 2 dense layers, 32 steps; results/allocation-cpu.json and
allocation-passkey-cpu.json, the profile from allocation-calibration-cpu.json at --offset 8192), over contexts of
2K, 4K and 8K and budgets of 5% to 20%, the recall over all layers gains on prose 0.009 to 0.012 on average with
greedy (0.003 to 0.023), 0.012 to 0.014 with the profile (0.006 to 0.027), 0.006 to 0.007 with cover, against 0.017 to
0.022 for the oracle; on the pass key prompt the oracle gains 0.006, greedy 0.002, and cover and entropy lose up to
0.04 at the smallest budgets (they take blocks from layers the key needs). Estimated every step instead of once,
greedy gains about 0.002 more on prose. (Averages leave out 2K at 10% over all layers, where the uniform budget is
below the forced blocks and no rule has anything to move.)

A variant is a registered selection policy, optionally with class constants overridden: `channels:share=0.125`,
`probe:decay=0.8:weight=0.3`. Its label is the spec itself. The policies' constants were chosen so, on text
further in (`--offset 8192 --budgets 0.1,0.2`), away from the prompts reported by default.
"""

from __future__ import annotations

import os
import sys

# This file's name is also the standard library's `selectors` (which subprocess imports): run as a script, the
# repository root takes its folder's place on the import path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from offload.cache import CACHE_KWARG  # noqa: E402
from offload.models import load_model  # noqa: E402
from offload.report import markdown_table  # noqa: E402
from policies import SELECTION  # noqa: E402

sys.path.append(os.path.join(ROOT, "benchmarks"))
from passkey import passkey_ids  # noqa: E402

TEXTS = ("alice.txt", "pride_and_prejudice.txt")
MODES = ("shared", "kv", "query")
PAGE = 64


def capture(model, ids: torch.Tensor, steps: int, warm: int):
    """Runs a prefill of `ids` and `steps` greedy decode steps. Returns keys [L, H, T, D] (T = prompt + steps),
    decode queries [steps, L, Hq, D] and the prompt's last `warm` queries [warm, L, Hq, D]."""
    from transformers import AttentionInterface, DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    decode: dict[int, list[torch.Tensor]] = {}
    prompt: dict[int, torch.Tensor] = {}

    def record(module, q, k, v, mask, **kw):
        if q.shape[2] == 1:
            decode.setdefault(module.layer_idx, []).append(q[0, :, 0].detach().clone())
        else:
            prompt[module.layer_idx] = q[0, :, q.shape[2] - warm:].detach().transpose(0, 1).clone()
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("selectors-capture", record)
    before = model.config._attn_implementation
    model.set_attn_implementation("selectors-capture")
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            nxt = model(input_ids=ids, **{CACHE_KWARG: cache}, logits_to_keep=1).logits[:, -1:].argmax(-1)
            for _ in range(steps):
                nxt = model(input_ids=nxt, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
    finally:
        model.set_attn_implementation(before)
    layers = len(decode)
    keys = torch.stack([cache.layers[i].keys[0] for i in range(layers)]).float()
    queries = torch.stack([torch.stack(decode[i]) for i in range(layers)], dim=1).float()
    warmup = torch.stack([prompt[i] for i in range(layers)], dim=1).float()
    return keys, queries, warmup


def make_variant(spec: str):
    """A selection policy from `name[:attr=value...]`, its class constants overridden on the instance."""
    name, *sets = spec.split(":")
    policy = SELECTION.create(name)
    for item in sets:
        attr, value = item.split("=")
        if not hasattr(policy, attr):
            raise ValueError(f"variant: {name} has no constant {attr!r}")
        setattr(policy, attr, type(getattr(policy, attr))(value))
    return policy


def choose(score: torch.Tensor, forced: torch.Tensor, keep: torch.Tensor | None, free: int) -> torch.Tensor:
    """score [L, h, g, nb] (h, g: 1 or the heads and rows that choose apart), forced bool [nb], keep bool [L, h, 1,
    nb] or None -> chosen bool [L, h, g, nb]: the forced blocks, then kept blocks, then the best scored."""
    chosen = forced.expand(score.shape).clone()
    if free <= 0:
        return chosen
    ranked = score.masked_fill(forced, float("-inf"))
    if keep is not None:
        ranked = ranked + (keep & ~forced).float() * 1e4
    chosen.scatter_(-1, ranked.topk(free, dim=-1).indices, True)
    return chosen


def group(score: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-head scores [L, H, G, nb] -> the scores each choosing unit sees under `mode`."""
    if mode == "shared":
        return score.sum(dim=(1, 2), keepdim=True)
    if mode == "kv":
        return score.sum(dim=2, keepdim=True)
    return score


def _steps(keys, queries, warmup, policies: dict, blocks: list[int], scaling: float, sink: int, recent: int):
    """Per decode step and block size: (t tokens, the tail page `last` and its `valid` tokens, B, full-page blocks
    nb, the true attention mass per block [L, H, G, nb] and of the tail [L, H, G], the forced blocks (sinks and the
    recent window, bool [nb]), each policy's probe queries [L*H, G, D] and the block summaries per (policy, B))."""
    L, H, T, D = keys.shape
    steps, _, Hq, _ = queries.shape
    G = Hq // H
    prompt = T - steps
    for policy in policies.values():
        policy.reset()
        for q in warmup:  # [L, Hq, D]: the prompt's last queries, oldest first
            for layer in range(L):
                policy.query(layer, q[layer].view(H, G, D))
    most = (T - 1) // PAGE * PAGE  # tokens in full pages at the last step
    flat = keys.reshape(L * H, T, D)
    summaries = {(spec, B): policy.summarize(flat[:, :most].reshape(L * H, most // B, B, D).transpose(0, 1))
                 for spec, policy in policies.items() for B in blocks}
    for step in range(steps):
        t = prompt + step + 1
        last = (t - 1) // PAGE
        valid = t - last * PAGE
        q = queries[step].view(L, H, G, D)
        p = torch.softmax(torch.einsum("lhgd,lhtd->lhgt", q, keys[:, :, :t]) * scaling, dim=-1)
        probes = {spec: torch.stack([policy.query(layer, q[layer]) for layer in range(L)]).view(L * H, G, D)
                  for spec, policy in policies.items()}
        for B in blocks:
            nb = last * PAGE // B
            mass = p[..., :nb * B].reshape(L, H, G, nb, B).sum(-1)
            tail = p[..., nb * B:].sum(-1)  # [L, H, G]
            forced = torch.zeros(nb, dtype=torch.bool)
            forced[: -(-sink // B)] = True
            if recent > valid:
                forced[max(0, nb - -(-(recent - valid) // B)):] = True
            yield t, last, valid, B, nb, mass, tail, forced, probes, summaries


def evaluate(keys, queries, warmup, variants: list[str], blocks: list[int], budgets: list[float], scaling: float,
             sink: int, recent: int, acc: dict, outliers: dict) -> None:
    """Adds per-layer recall and page shares of every (variant, mode, block, budget) for every step to `acc`."""
    L, H, T, D = keys.shape
    G = queries.shape[2] // H
    policies = {spec: make_variant(spec) for spec in variants}
    for t, last, valid, B, nb, mass, tail, forced, probes, summaries in _steps(
            keys, queries, warmup, policies, blocks, scaling, sink, recent):
        scores = {"oracle": (mass, None)}
        for spec, policy in policies.items():
            s = summaries[spec, B][:nb]
            bound = policy.bound(probes[spec], s, scaling)  # [nb, L*H, G]
            score = torch.softmax(bound, dim=0).permute(1, 2, 0).reshape(L, H, G, nb)
            keep = policy.keep(s)
            if keep is not None:
                keep = keep.t().reshape(L, H, 1, nb)
                outliers.setdefault(f"{spec} B={B}", []).append(float(keep.float().mean()))
            scores[spec] = (score, keep)
        for budget in budgets:
            k_blocks = (int(round(budget * t)) - valid) // B
            free = k_blocks - int(forced.sum())
            for name, (score, keep) in scores.items():
                for mode in MODES:
                    if k_blocks >= nb:
                        recall, pages = torch.ones(L), torch.ones(L)
                    else:
                        kept = None if keep is None else (keep.any(1, keepdim=True) if mode == "shared" else keep)
                        chosen = choose(group(score, mode), forced, kept, free).expand(L, H, G, nb)
                        recall = ((mass * chosen).sum(-1) + tail).mean(dim=(1, 2))
                        touched = chosen.any(1).any(1).view(L, last, PAGE // B).any(-1).sum(-1)
                        pages = (touched + 1) / (last + 1)
                    cell = acc.setdefault((name, mode, B, budget), {"recall": [], "pages": []})
                    cell["recall"].append(recall)
                    cell["pages"].append(pages)


ALLOCATIONS = {"uniform": {}, "cover": {"share": 0.8}, "entropy": {}, "greedy": {}, "pyramid": {"ratio": 3.0},
               "oracle": {}, "profile": {}}


def parse_allocation(spec: str) -> dict:
    """A rule from `name[:key=value...]`: `each=1` re-estimates it every step (default: at the first decode step,
    then kept), `lo`/`hi` bound a layer's blocks to that share of the uniform count (default 0.5 and 3)."""
    name, *sets = spec.split(":")
    if name not in ALLOCATIONS:
        raise ValueError(f"allocation: {name!r} is none of {', '.join(ALLOCATIONS)}")
    rule = {"name": name, "each": 0.0, "lo": 0.5, "hi": 3.0, **ALLOCATIONS[name]}
    for item in sets:
        key, value = item.split("=")
        if key not in rule or key == "name":
            raise ValueError(f"allocation: {name} has no option {key!r}")
        rule[key] = float(value)
    return rule


def apportion(weight: torch.Tensor, pool: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Integer counts within [lo, hi] summing to `pool` (when the bounds allow it), proportional to `weight` where
    no bound binds: clamp(x * weight, lo, hi) with x found by bisection, then largest remainders."""
    w = weight.double().clamp_min(1e-12)
    lo, hi = lo.double(), hi.double()
    if pool <= lo.sum():
        return lo.long()
    if pool >= hi.sum():
        return hi.long()
    a, b = 0.0, float((hi / w).max()) + 1.0
    for _ in range(100):
        x = (a + b) / 2
        a, b = (x, b) if float(torch.clamp(x * w, lo, hi).sum()) < pool else (a, x)
    k = torch.clamp(b * w, lo, hi)
    base = k.floor()
    short = int(pool - base.sum())
    if short > 0:
        room = (k - base).masked_fill(base >= hi, -1.0)
        base[room.topk(short).indices] += 1
    elif short < 0:
        over = (k - base).masked_fill(base <= lo, 2.0)
        base[over.topk(-short, largest=False).indices] -= 1
    return base.long()


def greedy(curve: torch.Tensor, pool: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """curve [n, M + 1] (a layer's gain with k = 0..M extra blocks) -> extra blocks per layer within [lo, hi] and
    `pool` in all, taking the largest marginal gains across layers (the best split when the curves are concave)."""
    gain = curve.diff(dim=-1)
    j = torch.arange(gain.shape[-1])
    gain = gain.masked_fill(j < lo[:, None], float("inf")).masked_fill(j >= hi[:, None], float("-inf"))
    take = min(max(pool, int(lo.sum())), int(hi.sum()))
    picked = torch.zeros(gain.numel(), dtype=torch.long)
    picked[gain.flatten().topk(take).indices] = 1
    return picked.view(gain.shape).sum(-1)


def profile_weights(profile: dict | None, spec: str, B: int, budget: float, accounting: str,
                    dense: int) -> torch.Tensor:
    """The sparse layers' shares under the oracle of an earlier --allocation run (`--profile`), averaged over its
    contexts, for the same variant, block, budget and accounting: a fixed per-model profile."""
    if profile is None:
        raise ValueError("allocation: profile needs --profile, the JSON of an earlier run with the oracle rule")
    try:
        shares = [by_variant[spec][str(B)][str(budget)][accounting]["oracle"]["attended_per_layer"][dense:]
                  for by_variant in profile["contexts"].values()]
    except KeyError as e:
        raise ValueError(f"profile: no oracle entry for {spec}, {B}, {budget}, {accounting}") from e
    return torch.tensor(shares, dtype=torch.float64).mean(0)


def curves(mass: torch.Tensor, tail: torch.Tensor, score: torch.Tensor, forced: torch.Tensor, mode: str):
    """For each layer, as the choosers add their best-scored other blocks one by one (k = 0..M): the true recall
    [L, M + 1] (averaged over query heads), and each chooser's predicted share of its own normalised scores
    [L, C, M + 1], both counting the forced blocks (and the tail, for the true recall) from k = 0. Also the
    choosers' normalised scores [L, C, nb]."""
    L, H, G, nb = mass.shape
    s = group(score, mode)
    M = nb - int(forced.sum())
    order = s.masked_fill(forced, float("-inf")).argsort(dim=-1, descending=True)[..., :M]
    base = mass[..., forced].sum(-1) + tail
    got = mass.gather(-1, order.expand(L, H, G, M))
    true = torch.cat([base[..., None], base[..., None] + got.cumsum(-1)], dim=-1).mean(dim=(1, 2))
    share = s / s.sum(-1, keepdim=True)
    pbase = share[..., forced].sum(-1)
    pred = torch.cat([pbase[..., None], pbase[..., None] + share.gather(-1, order).cumsum(-1)], dim=-1)
    return true, pred.flatten(1, 2), share.flatten(1, 2)


def evaluate_allocation(keys, queries, warmup, variants: list[str], blocks: list[int], budgets: list[float],
                        scaling: float, sink: int, recent: int, rules: list[str], mode: str, dense: int, text: str,
                        acc: dict, profile: dict | None = None) -> None:
    """Per-layer recall and attended share of every (variant, block, budget, accounting, allocation rule) for
    every step, added to `acc`. The first `dense` layers attend to everything. A rule splits the sparse layers'
    blocks (the uniform count per layer times their number; a layer never gets fewer than its forced blocks nor
    more than all of them) between them; `accounting` "all" gives the sparse layers what the budget over all
    layers leaves after the dense ones, "sparse" the budget itself."""
    L, H, T, D = keys.shape
    G = queries.shape[2] // H
    sparse = L - dense
    parsed = {spec: parse_allocation(spec) for spec in rules}
    policies = {spec: make_variant(spec) for spec in variants}
    kept: dict = {}  # the weights of the rules estimated once, from the first step
    for t, last, valid, B, nb, mass, tail, forced, probes, summaries in _steps(
            keys, queries, warmup, policies, blocks, scaling, sink, recent):
        nf = int(forced.sum())
        for spec, policy in policies.items():
            s = summaries[spec, B][:nb]
            score = torch.softmax(policy.bound(probes[spec], s, scaling), dim=0).permute(1, 2, 0)
            true, pred, share = curves(mass, tail, score.reshape(L, H, G, nb), forced, mode)
            true, pred, share = true[dense:], pred[dense:], share[dense:]
            for budget in budgets:
                for accounting in ("all", "sparse"):
                    mean = budget if accounting == "sparse" else (L * budget - dense) / sparse
                    if mean <= 0:
                        continue
                    uniform = min(max((int(round(mean * t)) - valid) // B, nf), nb)
                    pool = sparse * uniform
                    lo = torch.full((sparse,), uniform)
                    hi = lo.clone()
                    for spec_rule, rule in parsed.items():
                        lo.fill_(min(max(nf, math.ceil(rule["lo"] * uniform)), uniform))
                        hi.fill_(max(min(nb, math.floor(rule["hi"] * uniform)), uniform))
                        key = (spec, B, budget, accounting, spec_rule)
                        name = rule["name"]
                        if name == "uniform" or uniform >= nb:
                            count = torch.full((sparse,), uniform)
                        elif name == "oracle":
                            count = nf + greedy(true, pool - sparse * nf, lo - nf, hi - nf)
                        elif name == "greedy" and (rule["each"] or key not in kept):
                            count = nf + greedy(pred.mean(1), pool - sparse * nf, lo - nf, hi - nf)
                            kept.setdefault(key, count.double())
                        else:
                            weight = kept.get(key) if not rule["each"] else None
                            if weight is None:
                                if name == "cover":
                                    weight = nf + (pred < rule["share"]).sum(-1).double().mean(-1)
                                elif name == "entropy":
                                    ent = -(share * share.clamp_min(1e-30).log()).sum(-1)
                                    weight = ent.exp().mean(-1)
                                elif name == "pyramid":
                                    weight = torch.linspace(rule["ratio"], 1.0, sparse)
                                elif name == "profile":
                                    weight = profile_weights(profile, spec, B, budget, accounting, dense)
                                else:
                                    weight = kept[key]
                                kept.setdefault(key, weight)
                            count = apportion(weight, pool, lo, hi)
                        extra = (count - nf).clamp(0, true.shape[1] - 1)
                        recall = torch.cat([torch.ones(dense), true.gather(1, extra[:, None])[:, 0]])
                        attended = torch.cat([torch.ones(dense), (valid + B * count.double()) / t])
                        cell = acc.setdefault(key, {})
                        cell.setdefault(text, {"recall": [], "attended": []})
                        cell[text]["recall"].append(recall.float())
                        cell[text]["attended"].append(attended.float())


def summarize_allocation(acc: dict, dense: int) -> dict:
    """{variant: {block: {budget: {accounting: {rule: ...}}}}}: recall over all layers (the dense ones 1.0) and
    over the sparse ones, attended share over all layers and over the sparse ones, per layer, and per text."""
    out: dict = {}
    for (spec, B, budget, accounting, rule), cell in acc.items():
        per_text = {text: (torch.stack(c["recall"]).mean(0), torch.stack(c["attended"]).mean(0))
                    for text, c in cell.items()}
        recall = torch.stack([r for r, _ in per_text.values()]).mean(0)
        attended = torch.stack([a for _, a in per_text.values()]).mean(0)
        entry = {"recall": round(float(recall.mean()), 4), "recall_sparse": round(float(recall[dense:].mean()), 4),
                 "attended": round(float(attended.mean()), 4),
                 "attended_sparse": round(float(attended[dense:].mean()), 4),
                 "recall_per_layer": [round(float(x), 4) for x in recall],
                 "attended_per_layer": [round(float(x), 4) for x in attended],
                 "texts": {text: round(float(r.mean()), 4) for text, (r, _) in per_text.items()}}
        out.setdefault(spec, {}).setdefault(str(B), {}).setdefault(str(budget), {}).setdefault(
            accounting, {})[rule] = entry
    return out


def report_allocation(context: int, summary: dict, rules: list[str], dense: int) -> None:
    for spec, by_block in summary.items():
        for B, by_budget in by_block.items():
            print(f"\n### context {context}, {spec}, {B}-token blocks, first {dense} layers dense: recall over all "
                  "layers (vs uniform), over the sparse layers, share attended over all layers / sparse layers\n")
            rows = []
            for budget, by_acc in by_budget.items():
                for accounting, cells in by_acc.items():
                    base = cells[rules[0]]["recall"]
                    for rule in rules:
                        e = cells[rule]
                        rows.append([f"{float(budget):g}", accounting, rule, f"{e['recall']:.4f}",
                                     f"{e['recall'] - base:+.4f}", f"{e['recall_sparse']:.4f}",
                                     f"{e['attended']:.4f} / {e['attended_sparse']:.4f}"])
            print("\n".join(markdown_table(["budget", "accounting", "rule", "recall", "delta", "sparse",
                                            "attended"], rows)))
            for budget, by_acc in by_budget.items():
                cells = by_acc["sparse"]
                print(f"\n### context {context}, {spec}, {B}, budget {float(budget):g} over the sparse layers: "
                      "share attended per layer (recall)\n")
                L = len(cells[rules[0]]["recall_per_layer"])
                print("\n".join(markdown_table(["layer", *rules], [
                    [str(i), *(f"{cells[r]['attended_per_layer'][i]:.3f} ({cells[r]['recall_per_layer'][i]:.3f})"
                               for r in rules)] for i in range(L)])))


def summarize(acc: dict, layers: int) -> dict:
    out = {}
    for (name, mode, B, budget), cell in acc.items():
        per_layer = torch.stack(cell["recall"]).mean(0)
        entry = {"recall_per_layer": [round(float(x), 4) for x in per_layer]}
        entry["recall"] = round(float(per_layer.mean()), 4)
        entry["pages"] = round(float(torch.stack(cell["pages"]).mean()), 4)
        entry["dense_first"] = {str(d): {"sparse_layers": round(float(per_layer[d:].mean()), 4),
                                         "all_layers": round(float((d + per_layer[d:].sum()) / layers), 4)}
                                for d in range(4)}
        out.setdefault(name, {}).setdefault(mode, {}).setdefault(str(B), {})[str(budget)] = entry
    return out


def prompt_ids(tok, name: str, text: str | None, context: int, offset: int) -> torch.Tensor:
    if text is None:
        return torch.tensor([passkey_ids(tok, context, 0.5, seed=context)[0]])
    ids = tok(text, return_tensors="pt").input_ids[:, offset:offset + context]
    if ids.shape[1] < context:
        raise ValueError(f"context: {name} holds {ids.shape[1]} tokens, fewer than {context}")
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", default="2048,4096", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--steps", type=int, default=8, help="decode steps evaluated per context and text")
    ap.add_argument("--warm", type=int, default=32, help="prompt queries a probe starts from")
    ap.add_argument("--variants", default="minmax,channels,landmark,probe,sketch", help="comma-separated variant specs")
    ap.add_argument("--blocks", default="16,32,64")
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    ap.add_argument("--texts", default=",".join(TEXTS),
                    help="files of benchmarks/data; `passkey`: a pass key hidden mid-way in repeated filler "
                         "(a prompt of about the context's length)")
    ap.add_argument("--offset", type=int, default=0, help="tokens of each text skipped before the prompt")
    ap.add_argument("--detail", default="kv,32,0.1", help="mode,block,budget of the per-layer and dense tables")
    ap.add_argument("--allocation", help="comma-separated rules splitting the token budget between the sparse "
                    "layers (the first `uniform`, the baseline): instead of the comparison of policies, the recall "
                    "of --variants in --mode under each rule (see the docstring)")
    ap.add_argument("--mode", default="kv", choices=MODES, help="head mode of --allocation")
    ap.add_argument("--dense", type=int, default=2, help="first layers attending densely, for --allocation")
    ap.add_argument("--profile", help="JSON of an earlier --allocation run with the oracle rule, for the profile "
                    "rule")
    ap.add_argument("--out", help="also write the results as JSON")
    a = ap.parse_args()
    profile = json.load(open(a.profile)) if a.profile else None
    rules = a.allocation.split(",") if a.allocation else None
    for spec in rules or ():
        if parse_allocation(spec)["name"] == "profile" and not a.profile:
            raise ValueError("allocation: profile needs --profile, the JSON of an earlier run with the oracle rule")
    variants = a.variants.split(",")
    blocks = [int(x) for x in a.blocks.split(",")]
    budgets = [float(x) for x in a.budgets.split(",")]
    for B in blocks:
        if B < 1 or PAGE % B:
            raise ValueError(f"blocks: {B} does not divide the page of {PAGE} tokens")
    model, tok = load_model(progress=False)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    texts = {name: None if name == "passkey" else open(os.path.join(ROOT, "benchmarks", "data", name)).read()
             for name in a.texts.split(",")}
    result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "threads":
              torch.get_num_threads(), "args": vars(a), "contexts": {}}
    t0 = time.time()
    for context in (int(x) for x in a.context.split(",")):
        acc: dict = {}
        outliers: dict = {}
        if rules:
            for name, text in texts.items():
                ids = prompt_ids(tok, name, text, context, a.offset)
                keys, queries, warmup = capture(model, ids, a.steps, a.warm)
                evaluate_allocation(keys, queries, warmup, variants, blocks, budgets, head_dim ** -0.5, 16, 64,
                                    rules, a.mode, a.dense, name, acc, profile)
                print(f"context {context} {name} ({ids.shape[1]} tokens): {time.time() - t0:.0f} s", file=sys.stderr)
            summary = summarize_allocation(acc, a.dense)
            result["contexts"][str(context)] = summary
            report_allocation(context, summary, rules, a.dense)
            continue
        for name, text in texts.items():
            ids = prompt_ids(tok, name, text, context, a.offset)
            keys, queries, warmup = capture(model, ids, a.steps, a.warm)
            evaluate(keys, queries, warmup, variants, blocks, budgets, head_dim ** -0.5, 16, 64, acc, outliers)
            print(f"context {context} {name} ({ids.shape[1]} tokens): {time.time() - t0:.0f} s", file=sys.stderr)
        summary = summarize(acc, c.num_hidden_layers)
        summary["outlier_share"] = {k: round(sum(v) / len(v), 4) for k, v in outliers.items()}
        result["contexts"][str(context)] = summary
        report(context, summary, ["oracle", *variants], blocks, budgets, a.detail)
    result["seconds"] = round(time.time() - t0, 1)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, separators=(",", ":"))


def report(context: int, summary: dict, names: list[str], blocks: list[int], budgets: list[float],
           detail: str) -> None:
    print(f"\n### context {context}: recall (pages touched)\n")
    rows = []
    for mode in MODES:
        for B in blocks:
            for budget in budgets:
                cells = [summary[n][mode][str(B)][str(budget)] for n in names]
                rows.append([mode, str(B), f"{budget:g}",
                             *(f"{e['recall']:.3f} ({e['pages']:.2f})" for e in cells)])
    print("\n".join(markdown_table(["mode", "block", "budget", *names], rows)))
    mode, B, budget = detail.split(",")
    cells = [summary[n][mode][B][str(float(budget))] for n in names]
    print(f"\n### context {context}, {mode} {B} {float(budget):g}: recall with the first layers dense "
          "(sparse layers / all layers)\n")
    print("\n".join(markdown_table(["dense first", *names], [
        [str(d), *(f"{e['dense_first'][str(d)]['sparse_layers']:.3f} / {e['dense_first'][str(d)]['all_layers']:.3f}"
                   for e in cells)] for d in range(4)])))
    print(f"\n### context {context}, {mode} {B} {float(budget):g}: recall per layer\n")
    layers = len(cells[0]["recall_per_layer"])
    print("\n".join(markdown_table(["layer", *names], [
        [str(i), *(f"{e['recall_per_layer'][i]:.3f}" for e in cells)] for i in range(layers)])))
    if summary.get("outlier_share"):
        print("\noutlier share: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["outlier_share"].items()))


if __name__ == "__main__":
    main()
