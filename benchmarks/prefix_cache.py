"""Time to first token with and without the prefix cache, against document length, and the load bandwidth of each
store.

    python benchmarks/prefix_cache.py --lengths 1024,2048,4096,6144 --stores dir,valkey \
        --out benchmarks/results/prefix_cache.json

For each document length L (a passage of public-domain prose, benchmarks/data) and each store:
  1. the first process asks question 1 about the document with an empty store: its time to first token (TTFT),
     publishing on;
  2. a new process (a child of this script: nothing of the first is left in memory) asks question 2 about the same
     document: it loads the document's pages and computes only the rest. Its TTFT, its pages and bytes loaded;
  3. question 2 without any prefix cache, in this process: the reference TTFT and the greedy tokens, which the new
     process must give identically.
TTFT runs from the prompt's ids to the first token: the lookup, the prefill of what was not loaded (in chunks of
512 tokens, like `offload generate`) and the logits. Model loading is not counted.

Load bandwidth is reported twice: the store's own reads (`get` of every entry of the longest document, timed alone)
and the whole load (read, checksum, placement into the tiers: bytes read over the lookup's seconds).

`--granularity` also times the two entry layouts the cache could use on each store, with the same bytes: one entry
per page across all layers (what the runtime stores) and one entry per page and layer.

The valkey store starts its own valkey-server on 127.0.0.1 (tests/servers.py), unless --server-url names one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

QUESTIONS = ("Who are the people named in this passage, and what do they want?",
             "Summarize this passage in three sentences.")
PREFILL_CHUNK = 512


def document(tokenizer, tokens: int, lengths: list[int]) -> str:
    """About `tokens` tokens of consecutive prose, a passage of its own for each of `lengths` (so that no document
    starts like another and a first process finds nothing stored)."""
    text = (HERE / "data" / "pride_and_prejudice.txt").read_text(encoding="utf-8")
    start = sum(lengths[:lengths.index(tokens)])
    ids = tokenizer(text)["input_ids"][start:start + tokens]
    return tokenizer.decode(ids)


def prompt_ids(tokenizer, doc: str, question: str) -> torch.Tensor:
    from tools.common import encode_prompt

    return encode_prompt(tokenizer, f"{doc}\n\n{question}")


@torch.no_grad()
def ask(model, ids: torch.Tensor, options: dict, new_tokens: int) -> dict:
    """TTFT and `new_tokens` greedy tokens of `ids` in a fresh runtime; the prefix cache's counters."""
    from offload import offload
    from offload.cache import CACHE_KWARG

    with offload(model, **options) as rt:
        rt.expect_tokens(ids.shape[1] + new_tokens)
        t0 = time.perf_counter()
        cache = rt.cache(ids)
        held = cache.get_seq_length()
        for a in range(held, ids.shape[1], PREFILL_CHUNK):
            out = model(input_ids=ids[:, a:a + PREFILL_CHUNK], **{CACHE_KWARG: cache}, use_cache=True,
                        logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        tokens = [token]
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([[token]]), **{CACHE_KWARG: cache}, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
        t1 = time.perf_counter()
        stats = rt.stats()
        publish_wait = time.perf_counter() - t1  # stats() waits for the publisher
    return {"ttft_s": ttft, "tokens": tokens, "prompt_tokens": ids.shape[1], "held": held,
            "publish_wait_s": publish_wait, "prefix_cache": stats["prefix_cache"]}


def store_read_bandwidth(spec: str) -> dict:
    """Seconds and bytes of one `get` of every entry in the store (its keys from a directory listing or a scan)."""
    from tiers.prefix import open_store

    store = open_store(spec)
    try:
        keys = list_keys(store)
        t0 = time.perf_counter()
        values = []
        for a in range(0, len(keys), 16):
            values += store.get(keys[a:a + 16])
        dt = time.perf_counter() - t0
    finally:
        store.close()
    total = sum(len(v) for v in values if v is not None)
    return {"entries": len(keys), "bytes": total, "seconds": dt, "gb_per_s": total / dt / 1e9 if dt else None}


def list_keys(store) -> list[str]:
    if store.kind == "dir":
        return [p.stem for p in Path(store.where).rglob("*.kv")]
    client = store.client
    return [k.decode().rsplit(":", 1)[-1] for k in client.scan_iter(match="offload:kv:*", count=1000)]


def granularity(spec: str, layers: int, page_entry_bytes: int, pages: int) -> dict:
    """Write then read `pages` pages as one entry per page (all layers) and as one entry per page and layer."""
    from tiers.prefix import open_store

    out = {}
    for name, count, size in (("page", pages, page_entry_bytes),
                              ("page_and_layer", pages * layers, page_entry_bytes // layers)):
        store = open_store(spec)
        try:
            store.clear()
            items = [(f"{name}{i:08d}".encode().hex(), os.urandom(size)) for i in range(count)]
            t0 = time.perf_counter()
            for a in range(0, count, 16):
                store.put(items[a:a + 16])
            write = time.perf_counter() - t0
            t0 = time.perf_counter()
            for a in range(0, count, 16):
                store.get([k for k, _ in items[a:a + 16]])
            read = time.perf_counter() - t0
            store.clear()
        finally:
            store.close()
        total = count * size
        out[name] = {"entries": count, "entry_bytes": size, "write_gb_per_s": total / write / 1e9,
                     "read_gb_per_s": total / read / 1e9}
    return out


def child(args: argparse.Namespace) -> int:
    """The new process: question 2 for every length, loading from the store."""
    from offload.models import load_model

    model, tokenizer = load_model(args.model)
    rows = []
    for length in args.lengths:
        doc = document(tokenizer, length, args.lengths)
        ids = prompt_ids(tokenizer, doc, QUESTIONS[1])
        rows.append({"length": length, **ask(model, ids, {"prefix_cache": args.store}, args.new_tokens)})
    print(json.dumps(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 6144])
    ap.add_argument("--stores", type=lambda s: s.split(","), default=["dir", "valkey"])
    ap.add_argument("--server-url", default=None, help="use this Valkey/Redis server instead of starting one")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared with the reference")
    ap.add_argument("--repeats", type=int, default=1, help="measure everything this many times; medians reported")
    ap.add_argument("--granularity", action="store_true", help="also time the two entry layouts on each store")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child-store", dest="store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.store is not None:
        return child(args)

    from offload.models import load_model
    from offload.prefix import model_fingerprint

    model, tokenizer = load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="offload-prefix-bench-"))
    server = None
    specs = {}
    for store in args.stores:
        if store == "dir":
            specs["dir"] = str(work / "store")
        elif store == "valkey":
            if args.server_url is None:
                from servers import start_server

                (work / "valkey").mkdir()
                server = start_server(work / "valkey")
            specs["valkey"] = args.server_url or server.url
        else:
            ap.error(f"--stores: expected dir and/or valkey, got {store!r}")
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "model": args.model or "SmolLM2-135M-Instruct (embedded GGUF, float32)", "repeats": args.repeats,
              "rows": []}
    runs: dict[tuple, list[dict]] = {}  # (kind, store, length) -> one sample per repeat
    try:
        for _ in range(args.repeats):  # repeats alternate over every measurement: drifts hit them alike
            for length in args.lengths:
                ids = prompt_ids(tokenizer, document(tokenizer, length, args.lengths), QUESTIONS[1])
                runs.setdefault(("none", None, length), []).append(ask(model, ids, {}, args.new_tokens))
                print(f"L={length}: no cache TTFT {runs['none', None, length][-1]['ttft_s']:.2f} s", file=sys.stderr)
            for store, spec in specs.items():
                from tiers.prefix import open_store

                with open_store(spec) as s:
                    s.clear()
                for length in args.lengths:
                    ids = prompt_ids(tokenizer, document(tokenizer, length, args.lengths), QUESTIONS[0])
                    runs.setdefault(("first", store, length), []).append(
                        ask(model, ids, {"prefix_cache": spec}, args.new_tokens))
                proc = subprocess.run([sys.executable, __file__, "--child-store", spec, "--lengths",
                                       ",".join(map(str, args.lengths)), "--new-tokens", str(args.new_tokens)]
                                      + (["--model", args.model] if args.model else []),
                                      stdout=subprocess.PIPE, check=True, text=True)
                for row in json.loads(proc.stdout):
                    runs.setdefault(("new", store, row["length"]), []).append(row)
                result.setdefault("store_reads", {}).setdefault(store, []).append(store_read_bandwidth(spec))
        for store in specs:
            for length in args.lengths:
                ref, a, b = runs["none", None, length], runs["first", store, length], runs["new", store, length]
                ttft = {name: statistics.median(r["ttft_s"] for r in rs) for name, rs in
                        (("none", ref), ("first", a), ("new", b))}
                loaded = sum(r["prefix_cache"]["bytes_read"] for r in b)
                load_s = sum(r["prefix_cache"]["load_seconds"] for r in b)
                row = {"store": store, "length": length, "prompt_tokens": b[0]["prompt_tokens"],
                       "ttft_no_cache_s": ttft["none"], "ttft_first_process_s": ttft["first"],
                       "ttft_new_process_s": ttft["new"], "speedup_vs_first": ttft["first"] / ttft["new"],
                       "speedup_vs_no_cache": ttft["none"] / ttft["new"], "tokens_loaded": b[0]["held"],
                       "bytes_loaded": b[0]["prefix_cache"]["bytes_read"], "load_s": load_s / len(b),
                       "load_gb_per_s": loaded / load_s / 1e9 if load_s else None,
                       "ttft_samples": {k: [r["ttft_s"] for r in rs] for k, rs in
                                        (("none", ref), ("first", a), ("new", b))},
                       "same_tokens": all(r["tokens"] == ref[0]["tokens"] for r in b + ref)}
                result["rows"].append(row)
                print(json.dumps(row), file=sys.stderr)
        for store, spec in specs.items():
            if args.granularity:
                mc = model.config
                layers = mc.num_hidden_layers
                kv = getattr(mc, "num_key_value_heads", mc.num_attention_heads)
                head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
                entry = layers * 2 * kv * 64 * head_dim * next(model.parameters()).element_size()
                result.setdefault("granularity", {})[store] = granularity(spec, layers, entry, 64)
        result["fingerprint"] = model_fingerprint(model, next(model.parameters()).dtype, 64, "none")[:16]
    finally:
        if server is not None:
            server.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    lines = [f"medians of {result.get('repeats', 1)} repeat(s)",
             "| store | prompt (tokens) | TTFT no cache | TTFT first process | TTFT new process | vs first | "
             "loaded | load GB/s | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['store']} | {r['prompt_tokens']} | {r['ttft_no_cache_s']:.2f} s | "
                     f"{r['ttft_first_process_s']:.2f} s | {r['ttft_new_process_s']:.2f} s | "
                     f"{r['speedup_vs_first']:.1f}x | {r['tokens_loaded']} tok | "
                     f"{r['load_gb_per_s'] or 0:.2f} | {'yes' if r['same_tokens'] else 'no'} |")
    for store, samples in result.get("store_reads", {}).items():
        bw = max(samples, key=lambda x: x["gb_per_s"] or 0)
        lines.append(f"\n{store}: get of {bw['entries']} entries, {bw['bytes'] / 1e6:.0f} MB: "
                     f"{bw['gb_per_s']:.2f} GB/s (best of {len(samples)})")
    for store, g in result.get("granularity", {}).items():
        for name, m in g.items():
            lines.append(f"{store} one entry per {name.replace('_', ' ')}: {m['entries']} x "
                         f"{m['entry_bytes'] / 1e6:.2f} MB, write {m['write_gb_per_s']:.2f} GB/s, read "
                         f"{m['read_gb_per_s']:.2f} GB/s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
