"""Sparse mode's block cache on SmolLM2 (CPU): where a step's chosen blocks come from, per device budget and cache
share, on natural text at 10% of the context (the suite's setting, `benchmarks/ruler.py`).

    python benchmarks/block_cache.py --contexts 4096,8192 --out benchmarks/results/block_cache-cpu.json

Per run: teacher-forced continuation of `--continuation` tokens of prose after a `context`-token prompt, the KV
over device and host (`--device-fraction` of it on the device; `block_cache` of that kept as the cache). Reported:
the hit rate (the share of attended blocks already on the device: the device tier's pages or the cache's copies;
the rest are read from host RAM), host->device bytes per decoded token over the KV's bytes, and whether the
log-probabilities equal, bit for bit, those of the first run of the same context (the cache holds copies of the
same bytes, so they must).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ruler import natural_ids, sparse_options  # noqa: E402
from sparse_accuracy import kv_bytes, teacher_forced  # noqa: E402

from offload import offload  # noqa: E402
from offload.models import load_model  # noqa: E402


def parse_settings(text: str) -> list[tuple[float, float]]:
    """'0.1:0,0.3:0.7' -> [(device fraction, block_cache share), ...]."""
    out = []
    for part in text.split(","):
        df, _, share = part.partition(":")
        try:
            out.append((float(df), float(share or 0)))
        except ValueError:
            raise SystemExit(f"settings: expected DEVICE_FRACTION:SHARE pairs separated by commas, got {part!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="4096,8192")
    ap.add_argument("--settings", default="0.1:0,0.3:0,0.3:0.7,0.4:0.75",
                    help="DEVICE_FRACTION:BLOCK_CACHE pairs (default %(default)s)")
    ap.add_argument("--budget", type=float, default=0.1, help="token_budget (default %(default)s)")
    ap.add_argument("--continuation", type=int, default=32, help="teacher-forced tokens (default %(default)s)")
    ap.add_argument("--select-block", type=int, help="tokens per selection block (default: the runtime's)")
    ap.add_argument("--out", help="JSON file for the rows")
    a = ap.parse_args()
    model, tok = load_model()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    result = {"machine": platform.node(), "commit": commit, "date": time.strftime("%Y-%m-%d"),
              "budget": a.budget, "continuation": a.continuation, "select_block": a.select_block, "rows": []}
    chosen = {"select_block": a.select_block} if a.select_block else {}
    for asked in (int(c) for c in a.contexts.split(",")):
        context = min(asked, model.config.max_position_embeddings - a.continuation)  # 8K: the prompt makes room
        text = natural_ids(tok, context + a.continuation, seed=context)
        ids, cont = torch.tensor([text[:context]]), torch.tensor(text[context:])
        kv = kv_bytes(model, context + a.continuation)
        first = None
        for df, share in parse_settings(a.settings):
            opts = sparse_options(model, context + a.continuation, a.budget, {"block_cache": share, **chosen}, df)
            t0 = time.perf_counter()
            with offload(model, **opts) as rt:
                lp = teacher_forced(model, ids[:, :-1], torch.cat([ids[0, -1:], cont]), rt.cache())
                s, plan = rt.stats(), rt.plan
            b = s["blocks"]
            row = {"context": asked, "tokens": context, "device_fraction": df, "block_cache": share,
                   "device_pages": plan.device_cache_pages, "cache_pages": plan.block_cache_pages,
                   "cache_over_kv": s["block_cache_bytes"] / kv,
                   "hit_rate": 1 - b["from_host"] / b["attended"] if b["attended"] else None,
                   "h2d_bytes_per_token_over_kv": s["bytes_moved"]["host->device"] / max(1, s["tokens"]["decode"]) / kv,
                   "same_as_first": None if first is None else bool(torch.equal(lp, first)),
                   "seconds": round(time.perf_counter() - t0, 1)}
            first = lp if first is None else first
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
