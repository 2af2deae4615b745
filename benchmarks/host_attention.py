"""The host's attention over host-resident pages: its KV read bandwidth per thread count, and the split the cost
model chooses from this machine's measured rates.

    python benchmarks/host_attention.py                       # SmolLM2-135M and Llama-3-8B page shapes, bf16
    python benchmarks/host_attention.py --out benchmarks/results/host_attention.json

1. Bandwidth: `HostAttention` attends one query token (the model's query heads) over `--pages` random pages of each
   shape, stored as the host stores them (full precision, and packed with `--quant`), with 1, 2, ... threads up to
   the cores. GB/s counts the KV bytes read (as stored), median of `--repeats` jobs.
2. Split: the rates `offload.host_attention.measure_rates` measures on this machine (the link, the pool at all its
   threads, the device, the fixed cost of a job), and for each context of `--contexts` with `--device-fraction` of
   the KV on the device: a layer's pages below the device, how many the cost model gives the host in auto mode, and
   the modeled step time of one layer with off, all and auto. The model's step times are computed from the measured
   rates, not timed.
The end-to-end decode rates (auto against off and against the PCIe bound) come from `offload bench` with
`--host-attention-variants`: see benchmarks/host_attention_gpu.sh.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.disk_tier import provenance, save  # noqa: E402
from offload.host_attention import HostAttention, default_threads, measure_rates, split, step_seconds  # noqa: E402
from offload.quant import PageCodec  # noqa: E402

SHAPES = {  # kv heads, head_dim, query heads, layers
    "smollm2-135m": (3, 64, 9, 30),
    "llama3-8b": (8, 128, 32, 32),
}


def bandwidth(shape: str, dtype: torch.dtype, pages: int, page_size: int, threads: int, repeats: int,
              quant: str | None) -> float:
    kv_heads, head_dim, q_heads, _ = SHAPES[shape]
    codec = PageCodec.of(quant, kv_heads, page_size, head_dim) if quant else None
    ha = HostAttention(kv_heads, page_size, head_dim, dtype, torch.device("cpu"), codec=codec, threads=threads)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(pages, kv_heads, page_size, head_dim, generator=g).to(dtype)
    v = torch.randn(pages, kv_heads, page_size, head_dim, generator=g).to(dtype)
    if codec is not None:
        k, v = codec.encode(k, v)
    ha.attach(k, v)
    q = torch.randn(kv_heads, q_heads // kv_heads, head_dim, generator=g)
    rows = torch.randperm(pages, generator=g)
    ha.submit(q, rows, head_dim ** -0.5).result()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ha.submit(q, rows, head_dim ** -0.5).result()
        times.append(time.perf_counter() - t0)
    ha.close()
    return pages * ha.page_bytes / statistics.median(times) / 1e9


def splits(shape: str, dtype: torch.dtype, page_size: int, contexts: list[int], fraction: float,
           device: torch.device) -> dict:
    kv_heads, head_dim, _, layers = SHAPES[shape]
    ha = HostAttention(kv_heads, page_size, head_dim, dtype, device)
    rates = measure_rates(ha, device)
    ha.close()
    rows = []
    for ctx in contexts:
        pages = -(-ctx // page_size)
        resident = int(fraction * pages)
        below = pages - resident
        k = split("auto", below, resident, ha.page_bytes, ha.full_page_bytes, rates)
        t = {name: step_seconds(below - share, share, resident, ha.page_bytes, ha.full_page_bytes, rates)
             for name, share in (("off", 0), ("all", below), ("auto", k))}
        rows.append({"context": ctx, "pages_per_layer": pages, "below_device": below, "host_takes": k,
                     "modeled_layer_ms": {n: s * 1e3 for n, s in t.items()},
                     "modeled_speedup_auto_vs_off": t["off"] / t["auto"]})
    return {"shape": shape, "device": str(device), "layers": layers,
            "rates": {"link_gbps": rates.link / 1e9, "host_gbps": rates.host / 1e9,
                      "device_gbps": rates.device / 1e9, "overhead_us": rates.overhead * 1e6,
                      "concurrent": rates.concurrent, "threads": ha.threads},
            "contexts": rows}


def trace(path: str, shape: str, layers: int | None, context: int, fraction: float, mode: str,
          device: torch.device, dtype: torch.dtype, steps: int = 8) -> dict:
    """Decodes `steps` tokens after a `context`-token prompt on a random-weight model of `shape` with `fraction` of
    the KV on the device and the rest in host RAM, host_attention=`mode`, and saves the timeline to `path` (the
    host's attention on its own track, "host attention"). Returns the run's host_attention stats."""
    from offload import offload
    from offload.shapes import build_model

    model = build_model(shape, device, dtype, layers=layers)
    c = model.config
    kv = c.num_hidden_layers * (context + steps) * 2 * c.num_key_value_heads * c.head_dim * dtype.itemsize
    ids = torch.randint(0, c.vocab_size, (1, context), device=device)
    with offload(model, device_budget=int(fraction * kv), host_budget=2 * kv, host_attention=mode,
                 trace=True) as rt, torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)
        rt.save_trace(path)
        return rt.stats()["host_attention"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="smollm2-135m,llama3-8b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--pages", type=int, default=256, help="pages per job (default: 256)")
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quant", default="k8v4", help="also measure pages packed with this kv_quant ('' for none)")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--device-fraction", type=float, default=0.15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--trace-out", default=None, help="also decode on a random-weight model and save its timeline here")
    ap.add_argument("--trace-layers", type=int, default=None, help="with --trace-out: decoder layers (default: all)")
    ap.add_argument("--trace-context", type=int, default=32768)
    ap.add_argument("--trace-mode", default="auto", choices=["auto", "all", "off"])
    a = ap.parse_args()
    t0 = time.perf_counter()
    dtype = getattr(torch, a.dtype)
    cores = default_threads()
    counts = sorted({1, *range(2, cores + 1, max(1, cores // 8)), cores})
    result = {"bandwidth_gbps": [], "splits": []}
    print(f"host attention, GB/s of KV read ({a.pages} pages of {a.page_size} tokens, {a.dtype}; {cores} cores)")
    for shape in a.shapes.split(","):
        for quant in [None, a.quant or None] if a.quant else [None]:
            row = {"shape": shape, "kv_quant": quant or "none",
                   "gbps": {t: bandwidth(shape, dtype, a.pages, a.page_size, t, a.repeats, quant) for t in counts}}
            result["bandwidth_gbps"].append(row)
            print(f"  {shape:10s} {row['kv_quant']:5s} " + "  ".join(f"{t}t {g:6.2f}" for t, g in row["gbps"].items()))
    contexts = [int(c) for c in a.contexts.split(",")]
    for shape in a.shapes.split(","):
        s = splits(shape, dtype, a.page_size, contexts, a.device_fraction, torch.device(a.device))
        result["splits"].append(s)
        r = s["rates"]
        print(f"cost model, {shape} on {s['device']}: link {r['link_gbps']:.1f} GB/s, host {r['host_gbps']:.2f} GB/s "
              f"({r['threads']} threads), device {r['device_gbps']:.1f} GB/s, job {r['overhead_us']:.0f} us, "
              f"{'overlapping' if r['concurrent'] else 'sharing the cores'}")
        for c in s["contexts"]:
            ms = c["modeled_layer_ms"]
            print(f"  {c['context']:>7d} tokens: {c['below_device']} of {c['pages_per_layer']} pages below the device,"
                  f" host takes {c['host_takes']}; modeled layer ms off {ms['off']:.3f} all {ms['all']:.3f} auto "
                  f"{ms['auto']:.3f}")
    if a.trace_out:
        shape = a.shapes.split(",")[-1]
        result["trace"] = {"path": a.trace_out, "shape": shape, "context": a.trace_context, "mode": a.trace_mode,
                           "stats": trace(a.trace_out, shape, a.trace_layers, a.trace_context, a.device_fraction,
                                          a.trace_mode, torch.device(a.device), dtype)}
        print(f"trace: {a.trace_out}; host attention {result['trace']['stats']}")
    result["provenance"] = provenance("host_attention.py", None, t0)
    save(result, a.out)


if __name__ == "__main__":
    main()
