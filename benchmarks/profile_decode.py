"""Where a decode step's host time goes: cProfile of offloaded decode steps on a random-weight model shape.

    python benchmarks/profile_decode.py --shape llama3-8b --layers 8 --context 32768 --attention exact
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from offload import offload  # noqa: E402
from offload.cache import CACHE_KWARG  # noqa: E402
from offload.shapes import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--attention", default="exact")
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(a.shape, device, dtype, layers=a.layers)
    c = model.config
    kv = c.num_hidden_layers * (a.context + a.steps) * 2 * c.num_key_value_heads * c.head_dim * dtype.itemsize
    ids = torch.randint(0, c.vocab_size, (1, a.context), device=device)
    with offload(model, attention=a.attention, device_budget=int(a.fraction * kv), host_budget=2 * kv,
                 page_size=a.page_size) as rt, torch.no_grad():
        cache = rt.cache()
        out = model(input_ids=ids, **{CACHE_KWARG: cache}, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)

        def steps(n: int) -> None:
            nonlocal nxt
            for _ in range(n):
                nxt = model(input_ids=nxt, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
            nxt.cpu()

        steps(2)
        t0 = time.perf_counter()
        steps(a.steps)
        dt = (time.perf_counter() - t0) / a.steps
        prof = cProfile.Profile()
        prof.enable()
        steps(a.steps)
        prof.disable()
        s = rt.stats()
    print(f"{1 / dt:.2f} tokens/s, {dt * 1e3:.1f} ms/token; stall {s['stall_seconds']:.3f}s; "
          f"h2d/token {s['bytes_moved']['host->device'] / max(1, s['tokens']['decode']) / 2**20:.1f} MiB")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
