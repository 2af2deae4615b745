"""What the subcommands share: the runtime and model flags, reading the prompt, loading the model, a streaming
greedy generation loop over a runtime's cache, and a text table of `Runtime.stats()`.

The runtime flags are derived from `OffloadConfig`'s fields, so a new field gets a flag (`--new-field`)
without touching this file: bool fields become `store_true`, fields that accept a string take text, and numeric
fields are parsed as numbers. Every flag defaults to None, meaning "keep OffloadConfig's default".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

from offload.config import OffloadConfig
from offload.sizes import format_size

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Help for the known options; a field missing here still gets a flag, with a generic help text.
OPTION_HELP: dict[str, str] = {
    "device_budget": "bytes of KV cache on the compute device, e.g. 512MiB or 2GB (default: from free memory)",
    "host_budget": "bytes of KV cache in host RAM, e.g. 4GiB (default: from free memory)",
    "disk_budget": "bytes of KV cache in --disk-dir (default: from free space)",
    "disk_dir": "directory for the disk tier; its page files are removed on exit (default: no disk tier)",
    "page_size": "tokens per KV page",
    "attention": "exact: attend over every page; sparse: over the sink tokens, the recent window and the "
    "top-scoring pages",
    "token_budget": "sparse mode: tokens attended per layer per decode step, an int number of tokens (512) or "
    "a fraction of the context (0.1)",
    "prefetch": "prefetch policy",
    "eviction": "eviction policy",
    "selection": "sparse mode: how blocks are scored for selection",
    "sink_tokens": "sparse mode: tokens at the start that are always attended (attention sinks)",
    "recent_tokens": "sparse mode: most recent tokens that are always attended",
    "dense_layers": "sparse mode: the first layers attend to every page",
    "select_block": "sparse mode: tokens per selection block, a divisor of --page-size (default: 8 where it "
    "divides the page size, else the page size)",
    "head_selection": "sparse mode: who chooses the blocks: kv (each KV head), query (each query head) or shared "
    "(one set for all heads)",
    "history": "sparse mode: weight in [0, 1) of each block's decayed attention history in its score",
    "block_cache": "sparse mode: share in [0, 1) of the device budget kept as a cache of the blocks steps read "
    "from host RAM, so the next steps choosing them read them on the device (default: 0, none)",
    "kv_quant": "store pages below the device quantized (k8v4: 8-bit keys, 4-bit values); attention is then no "
    "longer bit-exact",
    "measure_recall": "sparse mode: also compute dense attention and report the attention mass the selected "
    "blocks covered",
    "trace": "record a timeline of transfers, compute and stalls; generate saves it as Chrome trace JSON (see "
    "--trace-file)",
    "io_threads": "threads for disk I/O (and for host copies when the device is the CPU)",
    "io_timeout": "seconds one page transfer may take before the run stops with an error",
    "io_engine": "how the disk tier moves pages: threads (a pool of --io-threads threads; the default) or aio "
    "(Linux native AIO, a request's calls all in flight at once; needs O_DIRECT)",
    "load_buffers": "buffers of the load ring through which pages below the device reach attention, 2 to 16; "
    "more keep more reads in flight ahead of use (default: 4 with --disk-dir, else 2)",
    "host_attention": "attend over pages in host RAM (and pages read from disk) on the host's cores and merge the "
    "partial results: auto (a cost model from measured link and host rates decides per layer), all, or off",
    "device": "compute device, e.g. cuda, cuda:1 or cpu (default: cuda if available, else cpu)",
    "prefix_cache": "keep the KV of prompt pages in this directory or Valkey/Redis server (redis://host:port/db), "
    "and load the longest stored prefix of later prompts instead of computing it (default: none)",
    "prefix_cache_budget": "bytes the prefix store may hold, least recently used entries evicted first (default: "
    "4GiB for a directory; a server keeps its own maxmemory)",
    "prefix_cache_publish": "what goes to the prefix store: prompt (the prompt's full pages) or all (generated "
    "tokens' pages too)",
    "prefix_cache_timeout": "seconds a prefix cache server may take to connect or answer before it counts as "
    "unreachable (the pages are then computed)",
}
METAVARS: dict[str, str] = {
    "device_budget": "SIZE",
    "host_budget": "SIZE",
    "disk_budget": "SIZE",
    "disk_dir": "DIR",
    "token_budget": "N|FRACTION",
    "select_block": "TOKENS",
    "head_selection": "MODE",
    "prefetch": "NAME",
    "eviction": "NAME",
    "selection": "NAME",
    "attention": "MODE",
    "kv_quant": "SETTING",
    "device": "DEVICE",
    "host_attention": "MODE",
    "prefix_cache": "DIR|URL",
    "prefix_cache_budget": "SIZE",
    "prefix_cache_publish": "WHAT",
    "io_timeout": "SECONDS",
    "block_cache": "SHARE",
    "io_engine": "ENGINE",
    "load_buffers": "N",
    "prefix_cache_timeout": "SECONDS",
}
# Options whose value is a name in one of the policy registries (listed in their help).
REGISTRY_OPTIONS = {"prefetch": "PREFETCH", "eviction": "EVICTION", "selection": "SELECTION"}


# ---- runtime options -------------------------------------------------------------------------------------------


def parse_token_budget(text: str) -> int | float:
    """'512' -> 512 tokens, '0.1' -> a fraction 0.1. The range is checked by OffloadConfig."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an int number of tokens (512) or a fraction of the context (0.1), got {text!r}"
        ) from None


def _float(text: str) -> float:
    # Not int first: a long string of digits would then reach the checks as an int too large for float().
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _value_types(annotation: Any) -> set[Any]:
    """The non-None members of an annotation such as `int | str | None`."""
    members = set(typing.get_args(annotation)) or {annotation}
    members.discard(type(None))
    return members


def _registered_names(option: str) -> list[str]:
    try:
        import policies

        return list(getattr(policies, REGISTRY_OPTIONS[option]).names())
    except Exception:  # the policies package is optional for --help
        return []


def _help(field: dataclasses.Field, members: set[Any]) -> str:
    text = OPTION_HELP.get(field.name, f"OffloadConfig.{field.name}")
    if field.name == "attention":
        from offload.config import ATTENTION_MODES

        text += f"; one of {', '.join(ATTENTION_MODES)}"
    if field.name == "kv_quant":
        from offload.quant import SETTINGS

        text += f"; one of {', '.join(SETTINGS)}"
    if field.name == "host_attention":
        from offload.config import HOST_ATTENTION

        text += f"; one of {', '.join(HOST_ATTENTION)}"
    if field.name in REGISTRY_OPTIONS:
        names = _registered_names(field.name)
        if names:
            text += f"; one of {', '.join(names)}"
    if members != {bool} and field.default is not None and "(default:" not in text:
        text += f" (default: {field.default})"
    return text.replace("%", "%%")


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per `OffloadConfig.option_names()`: `--device-budget`, `--disk-dir`, `--page-size`, ..."""
    group = parser.add_argument_group("runtime options", "see the README's Options table; unset flags keep defaults")
    hints = typing.get_type_hints(OffloadConfig)
    fields = {f.name: f for f in dataclasses.fields(OffloadConfig)}
    for name in OffloadConfig.option_names():
        field, members = fields[name], _value_types(hints[name])
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": _help(field, members)}
        if members == {bool}:
            kwargs["action"] = "store_true"
        else:
            if str in members:
                kwargs["type"] = str
            elif name == "token_budget":
                kwargs["type"] = parse_token_budget
            elif float in members:
                kwargs["type"] = _float
            elif int in members:
                kwargs["type"] = int
            else:
                kwargs["type"] = str
            kwargs["metavar"] = METAVARS.get(name, "N" if kwargs["type"] is int else name.upper())
        group.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> OffloadConfig:
    """The OffloadConfig of the flags that were given; raises ValueError naming a bad option."""
    options = {name: getattr(args, name, None) for name in OffloadConfig.option_names()}
    config = OffloadConfig(**{name: value for name, value in options.items() if value is not None})
    if config.disk_dir is not None:  # before the model loads (tens of seconds), like every other flag
        check_disk_dir_usable(config.disk_dir)
    return config


# ---- model and prompt ------------------------------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model options")
    group.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="transformers model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct GGUF)",
    )
    group.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="auto",
        help="weight and KV dtype (default: auto, the checkpoint's)",
    )


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompt options", "with neither flag, the prompt is read from stdin when it is "
                                      "not a terminal (`echo hi | offload generate`)")
    group.add_argument("--prompt", metavar="TEXT", default=None, help="the prompt text; - reads it from stdin")
    group.add_argument(
        "--prompt-file", metavar="PATH", default=None,
        help="read the prompt from this UTF-8 file, a pipe or - for stdin (wins over --prompt)",
    )
    group.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed the prompt as is; by default it is wrapped in the tokenizer's chat template when it has one",
    )


def _decode(data: bytes, name: str, source: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{name}: {source} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None
    if not text.strip():
        hint = "; pass --prompt TEXT or --prompt-file PATH, or pipe the prompt in" if source == "stdin" else ""
        raise ValueError(f"{name}: {source} is empty{hint}")
    return text


def _read_stdin(name: str, stdin: Any) -> str:
    if stdin is None:
        raise ValueError(f"{name}: - reads the prompt from stdin, but there is no stdin")
    try:
        raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read()
    except (OSError, ValueError) as e:  # closed, or not readable (e.g. under a test runner)
        raise ValueError(f"{name}: can't read the prompt from stdin ({e})") from None
    return _decode(raw.encode("utf-8") if isinstance(raw, str) else raw, name, "stdin")


def _read_prompt_file(path: str) -> str:
    # Not os.path.isfile: /dev/stdin, a pipe (`<(...)`, a FIFO) or a character device is a fine prompt source.
    if os.path.isdir(path):
        raise ValueError(f"prompt-file: {path} is a directory")
    if not os.path.exists(path):
        raise ValueError(f"prompt-file: {path} does not exist")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"prompt-file: {path} can't be read ({e.strerror or e})") from None
    return _decode(data, "prompt-file", path)


def read_prompt(args: argparse.Namespace, stdin: Any = None) -> str:
    """The prompt: --prompt-file (a path, or - for stdin) if given, else --prompt (- for stdin), else stdin when it
    is not a terminal. Raises ValueError naming the flag when none is usable. `stdin`: default sys.stdin."""
    stdin = sys.stdin if stdin is None else stdin
    path = getattr(args, "prompt_file", None)
    if path is not None:
        return _read_stdin("prompt-file", stdin) if path == "-" else _read_prompt_file(path)
    prompt = getattr(args, "prompt", None)
    if prompt == "-":
        return _read_stdin("prompt", stdin)
    if prompt is None:
        interactive = stdin is None or _isatty(stdin)
        if interactive:
            raise ValueError("prompt: no prompt given; pass --prompt TEXT, --prompt-file PATH, or pipe it on stdin")
        return _read_stdin("prompt", stdin)
    if not prompt.strip():
        raise ValueError("prompt: the prompt is empty; pass --prompt TEXT, --prompt-file PATH, or pipe it on stdin")
    return prompt


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (OSError, ValueError, AttributeError):
        return False


def check_disk_dir_usable(path: str) -> None:
    """Raises ValueError("disk_dir: ...") unless `path` is a writable directory or can be created as one. Creates
    nothing: it runs before the model loads, and a run that then fails must leave nothing behind."""
    full = os.path.abspath(path)
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise ValueError(f"disk_dir: {path} exists and is not a directory")
        if not os.access(full, os.W_OK | os.X_OK):
            raise ValueError(f"disk_dir: {path} is not writable")
        return
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"disk_dir: {path} can't be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"disk_dir: {path} can't be created: {parent} is not writable")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) from --model and --dtype, on --device (default: cuda if available, else cpu); with
    --no-progress, without loading progress bars."""
    from offload.models import load_model

    device = getattr(args, "device", None) or default_device()
    return load_model(getattr(args, "model", None), device=device, dtype=DTYPES[getattr(args, "dtype", "auto")],
                      progress=not getattr(args, "no_progress", False))


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids [1, n] of `prompt`, wrapped as one user turn in the tokenizer's chat template when `chat` and
    the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError("prompt: encodes to no tokens")
    return torch.tensor([ids], dtype=torch.long)


# ---- generation ------------------------------------------------------------------------------------------------


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end generation: the generation config's eos_token_id (an int or a list), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}


class TextStream:
    """Turns a growing list of token ids into text pieces, each emitted once, with merged tokens and multi-byte
    characters coming out right.

    NOTE: decoding a token alone can lose a leading space or split a UTF-8 character, so each step decodes the
    ids since `prefix` (the tokens before the last emitted piece, kept as context) and emits what is new past the
    context's text. A piece ending in U+FFFD is an incomplete character: it is held back until the next token
    completes it. This is "decode everything and emit the new suffix", windowed so a step costs O(1) tokens.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.prefix = 0  # ids[prefix:read] is context whose text was emitted already
        self.read = 0  # ids[read:] is not emitted yet

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def push(self, ids: Sequence[int], final: bool = False) -> None:
        context = self._decode(ids[self.prefix : self.read])
        text = self._decode(ids[self.prefix :])
        if len(text) > len(context) and (final or not text.endswith("\ufffd")):
            self.on_text(text[len(context) :])
            self.prefix, self.read = self.read, len(ids)


def check_positions(model: Any, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"prompt: {prompt_tokens} tokens plus max-new-tokens {max_new_tokens} exceed the model's maximum "
            f"of {limit} positions"
        )


@torch.no_grad()
def generate_from_args(model: Any, tokenizer: Any, rt: Any, input_ids: torch.Tensor, args: argparse.Namespace,
                       on_text: Callable[[str], None]) -> list[int]:
    """`generate_stream` with the generation flags shared by `generate` and `profile`."""
    return generate_stream(model, tokenizer, rt, input_ids, args.max_new_tokens, on_text=on_text,
                           prefill_chunk=args.prefill_chunk, progress=not args.no_progress)


def generate_stream(
    model: Any,
    tokenizer: Any,
    rt: Any,
    input_ids: torch.Tensor | Sequence[int],
    max_new_tokens: int,
    on_text: Callable[[str], None],
    prefill_chunk: int = 512,
    progress: bool = True,
) -> list[int]:
    """Greedy generation through `rt.cache(input_ids)`: prefills `input_ids` ([1, n] or [n]), past what the cache
    holds of them already (a prefix cache's pages), in chunks of `prefill_chunk` tokens (a tqdm bar on stderr),
    then decodes one token per step, calling `on_text(piece)` with each new piece
    of text, until `max_new_tokens` tokens or an EOS token. Returns the generated ids (without the EOS)."""
    from offload.cache import CACHE_KWARG  # transformers: imported when there is a model to run

    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected one sequence, shape [1, n], got {tuple(ids.shape)}")
    n = ids.shape[1]
    if n == 0:
        raise ValueError("prompt: encodes to no tokens")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max-new-tokens: expected an int >= 1, got {max_new_tokens!r}")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill-chunk: expected an int >= 1, got {prefill_chunk!r}")
    check_positions(model, n, max_new_tokens)
    expect_tokens = getattr(rt, "expect_tokens", None)
    if callable(expect_tokens):  # the runtime's budget check: fail now, not after minutes of prefill
        expect_tokens(n + max_new_tokens)

    device = model.device
    # With the ids, the runtime loads what a prefix cache holds of them: only the rest is computed.
    cache = rt.cache(ids)
    held = cache.get_seq_length()
    ids = ids.to(device)
    logits: torch.Tensor | None = None
    with tqdm(total=n, initial=held, unit="tok", desc="prefill", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        for start in range(held, n, prefill_chunk):
            chunk = ids[:, start : start + prefill_chunk]
            # logits_to_keep=1: only the last position's logits are needed, not [chunk, vocab].
            out = model(input_ids=chunk, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1]
            bar.update(chunk.shape[1])
    assert logits is not None

    eos = eos_token_ids(model, tokenizer)
    stream = TextStream(tokenizer, on_text)
    generated: list[int] = []
    next_id = int(logits.argmax())
    while next_id not in eos:
        generated.append(next_id)
        stream.push(generated)
        if len(generated) >= max_new_tokens:
            break
        step = torch.tensor([[next_id]], dtype=torch.long, device=device)
        out = model(input_ids=step, **{CACHE_KWARG: cache}, use_cache=True)
        next_id = int(out.logits[0, -1].argmax())
    stream.push(generated, final=True)
    return generated


# ---- stats -----------------------------------------------------------------------------------------------------


def flatten_stats(stats: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """("bytes_moved host->device", 123), ... : nested dicts flattened with their keys joined by a space."""
    for key, value in stats.items():
        name = f"{prefix} {key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from flatten_stats(value, name)
        else:
            yield name, value


def _is_bytes(name: str) -> bool:
    # "kv_bytes", "resident_bytes host", "budgets disk" (the tier budgets, in bytes)
    return "bytes" in name or name.split(" ")[0] == "budgets"


def format_stat(name: str, value: Any) -> str:
    """One value for people: sizes in KiB/MiB/..., seconds with a unit, fractions as percentages, and a list of
    numbers (e.g. one per layer) as its count, mean and maximum."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if _is_bytes(name):
            return format_size(value)
        if "seconds" in name:
            return f"{value:.3f} s"
        if "fraction" in name:
            return f"{100 * value:.1f}%"
        if isinstance(value, int):
            return f"{value:,}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        mean = sum(value) / len(value)
        return f"{len(value)} values: mean {format_stat(name, mean)}, max {format_stat(name, max(value))}"
    return str(value)


def format_stats_table(stats: Mapping[str, Any]) -> str:
    """`Runtime.stats()` as an aligned two-column text table, one row per (flattened) entry, plus the two prefetch
    ratios (`offload.report.prefetch_ratios`) after the prefetch counts."""
    rows: list[tuple[str, str]] = []
    for name, value in flatten_stats(stats):
        rows.append((name, format_stat(name, value)))
        if name == "prefetch hits" and isinstance(stats.get("prefetch"), Mapping):
            from offload.report import prefetch_ratios

            ratios = prefetch_ratios(stats["prefetch"], stats.get("loads"))
            rows.append(("prefetch accuracy (hits/issued)", format_stat("fraction", ratios["accuracy"])))
            rows.append(("prefetch share of loads prefetched", format_stat("fraction", ratios["prefetched_share"])))
    if not rows:
        return "(no stats)"
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    return "\n".join(f"{name:<{width}}  {value:>{value_width}}" for name, value in rows)
