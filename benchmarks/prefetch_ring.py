"""Prefetch policies where they act: sparse decode through the load ring, with most pages on disk. Teacher-forced
continuation of prose (32 tokens) on SmolLM2 at a 10% token budget, the device holding 10% of the KV, host RAM 20%,
the rest on disk; per policy: pages loaded on a prediction, the share of loaded pages that prefetch brought (hit
rate), and host->device and disk bytes per decoded token over the KV's bytes.

    python benchmarks/prefetch_ring.py --context 2048 --out prefetch.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ruler  # noqa: E402
from sparse_accuracy import kv_bytes, teacher_forced  # noqa: E402

from offload import offload  # noqa: E402
from offload.models import load_model  # noqa: E402

POLICIES = {
    "temporal": dict(prefetch="temporal"),
    "speculative": dict(prefetch="speculative"),
    "history": dict(prefetch="history", history=0.5),
    "temporal+history": dict(prefetch="temporal", history=0.5),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--continuation", type=int, default=32)
    ap.add_argument("--out", default="prefetch_ring.json")
    a = ap.parse_args()
    model, tok = load_model()
    text = ruler.natural_ids(tok, a.context + a.continuation, seed=a.context)
    ids, cont = torch.tensor([text[:a.context]]), torch.tensor(text[a.context:])
    kv = kv_bytes(model, a.context + a.continuation)
    rows = []
    for name, options in POLICIES.items():
        disk = tempfile.mkdtemp(prefix="offload-prefetch-")
        t0 = time.time()
        try:
            with offload(model, attention="sparse", token_budget=0.1, device_budget=int(0.1 * kv),
                         host_budget=int(0.2 * kv), disk_dir=disk, **options) as rt:
                teacher_forced(model, ids[:, :-1], torch.cat([ids[0, -1:], cont]), rt.cache())
                s = rt.stats()
        finally:
            shutil.rmtree(disk, ignore_errors=True)
        p, decode, moved = s["prefetch"], max(1, s["tokens"]["decode"]), s["bytes_moved"]
        row = {"policy": name, "issued": p["issued"], "hits": p["hits"], "needed": s["loads"]["needed"],
               "hit_rate": p["hits"] / max(1, p["hits"] + s["loads"]["needed"]),
               "h2d_bytes_per_token_over_kv": moved.get("host->device", 0) / decode / kv,
               "disk_bytes_per_token_over_kv": sum(v for k, v in moved.items() if k.startswith("disk->")) / decode / kv,
               "seconds": time.time() - t0}
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(a.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
