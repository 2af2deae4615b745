"""`offload profile`: `offload generate` with the timeline recorded, then a report of where time and bytes went.

    offload profile --prompt-file examples/long_context.txt --device-budget 8MiB --host-budget 32MiB \
        --disk-dir /tmp/offload-kv --max-new-tokens 64 --out out/profile

Writes into --out:
- trace.json    Chrome trace-event JSON: open it in https://ui.perfetto.dev or chrome://tracing;
- summary.json  bytes and bandwidth per tier pair, compute/transfer/stall/overlap time, per-layer stall,
                prefetch accuracy and share of loads prefetched, occupancy per tier, and the runtime's raw stats
                (`offload.report.summarize`);
- summary.md    the same as Markdown tables;
- timeline.png  occupancy, bandwidth, a lane chart of compute/transfers/stalls, and the sampled host and GPU
                counters, on one time axis.

stdout carries only the summary tables, so `offload profile ... > summary.txt` keeps them; the generated text,
the progress bar and the list of files written go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from tools.common import (
    add_model_options,
    add_prompt_options,
    add_runtime_options,
    config_from_args,
    encode_prompt,
    generate_from_args,
    load,
    read_prompt,
)

HELP = "generate with the timeline recorded and write a trace, a summary and a timeline picture"
OUTPUTS = ("trace.json", "summary.json", "summary.md", "timeline.png")
MAX_SAMPLE_INTERVAL = 3600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_options(parser)
    group = parser.add_argument_group("profile options")
    group.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        help=f"directory for {', '.join(OUTPUTS)} (created if missing; files there are overwritten)",
    )
    group.add_argument(
        "--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate at most (default: 128)"
    )
    group.add_argument(
        "--prefill-chunk", type=int, default=512, metavar="N", help="prompt tokens per forward pass (default: 512)"
    )
    group.add_argument(
        "--sample-interval",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="how often host RSS, disk I/O and (on CUDA) GPU memory and PCIe throughput are sampled (default: 0.05)",
    )
    group.add_argument("--quiet", action="store_true", help="do not echo the generated text to stderr")
    group.add_argument("--no-progress", action="store_true", help="no progress bars (prefill, model loading)")
    add_model_options(parser)
    add_runtime_options(parser)
    parser.epilog = (
        "stdout gets only the summary tables; the generated text, the progress bar and the file list go to stderr. "
        "The runtime's --trace is always on here."
    )


def prepare_out(path: str) -> str:
    """Creates --out if needed and returns its absolute path; ValueError("out: ...") when it cannot be used."""
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {path} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a parent that is a regular file, no permission, a read-only filesystem
        raise ValueError(f"out: cannot create the directory {path}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"out: the directory {path} is not writable")
    return out


def _budgets(stats: dict[str, Any], config: Any) -> dict[str, Any]:
    """The tier budgets for the picture: the runtime's own (stats["budgets"]) or, failing that, the flags'."""
    if stats.get("budgets"):
        return stats
    budgets = {tier: getattr(config, f"{tier}_budget_bytes", None) for tier in ("device", "host", "disk")}
    budgets = {tier: b for tier, b in budgets.items() if b is not None}
    return {**stats, "budgets": budgets} if budgets else stats


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first, so a typo fails in a second.
    if args.max_new_tokens < 1:
        raise ValueError(f"max-new-tokens: expected an int >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk < 1:
        raise ValueError(f"prefill-chunk: expected an int >= 1, got {args.prefill_chunk}")
    if not 0 < args.sample_interval <= MAX_SAMPLE_INTERVAL:  # the sampler's thread can't wait for inf seconds
        raise ValueError(f"sample-interval: expected seconds > 0 and at most {MAX_SAMPLE_INTERVAL}, "
                         f"got {args.sample_interval}")
    prompt = read_prompt(args)
    config = dataclasses.replace(config_from_args(args), trace=True)
    out = prepare_out(args.out)  # after the checks: a run that fails them creates nothing

    from offload import offload
    from offload.report import plot_timeline, summarize, summary_markdown
    from offload.sampler import Sampler

    model, tokenizer = load(args)
    input_ids = encode_prompt(tokenizer, prompt, chat=not args.no_chat_template)

    def write(piece: str) -> None:
        if not args.quiet:
            sys.stderr.write(piece)
            sys.stderr.flush()

    with offload(model, config=config) as rt:
        tracer = rt.tracer
        if tracer is None:
            raise RuntimeError("profile: the runtime recorded no trace although trace=True")
        with Sampler(tracer, interval=args.sample_interval):
            generate_from_args(model, tokenizer, rt, input_ids, args, write)
        write("\n")
        stats = rt.stats()

    # After the runtime closed, so the trace also holds what it recorded while shutting down.
    tracer.save(os.path.join(out, "trace.json"))
    summary = summarize(stats, tracer)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    markdown = summary_markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown)
    plot_timeline(tracer, os.path.join(out, "timeline.png"), _budgets(summary["stats"], config))
    print(f"wrote {', '.join(os.path.join(out, name) for name in OUTPUTS)}", file=sys.stderr)
    sys.stdout.write(markdown)
    return 0
