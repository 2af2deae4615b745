"""Accuracy and traffic of sparse attention on SmolLM2 (CPU): passkey retrieval, teacher-forced NLL and top-1
agreement against exact attention, and per prefetch policy: hit rate, attention-mass recall and host->device bytes
per decoded token as a fraction of the KV.

    python benchmarks/sparse_accuracy.py --out sparse.json

The KV is spread over device and host: the device budget holds `--device-fraction` of the KV.
Natural text comes from /usr/share/common-licenses (long English prose) when present, else examples/long_context.txt.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from passkey import passkey_ids  # noqa: E402

from offload import offload  # noqa: E402
from offload.cache import CACHE_KWARG  # noqa: E402
from offload.models import load_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def natural_text() -> str:
    files = sorted(glob.glob("/usr/share/common-licenses/*"))
    parts = [open(f, errors="ignore").read() for f in files if os.path.isfile(f) and os.path.getsize(f) > 5000]
    if not parts:
        parts = [open(os.path.join(ROOT, "examples", "long_context.txt")).read()] * 4
    return "\n\n".join(parts)


def kv_bytes(model, tokens: int) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * tokens * 2 * c.num_key_value_heads * head_dim * 4


def budgets(model, tokens: int, device_fraction: float) -> dict:
    kv = kv_bytes(model, tokens)
    c = model.config
    page = 2 * c.num_key_value_heads * 64 * (getattr(c, "head_dim", None) or 64) * 4
    least = (c.num_hidden_layers + 4) * page  # one page per layer plus four for streaming (offload.budgets)
    return {"device_budget": max(least, int(device_fraction * kv)), "host_budget": int(1.5 * kv)}


@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, cont: torch.Tensor, cache) -> torch.Tensor:
    """Log-probabilities [len(cont), vocab] for each continuation token given everything before it."""
    out = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
    logps = [torch.log_softmax(out.logits[0, -1].float(), -1)]
    for t in cont[:-1]:
        out = model(input_ids=t.view(1, 1), **{CACHE_KWARG: cache}, use_cache=True)
        logps.append(torch.log_softmax(out.logits[0, -1].float(), -1))
    return torch.stack(logps)


def run_sweep(model, tok, text_ids: list[int], contexts: list[int], budgets_: list[float], policies: list[str],
              cont_len: int, device_fraction: float) -> list[dict]:
    from transformers import DynamicCache

    rows = []
    for ctx in contexts:
        ids = torch.tensor([text_ids[:ctx]])
        cont = torch.tensor(text_ids[ctx:ctx + cont_len])
        ref = teacher_forced(model, ids, cont, DynamicCache(config=model.config))
        ref_nll = float(-ref.gather(1, cont[:, None]).mean())
        kv = kv_bytes(model, ctx + cont_len)
        for tb in budgets_:
            for pf in policies:
                t0 = time.time()
                with offload(model, attention="sparse", token_budget=tb, prefetch=pf, measure_recall=True,
                             **budgets(model, ctx + cont_len, device_fraction)) as rt:
                    cache = rt.cache()
                    lp = teacher_forced(model, ids[:, :-1], torch.cat([ids[0, -1:], cont]), cache)[1:]
                    s = rt.stats()
                nll = float(-lp.gather(1, cont[:, None]).mean())
                agree = float((lp.argmax(-1) == ref.argmax(-1)).float().mean())
                p = s["prefetch"]
                decode = s["tokens"]["decode"]
                row = {
                    "context": ctx, "token_budget": tb, "prefetch": pf, "nll": nll, "nll_exact": ref_nll,
                    "top1_agreement": agree, "attended_fraction": s["attended_fraction"],
                    "recall": s["recall"]["mean"] if s["recall"] else None,
                    # The share of the pages attention loaded that arrived by prefetch.
                    "prefetch_hit_rate": p["hits"] / max(1, p["hits"] + s["loads"]["needed"]),
                    "h2d_bytes_per_token_over_kv": s["bytes_moved"]["host->device"] / max(1, decode) / kv,
                    "decode_tokens": decode, "seconds": time.time() - t0,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def run_passkey(model, tok, contexts: list[int], depths: list[float], token_budget: float,
                device_fraction: float) -> list[dict]:
    rows = []
    for ctx in contexts:
        for depth in depths:
            ids, key = passkey_ids(tok, ctx, depth, seed=int(ctx + 100 * depth))
            x = torch.tensor([ids])
            with torch.no_grad():
                exact = tok.decode(model.generate(x, max_new_tokens=8, do_sample=False)[0, len(ids):])
                with offload(model, attention="sparse", token_budget=token_budget,
                             **budgets(model, len(ids) + 8, device_fraction)):
                    sparse = tok.decode(model.generate(x, max_new_tokens=8, do_sample=False)[0, len(ids):])
            row = {"context": len(ids), "depth": depth, "key": key, "exact_found": key in exact,
                   "sparse_found": key in sparse, "token_budget": token_budget}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--passkey-contexts", default="2048,4096,8000")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    ap.add_argument("--policies", default="none,temporal,speculative")
    ap.add_argument("--continuation", type=int, default=32)
    ap.add_argument("--device-fraction", type=float, default=0.1)
    ap.add_argument("--out", default="sparse_accuracy.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model()
    text_ids = tok(natural_text())["input_ids"]
    sweep = run_sweep(model, tok, text_ids, [int(c) for c in a.contexts.split(",")],
                      [float(b) for b in a.budgets.split(",")], a.policies.split(","), a.continuation,
                      a.device_fraction)
    pk = run_passkey(model, tok, [int(c) for c in a.passkey_contexts.split(",")],
                     [float(d) for d in a.depths.split(",")], 0.1, a.device_fraction)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "command": " ".join(sys.argv), "sweep": sweep, "passkey": pk}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print("\ncontext budget prefetch  nll(exact)     top1   recall  hit   h2d/token/KV")
    for r in sweep:
        print(f"{r['context']:7d} {r['token_budget']:5.2f} {r['prefetch']:11s} {r['nll']:.3f}({r['nll_exact']:.3f}) "
              f"{r['top1_agreement']:.3f} {r['recall']:.3f} {r['prefetch_hit_rate']:.3f} "
              f"{r['h2d_bytes_per_token_over_kv']:.4f}")
    print("\npasskey: context depth exact sparse@10%")
    for r in pk:
        print(f"{r['context']:7d} {r['depth']:.1f} {r['exact_found']} {r['sparse_found']}")


if __name__ == "__main__":
    main()
