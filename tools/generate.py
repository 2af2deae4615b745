"""`offload generate`: greedy generation with the KV cache in the runtime's tiers, streaming text to stdout.

    offload generate --prompt-file examples/long_context.txt --device-budget 8MiB --host-budget 32MiB \
        --disk-dir /tmp/offload-kv --max-new-tokens 64 --stats

The text goes to stdout as it is produced; the prefill progress bar and `--stats` go to stderr. `--trace` (or
`--trace-file PATH`) saves the runtime's timeline as Chrome trace-event JSON, named on stderr at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from tools.common import (
    add_model_options,
    add_prompt_options,
    add_runtime_options,
    config_from_args,
    encode_prompt,
    format_stats_table,
    generate_from_args,
    load,
    read_prompt,
)

HELP = "generate text with the KV cache offloaded to device, host and disk"
DEFAULT_TRACE_FILE = "offload-trace.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prompt_options(parser)
    group = parser.add_argument_group("generation options")
    group.add_argument(
        "--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate at most (default: 128)"
    )
    group.add_argument(
        "--prefill-chunk", type=int, default=512, metavar="N", help="prompt tokens per forward pass (default: 512)"
    )
    group.add_argument("--stats", action="store_true", help="print the runtime's statistics to stderr at the end")
    group.add_argument("--no-progress", action="store_true", help="no progress bars (prefill, model loading)")
    group.add_argument(
        "--trace-file", metavar="PATH", default=None,
        help=f"record the timeline (implies --trace) and save it here as Chrome trace-event JSON, for Perfetto or "
        f"chrome://tracing (--trace alone saves to ./{DEFAULT_TRACE_FILE}; `offload profile` also writes a "
        "summary and a picture)",
    )
    add_model_options(parser)
    add_runtime_options(parser)


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first, so a typo fails in a second.
    if args.max_new_tokens < 1:
        raise ValueError(f"max-new-tokens: expected an int >= 1, got {args.max_new_tokens}")
    if args.prefill_chunk < 1:
        raise ValueError(f"prefill-chunk: expected an int >= 1, got {args.prefill_chunk}")
    prompt = read_prompt(args)
    config = config_from_args(args)
    trace_path = None
    if args.trace_file is not None or config.trace:
        trace_path = check_trace_file(args.trace_file or DEFAULT_TRACE_FILE)
        config = dataclasses.replace(config, trace=True)

    from offload import offload

    model, tokenizer = load(args)
    input_ids = encode_prompt(tokenizer, prompt, chat=not args.no_chat_template)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    with offload(model, config=config) as rt:
        generate_from_args(model, tokenizer, rt, input_ids, args, write)
        write("\n")
        stats = rt.stats()
        tracer = rt.tracer
    if args.stats:
        print(format_stats_table(stats), file=sys.stderr)
    if trace_path is not None and tracer is not None:
        # After the runtime closed, so the trace also holds what it recorded while shutting down.
        try:
            tracer.save(trace_path)
        except OSError as e:  # a full disk, or a file the checks before the run couldn't foresee
            raise ValueError(f"trace-file: can't write {trace_path}: {e.strerror or e}") from None
        print(f"offload: trace written to {trace_path} (open it in https://ui.perfetto.dev or chrome://tracing)",
              file=sys.stderr)
    return 0


def check_trace_file(path: str) -> str:
    """The absolute path to save the trace to; ValueError("trace-file: ...") when it can't be written there."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"trace-file: {path} is a directory; give a file path such as {DEFAULT_TRACE_FILE}")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise ValueError(f"trace-file: the directory of {path} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise ValueError(f"trace-file: {path} is not writable")
    return full
