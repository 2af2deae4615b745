"""`offload bench`: decode throughput and memory of the offloaded KV cache against transformers' own caches.

    offload bench --model-shape llama3-8b --context 8192,32768 --new-tokens 32 --repeats 3 \
        --out bench.json --plot bench.png

For each context and batch size (`--batch 1,4,16`): a seeded random prompt of that many token ids per sequence, a
prefill, then `--new-tokens` greedy decode steps (one token per sequence each), timed; tokens/s count every
sequence's tokens, budgets scale with the batch's KV, and `speedup_vs_batch_1` compares a method's throughput with
its own at batch 1. Methods:
- `dynamic`: transformers' `DynamicCache`, all KV on the device: the speed baseline (an out-of-memory on the GPU
  is a result: the row gets "error": "out of memory");
- `hf-offloaded`: `DynamicCache(offloading=True)`, transformers' layer-wise CPU offload (CUDA only);
- `offload-exact`, `offload-sparse`: this runtime, with a device budget of `--device-budget`, else
  `--kv-device-fraction` of the KV size (context plus new tokens), and a host budget that holds all of it.

NOTE (noise): all methods run in one process and are interleaved: repeat r runs every method once for a context
before repeat r+1 starts, so drifts (clocks, page cache, other tenants) hit every method alike. Rows report
medians over the repeats. The JSON is rewritten after every context, so an interrupted run keeps what it measured.

NOTE (bytes per token): for the runtime, `bytes_moved_per_token` is the decode-phase difference of
`stats()["bytes_moved"]` divided by the tokens decoded. For `hf-offloaded` it is analytic: every decode step
prefetches each layer's whole KV to the device and offloads it back after the update, so the mean KV size over
the steps crosses once in each direction per token (2x the KV in total).

NOTE (memory fields): `peak_device_kv_bytes` is the runtime's peak device residency (its page cache plus
workspace), the whole KV for `dynamic`, and two layers' KV for `hf-offloaded` (the one updating and the one being
prefetched). On CUDA, `peak_device_alloc_bytes` adds the measured `torch.cuda.max_memory_allocated` rise over the
run, activations included.

NOTE (the exact-offload bound): exact attention reads every cached token at every step, so the KV that does not
fit in the device budget must cross the host-to-device link once per token. The bandwidth measured at start
(`offload.bandwidth`) over those bytes (KV of context plus new tokens, minus the device budget) bounds the decode
speed of `offload-exact`; `pct_of_pcie_bound` is how close it gets. On a CPU-only machine the "link" is a RAM copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from offload.bandwidth import exact_offload_bound, measure_h2d_bandwidth
from offload.config import OffloadConfig
from offload.shapes import kv_bytes_per_token
from offload.sizes import format_size, parse_size
from tools.common import DTYPES, add_model_options, add_runtime_options, config_from_args, default_device, load

log = logging.getLogger(__name__)

HELP = "measure decode throughput and memory over contexts: this runtime against transformers' caches"
METHODS = ("dynamic", "hf-offloaded", "offload-exact", "offload-sparse")
PAIRS = ("host->device", "device->host", "host->disk", "disk->host")
HF_OFFLOADED_CPU_NOTE = "needs CUDA: DynamicCache(offloading=True) copies layers between the CPU and a CUDA device"
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)
# Host budget: all of the KV plus this fraction and a little slack, so the host tier never evicts to disk.
HOST_HEADROOM = 0.25
HOST_SLACK_BYTES = 64 * 1024**2
# Each context's prompt is seeded with seed * 1_000_003 + context, which must stay within torch's 64-bit seeds.
MAX_SEED = 2**32 - 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark options")
    group.add_argument("--model-shape", metavar="NAME", default=None,
                       help="a random-weight model of a named shape (offload.shapes.MODEL_SHAPES) instead of --model")
    group.add_argument("--layers", type=int, default=None, metavar="N", help="with --model-shape: decoder layers")
    group.add_argument("--context", default="4096,16384", metavar="N[,N...]",
                       help="prompt lengths in tokens, comma-separated (default: 4096,16384)")
    group.add_argument("--batch", default="1", metavar="N[,N...]",
                       help="sequences decoded together, each of --context tokens (default: 1); throughput is summed "
                            "over the batch and budgets scale with it")
    group.add_argument("--new-tokens", type=int, default=64, metavar="N", help="decode steps timed (default: 64)")
    group.add_argument("--repeats", type=int, default=3, metavar="N", help="runs per method and context (default: 3)")
    group.add_argument("--methods", default=",".join(METHODS), metavar="LIST",
                       help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    group.add_argument("--kv-device-fraction", type=float, default=0.15, metavar="F",
                       help="without --device-budget: the runtime's device budget as a fraction of the KV size "
                       "(default: 0.15)")
    group.add_argument("--prefetch-variants", default=None, metavar="LIST",
                       help="extra offload-sparse rows, one per prefetch policy, e.g. temporal,speculative,none")
    group.add_argument("--quant-variants", default=None, metavar="LIST",
                       help="extra rows of each offload method in --methods, one per kv_quant setting, e.g. k8v4,k4v2 "
                       "(side by side with full precision in the same run)")
    group.add_argument("--host-attention-variants", default=None, metavar="LIST",
                       help="extra rows of each offload method in --methods, one per host_attention setting, e.g. "
                       "off,all (side by side with the --host-attention setting, auto by default, in the same run)")
    group.add_argument("--prefill-chunk", type=int, default=0, metavar="N",
                       help="prompt tokens per prefill forward pass; 0: the whole prompt at once (default)")
    group.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random prompts (default: 0)")
    group.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                       help="start no new run after this many seconds; rows not run are marked skipped")
    group.add_argument("--out", metavar="PATH", default=None, help="write the results as JSON here")
    group.add_argument("--plot", metavar="PATH", default=None, help="write a PNG of decode tokens/s per context")
    group.add_argument("--no-progress", action="store_true", help="no model loading progress bars")
    add_model_options(parser)
    add_runtime_options(parser)


# ---- the plan: validated arguments -----------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One row kind: a method, plus the runtime options that set it apart (attention, prefetch)."""

    label: str
    method: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_contexts(text: str) -> list[int]:
    contexts = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"context: expected comma-separated positive integers, got {text!r}") from None
        if value <= 0:
            raise ValueError(f"context: every context must be >= 1 token, got {value}")
        contexts.append(value)
    return list(dict.fromkeys(contexts))


def parse_variants(methods_text: str, prefetch_text: str | None, quant_text: str | None = None,
                   host_text: str | None = None) -> list[Variant]:
    methods = list(dict.fromkeys(m.strip() for m in str(methods_text).split(",") if m.strip()))
    if not methods:
        raise ValueError(f"methods: expected a comma-separated list from {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    variants = []
    for m in methods:
        options = {"attention": m.removeprefix("offload-")} if m.startswith("offload-") else {}
        variants.append(Variant(m, m, options))
    if prefetch_text:
        from policies import PREFETCH

        for name in dict.fromkeys(p.strip() for p in prefetch_text.split(",") if p.strip()):
            try:
                PREFETCH.check(name)
            except ValueError as exc:
                raise ValueError(f"prefetch-variants: {exc}") from None
            variants.append(Variant(f"offload-sparse+prefetch={name}", "offload-sparse",
                                    {"attention": "sparse", "prefetch": name}))
    if quant_text:
        from offload.quant import SETTINGS

        variants += _option_variants(methods, "kv_quant", "quant-variants", quant_text, SETTINGS)
    if host_text:
        from offload.config import HOST_ATTENTION

        variants += _option_variants(methods, "host_attention", "host-attention-variants", host_text, HOST_ATTENTION)
    return variants


def _option_variants(methods: list[str], option: str, flag: str, text: str, allowed) -> list[Variant]:
    """One extra row per offload method and per setting of `option` listed in `text` (the value of --`flag`)."""
    out = []
    for name in dict.fromkeys(h.strip() for h in text.split(",") if h.strip()):
        if name not in allowed:
            raise ValueError(f"{flag}: expected settings from {', '.join(allowed)}, got {name!r}")
        out += [Variant(f"{m}+{option}={name}", m, {"attention": m.removeprefix("offload-"), option: name})
                for m in methods if m.startswith("offload-")]
    return out


def parse_batches(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]: batch sizes >= 1, no repeats."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"batch: expected distinct ints >= 1 separated by commas (e.g. 1,4,16), got {text!r}")
    return sizes


def _check_args(args: argparse.Namespace) -> tuple[list[int], list[Variant]]:
    contexts = parse_contexts(args.context)
    parse_batches(args.batch)
    if args.new_tokens < 1:
        raise ValueError(f"new-tokens: expected an int >= 1, got {args.new_tokens}")
    if args.repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {args.repeats}")
    if args.prefill_chunk < 0:
        raise ValueError(f"prefill-chunk: expected an int >= 0, got {args.prefill_chunk}")
    if not 0.0 < args.kv_device_fraction <= 1.0:
        raise ValueError(f"kv-device-fraction: expected a fraction in (0, 1], got {args.kv_device_fraction}")
    if not 0 <= args.seed <= MAX_SEED:  # torch's seeds are 64-bit: a larger one failed every row
        raise ValueError(f"seed: expected an int from 0 to {MAX_SEED}, got {args.seed}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise ValueError(f"time-limit: expected seconds > 0, got {args.time_limit}")
    if args.model_shape is not None:
        from offload.shapes import MODEL_SHAPES

        if args.model is not None:
            raise ValueError("model-shape: give either --model or --model-shape, not both")
        if args.model_shape not in MODEL_SHAPES:
            raise ValueError(f"model-shape: unknown shape {args.model_shape!r}; known: {', '.join(MODEL_SHAPES)}")
        check_positions(contexts, args.new_tokens, MODEL_SHAPES[args.model_shape]["max_position_embeddings"])
    elif args.layers is not None:
        raise ValueError("layers: only applies with --model-shape")
    if getattr(args, "attention", None) is not None:
        raise ValueError("attention: bench sets it per method; choose offload-exact and/or offload-sparse in --methods")
    config_from_args(args)  # validates the runtime flags now, not after loading the model
    for flag, path in (("out", args.out), ("plot", args.plot)):
        if path:
            check_output_file(flag, path)
    return contexts, parse_variants(args.methods, args.prefetch_variants, args.quant_variants,
                                    args.host_attention_variants)


def check_output_file(flag: str, path: str) -> None:
    """Raises ValueError("<flag>: ...") unless a file can be written at `path` (missing parent directories are
    created when it is written), so that a bad path fails before the runs, not after them."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"{flag}: {path} is a directory; give a file path")
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag}: can't write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise ValueError(f"{flag}: {path} is not writable")


def check_positions(contexts: list[int], new_tokens: int, limit: int | None) -> None:
    for context in contexts:
        if limit is not None and context + new_tokens > limit:
            raise ValueError(f"context: {context} tokens plus new-tokens {new_tokens} exceed the model's maximum "
                             f"of {limit} positions (the largest context is {limit - new_tokens})")


def _load_model(args: argparse.Namespace) -> tuple[Any, str]:
    """(model, its name) on --device; a --model-shape model is bf16 on CUDA and float32 on the CPU by default."""
    if args.model_shape is None:
        model, _ = load(args)
        return model, args.model or "SmolLM2-135M-Instruct (default GGUF)"
    from offload.shapes import build_model

    device = torch.device(getattr(args, "device", None) or default_device())
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return build_model(args.model_shape, device, dtype, layers=args.layers, seed=args.seed), args.model_shape


# ---- one run -----------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def prefill_and_decode(model: Any, cache: Any, prompt: torch.Tensor, new_tokens: int, chunk: int,
                       after_prefill: Callable[[], None] | None = None) -> tuple[float, float]:
    """Prefills `prompt` [B, n] into `cache`, then decodes `new_tokens` greedy steps; returns (prefill seconds,
    decode seconds). `after_prefill` runs between the two clocks (for stats snapshots)."""
    from offload.cache import CACHE_KWARG  # transformers: imported when there is a model to run

    device = prompt.device
    n = prompt.shape[1]
    step = chunk or n
    _sync(device)
    t0 = time.perf_counter()
    for start in range(0, n, step):
        # logits_to_keep=1: only the last position's logits are needed, not [n, vocab].
        out = model(input_ids=prompt[:, start:start + step], **{CACHE_KWARG: cache}, use_cache=True,
                    logits_to_keep=1)
    next_id = out.logits[:, -1:].argmax(-1)  # [B, 1]
    _sync(device)
    t1 = time.perf_counter()
    if after_prefill is not None:
        after_prefill()
    _sync(device)
    t2 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=next_id, **{CACHE_KWARG: cache}, use_cache=True)
        next_id = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t2


@dataclasses.dataclass
class Sample:
    prefill_seconds: float
    decode_seconds: float
    peak_device_kv_bytes: int | None = None
    peak_host_bytes: int | None = None
    peak_device_alloc_bytes: int | None = None
    bytes_moved_per_token: dict[str, float] = dataclasses.field(default_factory=dict)
    stall_fraction: float | None = None
    attended_fraction: float | None = None
    setup_seconds: float | None = None


class Bench:
    """Runs one (variant, context) measurement at a time on one model."""

    def __init__(self, model: Any, args: argparse.Namespace):
        self.model, self.args = model, args
        self.device = next(model.parameters()).device
        self.per_token = kv_bytes_per_token(model.config, next(model.parameters()).dtype)
        # The runtime flags the user gave; per-variant options override them.
        self.given = {n: getattr(args, n) for n in OffloadConfig.option_names() if getattr(args, n, None) is not None}
        self.given.pop("device", None)
        self.batch = 1  # sequences per run, set by the caller

    def kv_bytes(self, context: int) -> int:
        """The KV of the batch at the end of a run."""
        return self.batch * (context + self.args.new_tokens) * self.per_token

    def device_budget(self, context: int) -> int:
        if "device_budget" in self.given:
            return parse_size(self.given["device_budget"], "device_budget")
        return int(self.args.kv_device_fraction * self.kv_bytes(context))

    def host_budget(self, context: int) -> int:
        if "host_budget" in self.given:
            return parse_size(self.given["host_budget"], "host_budget")
        return int((1 + HOST_HEADROOM) * self.kv_bytes(context)) + HOST_SLACK_BYTES

    def options(self, variant: Variant, context: int) -> dict[str, Any]:
        """The `offload()` options of an offload variant at `context`."""
        return {**self.given, **variant.options, "device_budget": self.device_budget(context),
                "host_budget": self.host_budget(context)}

    def prompt(self, context: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + context)
        ids = torch.randint(0, self.model.config.vocab_size, (self.batch, context), generator=generator)
        return ids.to(self.device)

    def measure(self, variant: Variant, context: int) -> Sample:
        """One measurement; raises on failure (the caller records it)."""
        prompt = self.prompt(context)
        cuda = self.device.type == "cuda"
        if cuda:
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        if variant.method.startswith("offload-"):
            sample = self._measure_offload(variant, context, prompt)
        else:
            sample = self._measure_hf(variant, context, prompt)
        if cuda:
            sample.peak_device_alloc_bytes = torch.cuda.max_memory_allocated(self.device) - base
        return sample

    def _measure_hf(self, variant: Variant, context: int, prompt: torch.Tensor) -> Sample:
        from transformers import DynamicCache

        n = self.args.new_tokens
        if variant.method == "hf-offloaded":
            cache = _offloaded_dynamic_cache(self.model.config)
        else:
            cache = DynamicCache(config=self.model.config)
        try:
            prefill_s, decode_s = prefill_and_decode(self.model, cache, prompt, n, self.args.prefill_chunk)
        finally:
            del cache
        kv = self.kv_bytes(context)
        sample = Sample(prefill_s, decode_s)
        if variant.method == "dynamic":
            sample.peak_device_kv_bytes, sample.peak_host_bytes = kv, 0
            sample.bytes_moved_per_token = {pair: 0.0 for pair in PAIRS}
        else:
            # Step i (0-based) prefetches context + i tokens and offloads context + i + 1 (see the module NOTE).
            # On the device: the layer being updated plus the one being prefetched.
            layers = self.model.config.num_hidden_layers
            sample.peak_device_kv_bytes, sample.peak_host_bytes = math.ceil(2 * kv / layers), kv
            sample.bytes_moved_per_token = {
                "host->device": (context + (n - 1) / 2) * self.per_token,
                "device->host": (context + (n + 1) / 2) * self.per_token,
                "host->disk": 0.0,
                "disk->host": 0.0,
            }
        return sample

    def _measure_offload(self, variant: Variant, context: int, prompt: torch.Tensor) -> Sample:
        from offload import offload

        options = self.options(variant, context)
        n = self.args.new_tokens
        snapshots: list[dict] = []
        t0 = time.perf_counter()
        with offload(self.model, **options) as rt:
            setup_s = time.perf_counter() - t0
            cache = rt.cache()
            if hasattr(rt, "expect_tokens"):  # fails fast, before the prefill, when the budgets can't hold the KV
                rt.expect_tokens(context + n, batch=[context + n] * self.batch)
            prefill_s, decode_s = prefill_and_decode(self.model, cache, prompt, n, self.args.prefill_chunk,
                                                     after_prefill=lambda: snapshots.append(rt.stats()))
            after = rt.stats()
            del cache
        before = snapshots[0]
        moved = {pair: (after["bytes_moved"].get(pair, 0) - before["bytes_moved"].get(pair, 0)) / n
                 for pair in PAIRS}
        stall = after.get("stall_seconds", 0.0) - before.get("stall_seconds", 0.0)
        return Sample(
            prefill_s, decode_s,
            peak_device_kv_bytes=after["peak_resident_bytes"]["device"],
            peak_host_bytes=after["peak_resident_bytes"]["host"],
            bytes_moved_per_token=moved,
            stall_fraction=stall / decode_s if decode_s > 0 else None,
            attended_fraction=after.get("attended_fraction"),
            setup_seconds=setup_s,
        )


def _offloaded_dynamic_cache(config: Any) -> Any:
    """transformers' layer-offloading DynamicCache (`cache_implementation="offloaded"` builds the same)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config, offloading=True)
    except TypeError:  # versions whose DynamicCache takes no config
        return DynamicCache(offloading=True)


# ---- rows --------------------------------------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _max(values: Sequence[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def make_row(variant: Variant, context: int, bench: Bench, samples: list[Sample], note: dict[str, str]) -> dict:
    n = bench.args.new_tokens
    row: dict[str, Any] = {
        "method": variant.label, "base_method": variant.method, "context": context, "batch": bench.batch,
        "new_tokens": n,
        "device": str(bench.device), "repeats": len(samples),
        "prefill_seconds": None, "decode_seconds": None, "decode_tokens_per_s": None, "decode_tokens_per_s_all": [],
        "peak_device_kv_bytes": None, "peak_device_alloc_bytes": None, "peak_host_bytes": None,
        "bytes_moved_per_token": None, "stall_fraction": None, "attended_fraction": None, "setup_seconds": None,
        "kv_bytes": bench.kv_bytes(context), "device_budget_bytes": None, "host_budget_bytes": None,
        "exact_bound_tokens_per_s": None, "pct_of_pcie_bound": None,
        "speedup_vs_dynamic": None, "speedup_vs_hf_offloaded": None, "speedup_vs_batch_1": None,
        "error": note.get("error"), "skipped": note.get("skipped"),
    }
    if variant.method.startswith("offload-"):
        config = OffloadConfig(**bench.options(variant, context))
        row.update(device_budget_bytes=config.device_budget_bytes, host_budget_bytes=config.host_budget_bytes,
                   attention=config.attention, prefetch=config.prefetch, eviction=config.eviction,
                   page_size=config.page_size, kv_quant=config.kv_quant)
        if config.attention == "sparse":
            row.update(token_budget=config.token_budget_for(context), selection=config.selection)
    if not samples:
        return row
    tps = [bench.batch * n / s.decode_seconds for s in samples]  # tokens of every sequence
    row.update(
        prefill_seconds=_median([s.prefill_seconds for s in samples]),
        decode_seconds=_median([s.decode_seconds for s in samples]),
        decode_tokens_per_s=_median(tps),
        decode_tokens_per_s_all=tps,
        peak_device_kv_bytes=_max([s.peak_device_kv_bytes for s in samples]),
        peak_device_alloc_bytes=_max([s.peak_device_alloc_bytes for s in samples]),
        peak_host_bytes=_max([s.peak_host_bytes for s in samples]),
        bytes_moved_per_token={p: _median([s.bytes_moved_per_token.get(p) for s in samples]) for p in PAIRS},
        stall_fraction=_median([s.stall_fraction for s in samples]),
        attended_fraction=_median([s.attended_fraction for s in samples]),
        setup_seconds=_median([s.setup_seconds for s in samples]),
    )
    return row


def add_comparisons(rows: list[dict], bounds: dict[tuple[int, int], float | None]) -> None:
    """Fills speedup_vs_dynamic, speedup_vs_hf_offloaded and the offload-exact bound fields, per context and batch,
    and speedup_vs_batch_1: against the same method at the same context with one sequence."""
    for row in rows:
        key = (row["context"], row.get("batch", 1))
        ref = {r["method"]: r["decode_tokens_per_s"] for r in rows if (r["context"], r.get("batch", 1)) == key}
        tps = row["decode_tokens_per_s"]
        if tps is None:
            continue
        single = [r["decode_tokens_per_s"] for r in rows if r["method"] == row["method"]
                  and r["context"] == row["context"] and r.get("batch", 1) == 1]
        if key[1] != 1 and single and single[0]:
            row["speedup_vs_batch_1"] = tps / single[0]
        for field, method in (("speedup_vs_dynamic", "dynamic"), ("speedup_vs_hf_offloaded", "hf-offloaded")):
            if row["method"] != method and ref.get(method):
                row[field] = tps / ref[method]
        if row["method"] == "offload-exact" or row["method"].startswith("offload-exact+host_attention="):
            bound = bounds.get(key)  # the same bytes cross at full precision
            row["exact_bound_tokens_per_s"] = bound
            row["pct_of_pcie_bound"] = None if bound is None else 100.0 * tps / bound


# ---- report ------------------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except Exception:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    cuda = device.type == "cuda"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def _finite(value: Any) -> Any:
    """JSON-safe: inf/nan floats become None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(path: str, result: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_finite(result), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return format_size(value)
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "s":
        return f"{value:.3f}"
    if kind == "tps":
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    if kind == "pct100":
        return f"{value:.3g}%"
    return str(value)


TABLE_COLUMNS = (
    ("method", "method", "str"), ("context", "context", "str"), ("batch", "batch", "str"),
    ("prefill s", "prefill_seconds", "s"),
    ("decode tok/s", "decode_tokens_per_s", "tps"), ("peak dev KV", "peak_device_kv_bytes", "bytes"),
    ("peak host", "peak_host_bytes", "bytes"), ("H2D/tok", ("bytes_moved_per_token", "host->device"), "bytes"),
    ("D2H/tok", ("bytes_moved_per_token", "device->host"), "bytes"), ("stall", "stall_fraction", "pct"),
    ("% bound", "pct_of_pcie_bound", "pct100"), ("vs dynamic", "speedup_vs_dynamic", "x"),
    ("vs hf-off", "speedup_vs_hf_offloaded", "x"), ("vs batch 1", "speedup_vs_batch_1", "x"),
)


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table; an error or skip note ends the line."""
    header = [title for title, _, _ in TABLE_COLUMNS]
    lines = []
    for row in rows:
        cells = []
        for _, key, kind in TABLE_COLUMNS:
            value = (row.get(key[0]) or {}).get(key[1]) if isinstance(key, tuple) else row.get(key)
            cells.append(_fmt(value, kind))
        note = row.get("error") or row.get("skipped")
        lines.append((cells, f"  [{'error' if row.get('error') else 'skipped'}: {note}]" if note else ""))
    widths = [max([len(header[i])] + [len(c[i]) for c, _ in lines]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(c) + note for c, note in lines])


def plot(rows: list[dict], path: str, title: str) -> None:
    """Writes a PNG of decode tokens/s per context, one line per method (and batch size, when several)."""
    fig = plot_figure(rows, title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_figure(rows: list[dict], title: str) -> Any:
    """The figure `plot` saves: every context labelled on the x axis, and at least three labelled values on the y
    axis whatever the range (a log axis over less than a decade would otherwise show one label, or none)."""
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure, not pyplot: no global backend switch and no figure registry.
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    values: list[float] = []
    several = len({r.get("batch", 1) for r in rows}) > 1
    for line in dict.fromkeys((r["method"], r.get("batch", 1)) for r in rows):
        points = sorted((r["context"], r["decode_tokens_per_s"]) for r in rows
                        if (r["method"], r.get("batch", 1)) == line and r["decode_tokens_per_s"] is not None)
        label = f"{line[0]}, batch {line[1]}" if several else line[0]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            values += [p[1] for p in points]
    contexts = sorted({r["context"] for r in rows})
    if len(contexts) > 1:
        ax.set_xscale("log", base=2)  # contexts usually double; equal steps read better
    ax.set_xticks(contexts, [_context_label(c) for c in contexts])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) >= 3:
        ax.set_yscale("log")
        lo, hi = min(positive) / 1.1, max(positive) * 1.1
        ax.set_ylim(lo, hi)
        ax.set_yticks(_log_ticks(lo, hi), [f"{t:.3g}" for t in _log_ticks(lo, hi)])
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    else:  # less than a factor 3 apart: a linear axis with round ticks
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=6, min_n_ticks=3))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:.3g}"))
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return fig


def _context_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _log_ticks(lo: float, hi: float, least: int = 4) -> list[float]:
    """Round values in [lo, hi] for a log axis: 1-2-5 per decade, denser when the range is too narrow for `least`
    of them."""
    ladders = ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8), (1, 1.2, 1.4, 1.6, 1.8, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 9))
    ticks: list[float] = []
    for ladder in ladders:
        ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in ladder if lo <= m * 10.0**e <= hi]
        if len(ticks) >= least:
            break
    return ticks


# ---- the command -------------------------------------------------------------------------------------------------


def _note_for(exc: BaseException) -> str:
    if isinstance(exc, OOM_ERRORS):
        return "out of memory"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def run(args: argparse.Namespace) -> int:
    contexts, variants = _check_args(args)
    started = time.perf_counter()
    model, model_name = _load_model(args)
    check_positions(contexts, args.new_tokens, getattr(model.config, "max_position_embeddings", None))
    bench = Bench(model, args)
    device = bench.device
    bandwidth = measure_h2d_bandwidth(device)
    batches = parse_batches(args.batch)
    bounds = {}
    for c in contexts:
        for b in batches:
            bench.batch = b  # a step moves the batch's KV beyond the device budget, for b tokens
            bound = exact_offload_bound(max(0, bench.kv_bytes(c) - bench.device_budget(c)), bandwidth)
            bounds[(c, b)] = None if bound is None else b * bound
    result: dict[str, Any] = {
        "command": shlex.join(["offload"] + sys.argv[1:]) if _invoked_as_cli() else shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "model": model_name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(device), "layers": model.config.num_hidden_layers,
        "kv_bytes_per_token": bench.per_token, "contexts": contexts, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "methods": [v.label for v in variants],
        "runtime_options": {k: v for k, v in bench.given.items()},
        "kv_device_fraction": None if "device_budget" in bench.given else args.kv_device_fraction,
        "h2d_bandwidth_bytes_per_s": bandwidth,
        "batches": batches,
        # Keyed by context ("4096"), or by context and batch ("4096x4") for batches above 1.
        "exact_bound_tokens_per_s": {str(c) if b == 1 else f"{c}x{b}": v for (c, b), v in bounds.items()},
        "rows": [],
    }
    _warm_up(bench)
    for context, batch in ((c, b) for c in contexts for b in batches):
        bench.batch = batch
        samples: dict[str, list[Sample]] = {v.label: [] for v in variants}
        notes: dict[str, dict[str, str]] = {v.label: {} for v in variants}
        for v in variants:
            if v.method == "hf-offloaded" and device.type != "cuda":
                notes[v.label]["skipped"] = HF_OFFLOADED_CPU_NOTE
        for r in range(args.repeats):
            for v in variants:
                if notes[v.label]:
                    continue
                if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
                    if not samples[v.label]:
                        notes[v.label]["skipped"] = f"time limit of {args.time_limit:g} s reached"
                    continue
                try:
                    sample = bench.measure(v, context)
                    samples[v.label].append(sample)
                    tps = batch * args.new_tokens / sample.decode_seconds
                    _progress(f"{v.label}, context {context}, batch {batch}, repeat {r + 1}/{args.repeats}: prefill "
                              f"{sample.prefill_seconds:.2f} s, decode {tps:.3g} tok/s")
                except Exception as exc:  # a failed row is a result; the others still run
                    # Budget errors and out-of-memory are outcomes (one line); anything else may be a bug.
                    expected = isinstance(exc, (ValueError, *OOM_ERRORS))
                    log.warning("bench: %s at context %d, batch %d failed: %s", v.label, context, batch,
                                _note_for(exc), exc_info=not expected)
                    notes[v.label]["error"] = _note_for(exc)
                    samples[v.label].clear()
                finally:
                    _free(device)
        result["rows"].extend(make_row(v, context, bench, samples[v.label], notes[v.label]) for v in variants)
        add_comparisons(result["rows"], bounds)
        if args.out:
            write_json(args.out, result)
    result["total_seconds"] = time.perf_counter() - started
    if args.out:
        write_json(args.out, result)
    print(f"{model_name} ({result['dtype']}) on {device}, {args.new_tokens} new tokens, median of "
          f"{args.repeats}; link bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(format_table(result["rows"]))
    if args.plot:
        plot(result["rows"], args.plot, f"{model_name} on {result['machine']['gpu'] or 'CPU'}")
    return 0


def _progress(text: str) -> None:
    """One line per finished run on stderr: a long benchmark shows it is alive (stdout gets the table)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _invoked_as_cli() -> bool:
    return os.path.basename(sys.argv[0]) in ("offload", "cli.py") or sys.argv[0].endswith("offload/cli.py")


def _warm_up(bench: Bench) -> None:
    """One short untimed dynamic run: kernels, allocator pools and lazy CUDA init are not charged to the first row."""
    from transformers import DynamicCache

    prompt = bench.prompt(min(128, bench.model.config.max_position_embeddings - 4))
    prefill_and_decode(bench.model, DynamicCache(config=bench.model.config), prompt, 2, 0)
    _free(bench.device)
