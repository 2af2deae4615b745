"""Per-token decode time on the CPU, offloaded cache (exact attention) against the model's ordinary DynamicCache,
measured side by side in one process.

    python benchmarks/cpu_decode.py --context 8000 --new-tokens 32 --repeats 5 --json benchmarks/results/cpu-decode.json

Default model: the embedded SmolLM2-135M-Instruct (float32); `--model tiny` uses a 4-layer random Llama for a
quick smoke run. Two cases, each against DynamicCache:

- "exact, everything resident": the device budget holds the whole KV plus the gather workspace, so nothing
  spills; target: offload / dynamic time per token <= 1.15.
- "exact, 85% of the KV in host RAM": device budget 15% of the KV bytes (workspace included), host budget the
  rest with slack; target: offload throughput >= 0.8x dynamic's, i.e. time per token ratio <= 1.25.

Only decode is timed. Each method runs on its own copy of the model with its own cache: all three prefill the same
random prompt (chunked, untimed) and decode one untimed warm-up token; then, `--repeats` times, each method
decodes `--new-tokens` greedy tokens in turn (the order rotates every repeat), so the methods see the same
context length and the same machine load within a repeat. Reported: the median over repeats of each method's
milliseconds per token, and their ratio. The prompt plus 1 + repeats x new tokens must fit the model's positions
(8192 for SmolLM2). `resident_bytes` after the run shows where the offloaded pages are.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from offload import offload  # noqa: E402
from offload.cache import CACHE_KWARG  # noqa: E402
from offload.opcount import kv_bytes  # noqa: E402
from offload.report import markdown_table  # noqa: E402

PAGE = 64
SLACK = 16 << 20  # bytes of host budget beyond the KV
CASES = [
    # (name, method, target ratio of offload / dynamic time per token)
    ("exact, everything resident", "resident", 1.15),
    ("exact, 85% of the KV in host RAM", "spilled", 1.25),
]


def load(name: str, positions: int):
    if name == "tiny":
        from offload.models import tiny_llama

        return tiny_llama(layers=4, hidden=64, heads=4, kv_heads=2, vocab=128, max_positions=positions)
    from offload.models import load_model

    model, _ = load_model(progress=False)
    return model


def budgets(model, method: str, tokens: int) -> dict:
    kv = kv_bytes(model, tokens)
    if method == "resident":
        # The runtime's own default on a roomy device: the KV at the model's maximum positions plus the largest
        # gather workspace it plans (four pages per page of those positions), so that every page stays there.
        layers = model.config.num_hidden_layers
        page_bytes = kv_bytes(model, PAGE) // layers
        max_pages = -(-model.config.max_position_embeddings // PAGE)
        return {"device_budget": (layers + 4) * max_pages * page_bytes, "host_budget": SLACK}
    return {"device_budget": int(0.15 * kv), "host_budget": int(0.85 * kv) + int(0.15 * kv) + SLACK}


def placed_as_meant(method: str, resident: dict) -> bool:
    """Whether the pages sit where the case says: none in host RAM, or at least 80% of them there."""
    host = resident["host"] / max(1, resident["device"] + resident["host"])
    return host == 0 if method == "resident" else host >= 0.8


def prefill(model, cache, prompt: torch.Tensor, chunk: int) -> torch.Tensor:
    """Prefills `prompt` into `cache` and decodes one warm-up token; returns the next token id [1, 1]."""
    for start in range(0, prompt.shape[1], chunk):
        out = model(input_ids=prompt[:, start:start + chunk], **{CACHE_KWARG: cache}, use_cache=True,
                    logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    out = model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True)
    return out.logits[:, -1:].argmax(-1)


def decode(model, cache, token: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    """Seconds per token over `n` greedy decode steps, and the next token."""
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / n, token


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return (f"{platform.platform()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def run(args: argparse.Namespace) -> dict:
    context = args.context or (2048 if args.model == "tiny" else 8000)
    tokens = context + 1 + args.repeats * args.new_tokens
    base = load(args.model, tokens)
    limit = base.config.max_position_embeddings
    if tokens > limit:
        raise SystemExit(f"context + 1 + repeats x new-tokens = {tokens} exceeds the model's {limit} positions")
    prompt = torch.randint(0, base.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    methods = ["dynamic"] + [m for _, m, _ in CASES]
    models = {m: base if m == "dynamic" else copy.deepcopy(base) for m in methods}
    caches, tokens_next, runtimes = {}, {}, {}
    times: dict[str, list[float]] = {m: [] for m in methods}
    opts = {m: budgets(base, m, tokens) for m in methods if m != "dynamic"}
    with contextlib.ExitStack() as stack, torch.no_grad():
        from transformers import DynamicCache

        for m in methods:
            t0 = time.perf_counter()
            if m == "dynamic":
                caches[m] = DynamicCache(config=base.config)
            else:
                runtimes[m] = stack.enter_context(offload(models[m], attention="exact", page_size=PAGE, **opts[m]))
                caches[m] = runtimes[m].cache()
            tokens_next[m] = prefill(models[m], caches[m], prompt, args.prefill_chunk)
            print(f"prefilled {m}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for r in range(args.repeats):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                seconds, tokens_next[m] = decode(models[m], caches[m], tokens_next[m], args.new_tokens)
                times[m].append(seconds)
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{m} {times[m][-1] * 1e3:.2f} ms/token"
                                                             for m in methods), file=sys.stderr)
        resident = {m: runtimes[m].stats()["resident_bytes"] for m in runtimes}
    medians = {m: statistics.median(times[m]) for m in methods}
    kv = kv_bytes(base, tokens)
    rows = []
    for name, m, target in CASES:
        ratio = medians[m] / medians["dynamic"]
        rows.append({
            "case": name, "dynamic_ms": medians["dynamic"] * 1e3, "offload_ms": medians[m] * 1e3, "ratio": ratio,
            "target": target, "pass": ratio <= target and placed_as_meant(m, resident[m]),
            "ratios_per_repeat": [o / d for o, d in zip(times[m], times["dynamic"])],
            "budgets": opts[m], "resident_bytes": resident[m],
            "host_fraction": resident[m]["host"] / max(1, resident[m]["device"] + resident[m]["host"]),
        })
    return {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "model": args.model, "context": context, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "kv_bytes": kv, "ms_per_token_all": {m: [t * 1e3 for t in times[m]] for m in methods}, "rows": rows,
    }


def print_report(result: dict) -> None:
    print(f"`{result['command']}`, {result['date']}")
    print(f"machine: {result['machine']}")
    print(f"model: {result['model']}, prompt {result['context']} tokens, {result['repeats']} repeats x "
          f"{result['new_tokens']} decode tokens, KV {result['kv_bytes'] / 2**20:.1f} MiB at the end")
    print()
    print("\n".join(markdown_table(
        ["case", "dynamic ms/token", "offload ms/token", "ratio", "target", "result", "host share of resident bytes"],
        [[r["case"], f"{r['dynamic_ms']:.2f}", f"{r['offload_ms']:.2f}", f"{r['ratio']:.3f}", f"<= {r['target']:.2f}",
          "pass" if r["pass"] else "FAIL", f"{100 * r['host_fraction']:.0f}%"] for r in result["rows"]])))
    print()
    for r in result["rows"]:
        if not placed_as_meant("resident" if "resident" in r["case"] else "spilled", r["resident_bytes"]):
            print(f"{r['case']}: the pages are not where the case needs them (counted as a failure)")
        print(f"{r['case']}: resident_bytes {r['resident_bytes']}, ratio per repeat "
              + ", ".join(f"{x:.3f}" for x in r["ratios_per_repeat"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                        help="smollm2: the embedded SmolLM2-135M-Instruct (default); tiny: a random 4-layer Llama")
    parser.add_argument("--context", type=int, default=0,
                        help="prompt tokens (default: 8000 for smollm2, 2048 for tiny)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode tokens timed per method and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per prefill forward")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
