"""Soak: a long greedy decode over three tiers, with pages churning through them, watched for leaks.

    python benchmarks/soak.py                                    # 100,000 tokens, a sample every 1,000
    python benchmarks/soak.py --steps 2000 --every 100 --warmup 500 --out /tmp/soak.json

The model is a random-weight Mistral (2 layers, 4 query heads over 2 KV heads, head_dim 16, float32) with 131,072
positions and a sliding window of 64 tokens on every layer, in pages of 8 tokens. Why a window: a layer then holds
at most ceil(63 / 8) + 1 = 9 pages however long the sequence, so the steady state is well defined and any growth
is the runtime's, not the KV's. Why these budgets: the 18 pages of the two windows don't fit the device's 10
cache slots plus the host's 4, so every tier holds pages all the time, and each page goes the whole way down: it
opens on the device as a layer's tail, is evicted to the host (device->host) when a newer page needs its slot, from
there to the disk (host->disk), is read back from the disk for attention by every step that sees it (disk->host,
through the load ring), and is released from whichever tier holds it when the window leaves it. A new page opens
every 8 tokens per layer, so every slot of every tier is reused thousands of times over the run.

The decode loop is the model's own forward with the runtime's cache and an argmax, one token at a time. Every
`--every` steps it records the step, wall time, RSS, open file descriptors, threads (Python's and the OS's),
pinned host bytes, the disk files' size and the tiers' occupancy, and for finding the cause of a growth the C
heap (glibc's mallinfo2: bytes in use and bytes held), Python's allocated blocks and gc counts; the loop holds
nothing that grows (the tokens go into a tensor filled up front; only the samples accumulate, ~2 KB each). Then
it checks that RSS grew by less than `--rss-tolerance` (1%) from the sample at `--warmup` to the last, and that
open files, threads, pinned bytes and the disk file size did not change after it; it prints the checks, writes
the samples as JSON (`--out`) and plots them (`--plot`, default: `--out` with .png), and exits with 1 when a
check failed. `--reference` also decodes the same tokens with transformers'
DynamicCache (after the soak, so it doesn't disturb it) and checks that they are equal. `--tracemalloc` traces
Python allocations from the warm-up sample on and prints the lines that allocated most since (slower).

NOTE: the runtime's two thread pools (copies, disk I/O) start their threads lazily, up to `io_threads` each, when
work arrives while every thread is busy; with more than one, the count may still rise (within 1 + 2 x io_threads)
after any fixed warm-up. `--io-threads 1` makes "threads constant" exact from the first spill on.

NOTE: what grows over a run (benchmarks/results/soak-cpu.json): the C heap in use rises by ~10 bytes a token,
8 of them the runtime's record of the sequence's token ids (offload/prefix.py, TokenLog: one int64 per token,
kept to continue conversations and key prefix-cache pages), the rest the samples; RSS follows in steps of a few
hundred KiB as the allocator touches heap it already holds (mallinfo2's bytes held stay flat).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from offload import offload  # noqa: E402
from offload.cache import CACHE_KWARG  # noqa: E402
from tiers.host import pinned_bytes  # noqa: E402

POSITIONS = 131072
WINDOW = 64  # tokens; a layer holds at most 9 pages of 8
PAGE = 8
LAYERS = 2
KV_HEADS = 2
HEAD_DIM = 16
PROMPT = 96  # longer than the window: the prefill already spills
PAGE_BYTES = 2 * KV_HEADS * PAGE * HEAD_DIM * 4  # K and V of one layer's page, float32
# Device: 10 cache pages (a tail per layer among them) and the streaming workspace of 4 (plan_budgets takes
# 4 * max(1, (16 - 2) // 10)); host: 4 pages; disk: room for more than the windows' pages, a file that stops
# growing once it holds them.
DEVICE_PAGES = 14
HOST_PAGES = 4
DISK_PAGES = 64
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "soak-cpu.json")


def build_model(positions: int = POSITIONS, window: int = WINDOW, seed: int = 0):
    """The random-weight sliding-window Mistral described above (large initializer: peaked attention, so that a
    wrong page would change the tokens)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=positions,
                           sliding_window=window, tie_word_embeddings=False, initializer_range=0.2,
                           eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return MistralForCausalLM(config).eval()


def options(disk_dir: str, io_threads: int = 4) -> dict:
    """Runtime options: budgets that put pages in all three tiers (see the module docstring)."""
    return dict(page_size=PAGE, device_budget=DEVICE_PAGES * PAGE_BYTES, host_budget=HOST_PAGES * PAGE_BYTES,
                disk_dir=disk_dir, disk_budget=DISK_PAGES * PAGE_BYTES, io_threads=io_threads)


def prompt_ids(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _mallinfo() -> Callable[[], tuple[int, int]] | None:
    """glibc's mallinfo2 as (bytes in use, bytes the heap holds) of the C heap (arenas and mmapped blocks), or
    None elsewhere: tells memory still referenced from memory freed but kept by the allocator."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = Info

    def read() -> tuple[int, int]:
        m = fn()
        return m.uordblks + m.hblkhd, m.arena + m.hblkhd

    return read


MALLINFO = _mallinfo()


def disk_files(directory: str) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def sample(rt, step: int, t0: float, disk_dir: str, proc: psutil.Process) -> dict:
    """One record: the process's resources and the runtime's occupancy after `step` decode steps."""
    stats = rt.stats()
    files = disk_files(disk_dir)
    host = rt.host_tier
    return {
        "step": step,
        "wall_s": round(time.perf_counter() - t0, 3),
        "rss_bytes": proc.memory_info().rss,
        "fds": proc.num_fds(),
        "threads_python": threading.active_count(),
        "threads_os": proc.num_threads(),
        "thread_names": sorted(t.name for t in threading.enumerate()),
        # Bytes this process holds page-locked for the host tier (tiers/pinned.py): 0 on a CPU-only machine,
        # where the host pool is ordinary memory (host_pinned False).
        "pinned_bytes": pinned_bytes(),
        "host_pinned": bool(host.pinned) if host is not None else None,
        "disk_files": len(files),
        "disk_file_bytes": sum(os.path.getsize(os.path.join(disk_dir, f)) for f in files),
        "resident_bytes": stats["resident_bytes"],
        "resident_pages": rt.placement.resident_pages(),
        "evictions": stats["evictions"],
        "bytes_moved": stats["bytes_moved"],
        "tokens": stats["tokens"]["decode"],
        "heap_in_use_bytes": MALLINFO()[0] if MALLINFO else None,
        "heap_bytes": MALLINFO()[1] if MALLINFO else None,
        "python_blocks": sys.getallocatedblocks(),
        "gc_collections": [g["collections"] for g in gc.get_stats()],
    }


@dataclass
class Soak:
    """What a soak run produced: the samples, the greedy tokens it decoded and how long the decode took."""

    samples: list[dict] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # [steps] int32
    seconds: float = 0.0
    tracemalloc_top: list[str] = field(default_factory=list)


@torch.no_grad()
def soak(model, steps: int, every: int, disk_dir: str, warmup: int | None = None, trace_malloc: bool = False,
         progress: Callable[[dict], None] | None = None, io_threads: int = 4) -> Soak:
    """Prefills the prompt, then decodes `steps` greedy tokens one forward at a time, taking a sample after the
    prefill (step 0) and every `every` steps. With `trace_malloc`, Python allocations are traced from the sample
    at `warmup` on."""
    import tracemalloc

    result = Soak(tokens=torch.full((steps,), -1, dtype=torch.int32))  # written up front: no growth later
    proc = psutil.Process()
    ids = prompt_ids()
    base = None
    with offload(model, **options(disk_dir, io_threads)) as rt:
        rt.expect_tokens(ids.shape[1] + steps)  # as generate does: sizes the disk file
        cache = rt.cache()
        out = model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        del out
        t0 = time.perf_counter()
        result.samples.append(sample(rt, 0, t0, disk_dir, proc))
        for step in range(1, steps + 1):
            out = model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            result.tokens[step - 1] = token[0, 0]
            del out
            if step % every == 0 or step == steps:
                s = sample(rt, step, t0, disk_dir, proc)
                result.samples.append(s)
                if progress is not None:
                    progress(s)
                if trace_malloc and step == warmup:
                    tracemalloc.start(8)
                    base = tracemalloc.take_snapshot()
        result.seconds = time.perf_counter() - t0
        if base is not None:
            end = tracemalloc.take_snapshot()
            tracemalloc.stop()
            diff = end.compare_to(base, "traceback")
            result.tracemalloc_top = ["\n".join([str(d)] + d.traceback.format()[-4:]) for d in diff[:12]]
        del cache
    return result


@torch.no_grad()
def reference_tokens(model, steps: int) -> torch.Tensor:
    """The same greedy decode with transformers' DynamicCache: [steps] int32."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt_ids(), **{CACHE_KWARG: cache}, use_cache=True)
    tokens = torch.full((steps,), -1, dtype=torch.int32)
    token = out.logits[:, -1:].argmax(-1)
    for step in range(steps):
        out = model(input_ids=token, **{CACHE_KWARG: cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        tokens[step] = token[0, 0]
    return tokens


def at(samples: list[dict], step: int) -> dict:
    """The first sample at or after `step`."""
    return next(s for s in samples if s["step"] >= step)


def check(samples: list[dict], warmup: int, rss_tolerance: float) -> tuple[dict, list[str]]:
    """(summary, problems): RSS growth from the sample at `warmup` to the last, and the resources that must not
    change after it. No problems: the run passed."""
    base, last = at(samples, warmup), samples[-1]
    after = [s for s in samples if s["step"] >= base["step"]]
    growth = (last["rss_bytes"] - base["rss_bytes"]) / base["rss_bytes"]
    summary = {
        "warmup_step": base["step"], "last_step": last["step"],
        "rss_warmup_bytes": base["rss_bytes"], "rss_last_bytes": last["rss_bytes"],
        "rss_max_after_warmup_bytes": max(s["rss_bytes"] for s in after),
        "rss_growth": growth, "rss_tolerance": rss_tolerance,
    }
    problems = []
    if growth >= rss_tolerance:
        problems.append(f"RSS grew {100 * growth:.3f}% from step {base['step']} to {last['step']} "
                        f"({base['rss_bytes'] / 2**20:.1f} -> {last['rss_bytes'] / 2**20:.1f} MiB), "
                        f"over {100 * rss_tolerance:g}%")
    for key in ("fds", "threads_python", "threads_os", "pinned_bytes", "disk_files", "disk_file_bytes"):
        values = sorted({s[key] for s in after})
        summary[key] = values[0] if len(values) == 1 else values
        if len(values) > 1:
            changed = next(s for s in after if s[key] != base[key])
            problems.append(f"{key} changed after step {base['step']}: {base[key]} -> {changed[key]} at step "
                            f"{changed['step']} (values {values})")
    for tier in ("device", "host", "disk"):
        summary[f"min_{tier}_pages"] = min(s["resident_pages"][tier] for s in after)
        if summary[f"min_{tier}_pages"] == 0:
            problems.append(f"the {tier} tier held no page at some sample after step {base['step']}")
    moved = {k: last["bytes_moved"][k] - base["bytes_moved"][k] for k in last["bytes_moved"]}
    summary["bytes_moved_after_warmup"] = moved
    for direction in ("device->host", "host->disk", "disk->host"):
        if moved[direction] == 0:
            problems.append(f"no {direction} traffic after step {base['step']}: the tiers did not churn")
    return summary, problems


def plot(samples: list[dict], path: str, warmup: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in samples]
    fig, axes = plt.subplots(5, 1, figsize=(9, 11), sharex=True)
    panels = [
        ("RSS (MiB)", [("rss", [s["rss_bytes"] / 2**20 for s in samples])]),
        ("open files", [("fds", [s["fds"] for s in samples])]),
        ("threads", [("Python", [s["threads_python"] for s in samples]),
                     ("OS", [s["threads_os"] for s in samples])]),
        ("pinned bytes", [("pinned", [s["pinned_bytes"] for s in samples])]),
        ("pages resident", [(t, [s["resident_pages"][t] for s in samples]) for t in ("device", "host", "disk")]),
    ]
    for ax, (label, lines) in zip(axes, panels):
        for name, values in lines:
            ax.plot(steps, values, marker=".", markersize=3, label=name)
        ax.axvline(warmup, color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(loc="best", fontsize=8)
    axes[0].ticklabel_format(useOffset=False, style="plain", axis="y")
    axes[-1].set_xlabel("decode step (dotted: end of warm-up)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    from cpu_decode import machine as cpu_machine  # benchmarks/ is on the path: run as a script or by the test

    return f"{cpu_machine()}, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"


def commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100_000, help="tokens to decode (default 100000)")
    parser.add_argument("--every", type=int, default=1000, help="steps between samples (default 1000)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="step from which resources must hold still (default: a tenth of --steps)")
    parser.add_argument("--rss-tolerance", type=float, default=0.01,
                        help="largest RSS growth allowed after warm-up, a fraction (default 0.01)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results (default benchmarks/results/soak-cpu.json)")
    parser.add_argument("--plot", default=None, help="PNG plot (default: --out with .png)")
    parser.add_argument("--disk-dir", default=None, help="the disk tier's directory (default: a new temporary one)")
    parser.add_argument("--io-threads", type=int, default=4,
                        help="the runtime's io_threads (default 4, its own default); see the module docstring")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads (default 1: the tiny model is bound by per-op overhead)")
    parser.add_argument("--reference", action="store_true",
                        help="also decode with DynamicCache after the soak and check the tokens are equal")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace Python allocations from the warm-up sample on and print the top ones")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        parser.error("--steps and --every must be at least 1")
    warmup = args.warmup if args.warmup is not None else args.steps // 10
    if not 0 <= warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {warmup}")
    torch.set_num_threads(args.torch_threads)
    plot_path = args.plot or os.path.splitext(args.out)[0] + ".png"
    command = "python benchmarks/soak.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))

    own_dir = args.disk_dir is None
    disk_dir = tempfile.mkdtemp(prefix="offload-soak-") if own_dir else args.disk_dir
    model = build_model(max(POSITIONS, PROMPT + args.steps + 1))

    def progress(s: dict) -> None:
        print(f"step {s['step']:>7,}  {s['wall_s']:8.1f} s  rss {s['rss_bytes'] / 2**20:8.2f} MiB  fds {s['fds']}  "
              f"threads {s['threads_python']}/{s['threads_os']}  pages {s['resident_pages']}  "
              f"disk file {s['disk_file_bytes']:,} B", flush=True)

    print(f"soak: {args.steps:,} steps, a sample every {args.every:,}, warm-up {warmup:,}, disk_dir {disk_dir}",
          flush=True)
    try:
        run = soak(model, args.steps, args.every, disk_dir, warmup, args.tracemalloc, progress, args.io_threads)
        left = disk_files(disk_dir)
    finally:
        if own_dir:
            shutil.rmtree(disk_dir, ignore_errors=True)
    summary, problems = check(run.samples, warmup, args.rss_tolerance)
    summary["seconds"] = run.seconds
    summary["ms_per_token"] = 1e3 * run.seconds / args.steps
    if left:
        problems.append(f"disk_dir still holds {left} after the offload() block")
    if args.reference:
        ref = reference_tokens(model, args.steps)
        same = torch.equal(ref, run.tokens)
        summary["tokens_equal_dynamic_cache"] = same
        if not same:
            first = int((ref != run.tokens).nonzero()[0, 0])
            problems.append(f"tokens differ from DynamicCache's from step {first + 1} on")
    result = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "command": command,
        "model": {"architecture": "mistral", "layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "sliding_window": WINDOW, "positions": model.config.max_position_embeddings, "dtype": "float32"},
        "options": {k: v for k, v in options(disk_dir, args.io_threads).items() if k != "disk_dir"},
        "prompt_tokens": PROMPT,
        "steps": args.steps,
        "every": args.every,
        "summary": summary,
        "problems": problems,
        "tracemalloc_top": run.tracemalloc_top,
        "samples": run.samples,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    plot(run.samples, plot_path, summary["warmup_step"],
         f"soak: {args.steps:,} decode steps over device, host and disk (sliding window {WINDOW}, pages of {PAGE})")
    for entry in run.tracemalloc_top:
        print(entry)
    print(f"RSS at step {summary['warmup_step']:,}: {summary['rss_warmup_bytes'] / 2**20:.2f} MiB, at step "
          f"{summary['last_step']:,}: {summary['rss_last_bytes'] / 2**20:.2f} MiB, growth "
          f"{100 * summary['rss_growth']:+.3f}% (limit {100 * args.rss_tolerance:g}%)")
    print(f"after warm-up: fds {summary['fds']}, threads {summary['threads_python']} (Python) / "
          f"{summary['threads_os']} (OS), pinned bytes {summary['pinned_bytes']}, "
          f"disk file {summary['disk_file_bytes']} B")
    print(f"{run.seconds:.0f} s, {summary['ms_per_token']:.2f} ms per token; wrote {args.out} and {plot_path}")
    for p in problems:
        print(f"FAILED: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
