"""How much attention mass each selection policy covers at a token budget, against an oracle that ranks blocks by
their true attention mass: per head mode, block size and budget, on SmolLM2 with natural text (CPU, offline).

    python benchmarks/selection_recall.py --context 2048,4096 --steps 8 --out selectors.json
    python benchmarks/selection_recall.py --texts passkey --out selectors-passkey.json

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
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

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
            nxt = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            for _ in range(steps):
                nxt = model(input_ids=nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
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


def evaluate(keys, queries, warmup, variants: list[str], blocks: list[int], budgets: list[float], scaling: float,
             sink: int, recent: int, acc: dict, outliers: dict) -> None:
    """Adds per-layer recall and page shares of every (variant, mode, block, budget) for every step to `acc`."""
    L, H, T, D = keys.shape
    steps, _, Hq, _ = queries.shape
    G = Hq // H
    prompt = T - steps
    policies = {spec: make_variant(spec) for spec in variants}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", default="2048,4096", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--steps", type=int, default=8, help="decode steps evaluated per context and text")
    ap.add_argument("--warm", type=int, default=32, help="prompt queries a probe starts from")
    ap.add_argument("--variants", default="minmax,channels,landmark,probe", help="comma-separated variant specs")
    ap.add_argument("--blocks", default="16,32,64")
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    ap.add_argument("--texts", default=",".join(TEXTS),
                    help="files of benchmarks/data; `passkey`: a pass key hidden mid-way in repeated filler "
                         "(a prompt of about the context's length)")
    ap.add_argument("--offset", type=int, default=0, help="tokens of each text skipped before the prompt")
    ap.add_argument("--detail", default="kv,32,0.1", help="mode,block,budget of the per-layer and dense tables")
    ap.add_argument("--out", help="also write the results as JSON")
    a = ap.parse_args()
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
        for name, text in texts.items():
            if text is None:
                ids = torch.tensor([passkey_ids(tok, context, 0.5, seed=context)[0]])
            else:
                ids = tok(text, return_tensors="pt").input_ids[:, a.offset:a.offset + context]
                if ids.shape[1] < context:
                    raise ValueError(f"context: {name} holds {ids.shape[1]} tokens, fewer than {context}")
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
        print(f"\noutlier share: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["outlier_share"].items()))


if __name__ == "__main__":
    main()
