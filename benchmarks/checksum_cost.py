"""What page checksums cost a decode step: exact decoding with ~85% of the KV below the device, checksums on
against off, in one process.

    python benchmarks/checksum_cost.py --json benchmarks/results/checksum_cost-cpu.json
    python benchmarks/checksum_cost.py --host-share 0.75 --json benchmarks/results/checksum_cost-host-cpu.json

Default model: the embedded SmolLM2-135M-Instruct (float32, 96 KiB pages of 64 tokens); `--model tiny` runs a
4-layer random Llama for a smoke test. Budgets: the device holds 10% of the KV (its workspace included), the
host a few pages (`--host-share`: that share of the KV), and the disk the rest, so every layer has pages on disk
and every decode step loads all of its pages from below the device (stats() says how much from each tier): disk
pages are checked as they are read, host pages as they are copied out. After a prefill of `--context` random tokens (untimed), `--rounds` rounds each decode `--new-tokens` greedy
tokens with checksums on and as many with them off, in an order that alternates every round; reported: the
median milliseconds per token of each, and the median over rounds of the ratio on / off within a round (target
<= 1.05).

`--check-in-place`: with checksums on, exact steps also check the host pages they read in place (not copied
out: the CPU decode step's gather from the shared pool), at every step (`Runtime.check_in_place`).

`DiskTier.checksums` and `HostTier.checksums` are measurement switches: off, pages are neither hashed when written
nor checked when read. The few pages a step writes while they are off are never checked afterwards either, a
negligible share of the reads.

Also measured: one core's xxh3 throughput over page halves as large as the model's (cold in cache, as pages are),
which is what checking a page read in place (not copied: the CPU decode step's gather, a GPU's reads over the bus)
would cost per byte; and that cost for the bytes this run's steps read, as a share of a step with checksums off.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import xxhash

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cpu_decode import decode, prefill  # noqa: E402
from benchmarks.disk_tier import provenance, save  # noqa: E402
from offload import offload  # noqa: E402
from offload.opcount import kv_bytes  # noqa: E402
from tiers.disk import DiskTier  # noqa: E402
from offload.runtime import Runtime  # noqa: E402
from tiers.host import HostTier  # noqa: E402

PAGE = 64


def load(name: str, positions: int):
    if name == "tiny":
        from offload.models import tiny_llama

        return tiny_llama(layers=4, hidden=256, heads=4, kv_heads=2, vocab=128, max_positions=positions)
    from offload.models import load_model

    model, _ = load_model(progress=False)
    return model


def hash_throughput(half_bytes: int, total: int = 256 << 20, repeats: int = 5) -> float:
    """GB/s of xxh3_64 over `total` bytes in `half_bytes` pieces, on one core; the buffer is larger than the caches,
    so each pass reads it from memory, as the pages a step reads are."""
    buf = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    view = memoryview(buf)
    n = total // half_bytes
    speeds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            xxhash.xxh3_64_intdigest(view[i * half_bytes:(i + 1) * half_bytes], i)
        speeds.append(n * half_bytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(speeds)


def run(args: argparse.Namespace, disk_dir: str) -> dict:
    tokens = args.context + 1 + 2 * args.rounds * args.new_tokens
    model = load(args.model, tokens)
    if tokens > model.config.max_position_embeddings:
        raise SystemExit(f"context + 1 + 2 x rounds x new-tokens = {tokens} exceeds the model's positions")
    kv = kv_bytes(model, tokens)
    page_bytes = kv_bytes(model, PAGE) // model.config.num_hidden_layers
    layers = model.config.num_hidden_layers
    device = max(int(args.device_share * kv), (layers + 4) * page_bytes)  # the runtime's floor: a page a layer + 4
    host = int(args.host_share * kv) if args.host_share else args.host_pages * page_bytes
    options = dict(attention="exact", page_size=PAGE, device_budget=device, host_budget=host, disk_dir=disk_dir)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    times: dict[bool, list[float]] = {True: [], False: []}
    moved: dict[bool, dict[str, int]] = {True: {}, False: {}}
    with offload(model, **options) as rt, torch.no_grad():
        cache = rt.cache()
        t0 = time.perf_counter()
        token = prefill(model, cache, prompt, args.prefill_chunk)
        print(f"prefill: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        resident = rt.stats()["resident_bytes"]
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                DiskTier.checksums = HostTier.checksums = on
                Runtime.check_in_place = on and args.check_in_place
                before = dict(rt.stats()["bytes_moved"])
                seconds, token = decode(model, cache, token, args.new_tokens)
                after = rt.stats()["bytes_moved"]
                for key in after:
                    moved[on][key] = moved[on].get(key, 0) + after[key] - before[key]
                times[on].append(seconds)
            DiskTier.checksums = HostTier.checksums = True
            Runtime.check_in_place = False
            print(f"round {r + 1}/{args.rounds}: on {times[True][-1] * 1e3:.1f} ms/token, "
                  f"off {times[False][-1] * 1e3:.1f} ms/token", file=sys.stderr)
        disk = rt.disk_tier  # None when everything fit the device and the host
        half = rt.host_tier.shape.k_bytes if disk is None else disk.shape.k_bytes
        direct = disk is not None and disk.direct
    steps = args.rounds * args.new_tokens
    on_ms, off_ms = (statistics.median(times[on]) * 1e3 for on in (True, False))
    hash_gbs = hash_throughput(half)
    per_step = {key: moved[False][key] / steps for key in moved[False]}
    host_read = per_step["host->device"]
    disk_read = per_step["disk->host"]
    host_cost_ms = host_read / (hash_gbs * 1e9) * 1e3
    kv_now = sum(resident.values())
    return {
        "model": "tiny" if args.model == "tiny" else "SmolLM2-135M-Instruct (embedded GGUF, float32)",
        "check_in_place": args.check_in_place, "context": args.context, "new_tokens_per_round": args.new_tokens, "rounds": args.rounds,
        "page_bytes": page_bytes, "half_bytes": half, "disk_direct": direct, "options": options | {"disk_dir": "tmp"},
        "resident_bytes_after_prefill": resident,
        "disk_share_after_prefill": resident["disk"] / kv_now if kv_now else 0.0,
        "host_share_after_prefill": resident["host"] / kv_now if kv_now else 0.0,
        "ms_per_token": {"checksums_on": on_ms, "checksums_off": off_ms},
        # Each round's on and off blocks run back to back: their ratio is the least disturbed by drifts in load.
        "ratio_on_off": statistics.median(a / b for a, b in zip(times[True], times[False])),
        "ratio_of_medians": on_ms / off_ms,
        "ratio_per_round": [a / b for a, b in zip(times[True], times[False])],
        "samples_s_per_token": {"checksums_on": times[True], "checksums_off": times[False]},
        "bytes_read_per_step": {"disk": disk_read, "host": host_read},
        "hash_gb_s_one_core": hash_gbs,
        "host_hash_cost": {"ms_per_step": host_cost_ms, "share_of_step": host_cost_ms / off_ms},
        "disk_checksum_estimate": {"ms_per_step": disk_read / (hash_gbs * 1e9) * 1e3,
                                   "share_of_step": disk_read / (hash_gbs * 1e9) * 1e3 / off_ms},
    }


def summary(result: dict) -> str:
    ms = result["ms_per_token"]
    read = result["bytes_read_per_step"]
    host = result["host_hash_cost"]
    disk = result["disk_checksum_estimate"]
    return "\n".join([
        f"{result['model']}, context {result['context']}, {result['disk_share_after_prefill']:.0%} of the KV on "
        f"disk ({'O_DIRECT' if result['disk_direct'] else 'buffered'}), {result['host_share_after_prefill']:.0%} on "
        f"the host, {result['rounds']} rounds of "
        f"{result['new_tokens_per_round']} tokens",
        f"checksums on   {ms['checksums_on']:8.1f} ms/token",
        f"checksums off  {ms['checksums_off']:8.1f} ms/token",
        f"on / off       {result['ratio_on_off']:8.3f}  (median of the rounds' ratios; target <= 1.05)",
        f"a step reads {read['disk'] / 2**20:.1f} MiB from disk and {read['host'] / 2**20:.2f} MiB from the host; "
        f"xxh3 on one core: {result['hash_gb_s_one_core']:.1f} GB/s",
        f"hashing the disk pages, one core: {disk['ms_per_step']:.2f} ms a step ({disk['share_of_step']:.1%})",
        f"hashing the host pages, one core: {host['ms_per_step']:.3f} ms a step ({host['share_of_step']:.2%})",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--context", type=int, default=2048, help="prompt tokens (2048)")
    ap.add_argument("--new-tokens", type=int, default=3, help="tokens decoded per round and setting (3)")
    ap.add_argument("--rounds", type=int, default=24, help="rounds, each with checksums on and off (24)")
    ap.add_argument("--device-share", type=float, default=0.10, help="device budget as a share of the KV (0.10)")
    ap.add_argument("--host-pages", type=int, default=8, help="host budget in pages (8)")
    ap.add_argument("--host-share", type=float, default=0.0,
                    help="host budget as a share of the KV instead of --host-pages (0: use --host-pages)")
    ap.add_argument("--check-in-place", action="store_true",
                    help="checksums on also check the host pages exact steps read in place, at every step")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--dir", help="disk_dir (default: a new directory in the temporary directory)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="checksum-cost-", dir=args.dir) as disk_dir:
        result = run(args, disk_dir)
        left = os.listdir(disk_dir)
    result = {**provenance("checksum_cost.py", argv, t0), "files_left_in_disk_dir": left, **result}
    print(summary(result))
    save(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
