"""Disk tier throughput against the raw device, measured side by side in one run.

    python benchmarks/disk_tier.py --json benchmarks/results/disk_tier-cpu.json

Raw device: a file of `--mib` MiB read and written with O_DIRECT (page-aligned buffers, so the page cache plays no
part), sequentially one call at a time in 1 MiB blocks (what `dd bs=1M iflag=direct` measures: the baseline) and
in blocks of each shape's page size, and at random offsets in page-sized blocks with `--threads` and with 32 calls
in flight (what scattered pages cost the device itself). A cache below the guest (a virtual disk's host) can't be turned
off from here; the raw file is written after the tiers' files, so that if such a cache keeps recent writes, it
favours the baseline.

The tier: for each page shape and each I/O engine of `--engines` (aio: native AIO, a request's calls all in flight;
threads: `--threads` threads, a call each at a time), a DiskTier of `--mib` MiB of slots, checksums on, filled once;
then read and written in requests of `--batches` pages, `--inflight` requests in flight (as many as the runtime's
load ring has buffers: `load_buffers`, 4 with a disk tier by default), each request's slots in random order:

- "random": slots from anywhere in the file (few neighbours to coalesce: the device's random I/O is the limit);
- "runs": a range of consecutive slots, shuffled (a layer's pages as a prefill spills them).

Shapes: SmolLM2-135M (3 KV heads, head_dim 64) and Llama-3-8B (8 KV heads, head_dim 128), bf16, page_size 64:
24 KiB and 128 KiB halves, multiples of 4 KiB, so the tier uses O_DIRECT (the table says which path each used).

Noise: other work on the machine moves the device's speed by tens of percent within a second. So each
measurement is a turn of `--turn-mib` MiB, and every round runs every measurement once, in a new random order;
reported are the medians over `--rounds` rounds, and each one's ratio to the median raw sequential 1 MiB bandwidth
of the same direction (target for the tier >= 0.8); the JSON also has the median of the ratios taken within each
round ("ratio_same_round") and every sample.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cpu_decode import machine  # noqa: E402
from tiers.base import PageShape  # noqa: E402
from tiers.disk import IO_ENGINES, DiskTier  # noqa: E402
from tiers.host import aligned_host_tensor  # noqa: E402

MIB = 1 << 20
SHAPES = {
    "SmolLM2-135M": PageShape(kv_heads=3, page_size=64, head_dim=64, dtype=torch.bfloat16),
    "Llama-3-8B": PageShape(kv_heads=8, page_size=64, head_dim=128, dtype=torch.bfloat16),
}
PATTERNS = ("random", "runs")
# The raw device's random reads and writes are also measured this many calls deep (as deep as the AIO engine's
# requests go), beside --threads deep.
AIO_DEPTH_SHOWN = 32


class Raw:
    """O_DIRECT calls on one file: sequential passes that go on where the last one stopped, and random ones."""

    def __init__(self, path: str, nbytes: int):
        self.path, self.nbytes = path, nbytes
        with open(path, "wb") as f:  # real blocks, so that timed writes overwrite and reads find data
            for _ in range(nbytes // MIB):
                f.write(os.urandom(MIB))
            os.fsync(f.fileno())
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self.pos = 0
        self.rng = random.Random(1)

    def sequential(self, block: int, nbytes: int, write: bool) -> float:
        """GB/s of `nbytes` in `block`-byte calls, one at a time."""
        buf = mmap.mmap(-1, block)  # page-aligned
        buf.write(os.urandom(block))
        call = os.pwritev if write else os.preadv
        n = nbytes // block
        t0 = time.perf_counter()
        for _ in range(n):
            if self.pos + block > self.nbytes:
                self.pos = 0
            if call(self.fd, [buf], self.pos) != block:
                raise OSError(f"short call on {self.path}")
            self.pos += block
        return n * block / (time.perf_counter() - t0) / 1e9

    def scattered(self, block: int, nbytes: int, write: bool, depth: int) -> float:
        """GB/s of `nbytes` in `block`-byte calls at random block-aligned offsets, `depth` threads at a time."""
        n = nbytes // block // depth
        seeds = [self.rng.random() for _ in range(depth)]
        call = os.pwritev if write else os.preadv

        def worker(seed: float) -> None:
            buf, rng = mmap.mmap(-1, block), random.Random(seed)
            for _ in range(n):
                call(self.fd, [buf], rng.randrange(self.nbytes // block) * block)

        threads = [threading.Thread(target=worker, args=(s,)) for s in seeds]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return n * depth * block / (time.perf_counter() - t0) / 1e9

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


def buffers(shape: PageShape, batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Page-aligned K and V buffers of `batch` pages, as the runtime reads into (its workspace, the host pool)."""
    n = batch * shape.kv_heads * shape.page_size * shape.head_dim
    return [tuple(aligned_host_tensor(n, shape.dtype, pin=False).view(batch, *shape.dims).normal_()
                  for _ in range(2)) for _ in range(count)]


def requests(pattern: str, capacity: int, batch: int, count: int, rng: random.Random) -> list[list[int]]:
    """`count` requests of `batch` slots in random order, no slot twice (the runtime never has two copies of one
    slot in flight)."""
    if pattern == "random":
        slots = rng.sample(range(capacity), batch * count)
        return [slots[i * batch:(i + 1) * batch] for i in range(count)]
    return [rng.sample(range(r * batch, (r + 1) * batch), batch) for r in rng.sample(range(capacity // batch), count)]


def tier_turn(tier: DiskTier, reqs: list[list[int]], bufs: list[tuple[torch.Tensor, torch.Tensor]],
              write: bool) -> float:
    """GB/s of the requests, `len(bufs)` of them in flight at a time."""
    inflight: deque = deque()
    call = tier.write_async if write else tier.read_async
    t0 = time.perf_counter()
    for i, slots in enumerate(reqs):
        if len(inflight) == len(bufs):
            inflight.popleft().result()
        k, v = bufs[i % len(bufs)]
        inflight.append(call(slots, k, v))
    while inflight:
        inflight.popleft().result()
    return sum(len(r) for r in reqs) * tier.page_bytes / (time.perf_counter() - t0) / 1e9


def run(args: argparse.Namespace, work: str) -> dict:
    nbytes, turn = args.mib * MIB, args.turn_mib * MIB
    if turn > nbytes // 2:
        raise SystemExit("--turn-mib: at most half of --mib (the requests of a turn take distinct slots)")
    rng = random.Random(0)
    tiers: dict[str, DiskTier] = {}
    raw = None
    try:
        for name, engine in ((n, e) for n in args.shapes for e in args.engines):
            shape = SHAPES[name]
            tier = tiers[f"{name} {engine}"] = DiskTier(shape, nbytes // shape.page_bytes, work,
                                                        threads=args.threads, engine=engine)
            k, v = buffers(shape, 256, 1)[0]
            for first in range(0, tier.capacity, 256):  # every slot holds a page (untimed)
                slots = list(range(first, min(first + 256, tier.capacity)))
                tier.write(slots, k[:len(slots)], v[:len(slots)])
        # Written last: a cache below the guest (the hypervisor's) that favours recent writes favours the baseline.
        raw = Raw(os.path.join(work, "raw.bin"), nbytes)
        # Every measurement: key -> a function that runs one turn and returns GB/s.
        turns: dict[tuple, Callable[[], float]] = {}
        for write in (False, True):
            d = "write" if write else "read"
            turns[("raw", d, "sequential", MIB)] = lambda w=write: raw.sequential(MIB, turn, w)
            for name, tier in tiers.items():
                pb = tier.page_bytes
                turns[("raw", d, "sequential", pb)] = lambda w=write, b=pb: raw.sequential(b, turn, w)
                for depth in sorted({args.threads, AIO_DEPTH_SHOWN}):
                    turns[("raw", d, f"random-{depth}", pb)] = (
                        lambda w=write, b=pb, q=depth: raw.scattered(b, turn, w, q))
                for batch in args.batches:
                    bufs = buffers(tier.shape, batch, args.inflight)
                    count = max(args.inflight, turn // (batch * pb))
                    for pattern in PATTERNS:
                        turns[(name, d, pattern, batch)] = (
                            lambda t=tier, p=pattern, b=batch, c=count, bf=bufs, w=write:
                            tier_turn(t, requests(p, t.capacity, b, c, rng), bf, w))
        samples: dict[tuple, list[float]] = {key: [] for key in turns}
        for r in range(args.rounds):
            keys = list(turns)
            rng.shuffle(keys)
            for key in keys:
                samples[key].append(turns[key]())
            print(f"round {r + 1}/{args.rounds}: raw 1 MiB read {samples['raw', 'read', 'sequential', MIB][-1]:.2f}"
                  f" GB/s, write {samples['raw', 'write', 'sequential', MIB][-1]:.2f} GB/s", file=sys.stderr)
    finally:
        for tier in tiers.values():
            tier.close()
        if raw is not None:
            raw.close()
    rows = []
    for key, values in samples.items():
        who, d, pattern, size = key
        base = samples[("raw", d, "sequential", MIB)]
        row = {"what": who, "direction": d, "pattern": pattern, "gb_s": statistics.median(values),
               "ratio": statistics.median(values) / statistics.median(base),
               "ratio_same_round": statistics.median(x / b for x, b in zip(values, base)), "samples": values}
        if who == "raw":
            depth = int(pattern.split("-")[1]) if pattern.startswith("random") else 1
            row |= {"pattern": pattern.split("-")[0], "block_bytes": size, "depth": depth, "direct": True}
        else:
            tier = tiers[who]
            row |= {"batch": size, "page_bytes": tier.page_bytes, "direct": tier.direct, "engine": tier.engine}
        rows.append(row)
    rows.sort(key=lambda r: (r["direction"], r["what"] != "raw", r["what"], r["pattern"], r.get("block_bytes", 0),
                             r.get("depth", 0), r.get("batch", 0)))
    return {"rows": rows}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(script: str, argv: list[str] | None, started: float) -> dict:
    """What a result records of its run: the command, machine, date, commit and seconds since `started`."""
    return {"command": " ".join([f"python benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(), "date": datetime.date.today().isoformat(), "commit": commit(),
            "seconds": round(time.perf_counter() - started, 1)}


def save(result: dict, path: str | None) -> None:
    """Writes a benchmark's result as JSON to `path` (its folder made if missing); nothing when `path` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def table(result: dict) -> str:
    lines = [f"{'median of ' + str(result['rounds']) + ' rounds':58} {'GB/s':>6} {'/ raw 1 MiB':>11}  path"]
    for row in result["rows"]:
        if row["what"] == "raw":
            what = (f"raw {row['direction']} {row['pattern']}, {row['block_bytes'] >> 10} KiB blocks, "
                    f"depth {row['depth']}")
        else:
            what = f"tier {row['direction']} {row['what']} {row['pattern']}, {row['batch']} pages a request"
        path = ("direct" if row["direct"] else "buffered") + (f", {row['engine']}" if "engine" in row else "")
        lines.append(f"{what:58} {row['gb_s']:6.2f} {row['ratio']:11.2f}  {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="directory for the files (default: a new one in the temporary directory)")
    ap.add_argument("--mib", type=int, default=1024, help="MiB of the raw file and of each tier's file (1024)")
    ap.add_argument("--turn-mib", type=int, default=64, help="MiB moved by one measurement (64)")
    ap.add_argument("--rounds", type=int, default=20, help="times every measurement runs (20)")
    ap.add_argument("--batches", default="16,256", help="pages per request, comma-separated (16,256)")
    ap.add_argument("--inflight", type=int, default=4,
                    help="requests in flight (4: the runtime's load_buffers with a disk tier)")
    ap.add_argument("--threads", type=int, default=4, help="the tier's I/O threads, the runtime's io_threads (4)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="page shapes: " + ", ".join(SHAPES))
    ap.add_argument("--engines", default="aio,threads", help="the tier's I/O engines, comma-separated (aio,threads)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.shapes = args.shapes.split(",")
    args.engines = args.engines.split(",")
    if bad := [e for e in args.engines if e not in IO_ENGINES]:
        ap.error(f"--engines: unknown {bad}; known: {', '.join(IO_ENGINES)}")
    if unknown := [s for s in args.shapes if s not in SHAPES]:
        ap.error(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
    work = tempfile.mkdtemp(prefix="disk-tier-", dir=args.dir)
    t0 = time.perf_counter()
    try:
        result = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {**provenance("disk_tier.py", argv, t0), "directory": os.path.dirname(work), "file_mib": args.mib,
              "turn_mib": args.turn_mib, "rounds": args.rounds, "inflight": args.inflight, "threads": args.threads,
              "checksums": DiskTier.checksums, **result}
    print(table(result))
    save(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
