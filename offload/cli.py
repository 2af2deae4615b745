"""The `offload` command: `offload generate | profile | bench [options]`.

Each subcommand is a module of the `tools` package with `add_arguments(parser)` and `run(args) -> int`. Only the
chosen one is imported, so a subcommand whose module is missing or broken is still listed and fails alone, with
a one-line error.

Exit codes: 0 success; 2 a bad argument or input (one line on stderr: `offload: error: <message>`, no
traceback; argparse's usage errors also exit 2); 130 interrupted (the runtime's context manager has removed its
disk files on the way out).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

PROG = "offload"
COMMANDS: dict[str, str] = {
    "generate": "generate text with the KV cache offloaded to device, host and disk",
    "profile": "run a generation with tracing on and report where the time and bytes went",
    "bench": "measure throughput and memory over contexts, budgets and policies",
}

Runner = Callable[[argparse.Namespace], int]


def _import_command(name: str) -> tuple[ModuleType | None, str]:
    """The subcommand's module, or None and why it can't be used."""
    try:
        module = importlib.import_module(f"tools.{name}")
    except Exception as exc:  # a missing or broken subcommand must not take the others down
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    missing = [attr for attr in ("add_arguments", "run") if not callable(getattr(module, attr, None))]
    if missing:
        return None, f"tools.{name} has no {' or '.join(missing)}"
    return module, ""


def _unavailable(name: str, reason: str) -> Runner:
    def run(args: argparse.Namespace) -> int:
        raise ValueError(f"{name}: this subcommand is not available ({reason})")

    return run


def _chosen_command(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("offload")
    except Exception:
        return "unknown"


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, with the subcommand named in `argv` (if any) fully set up; returns it and the subparsers."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Long-context LLM inference with the KV cache paged over device, host and disk tiers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _chosen_command(argv)
    subparsers: dict[str, argparse.ArgumentParser] = {}
    for name, summary in COMMANDS.items():
        if name != chosen:  # never parsed: listed in --help only
            subparsers[name] = sub.add_parser(name, help=summary, description=summary)
            continue
        module, reason = _import_command(name)
        description = getattr(module, "HELP", summary)
        p = sub.add_parser(name, help=summary, description=description)
        if module is None:
            p.set_defaults(_run=_unavailable(name, reason), _ignore_extra=True)
        else:
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
        subparsers[name] = p
    return parser, subparsers


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Maps "device_budget" and "device-budget" to "--device-budget" for every long flag of `parser`."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                flags[option[2:]] = option
                flags[action.dest] = option
    return flags


def error_line(exc: BaseException, parser: argparse.ArgumentParser | None) -> str:
    """The exception's message on one line; a leading "name:" that is a flag is written as the flag."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name, sep, rest = text.partition(":")
    if sep and parser is not None:
        flag = _flags(parser).get(name.strip())
        if flag:
            text = flag + ":" + rest
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    subparser: argparse.ArgumentParser | None = None
    try:
        parser, subparsers = build_parser(argv)
        try:
            args, extra = parser.parse_known_args(argv)
            subparser = subparsers.get(args.command)
            if extra and not getattr(args, "_ignore_extra", False):
                (subparser or parser).error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as exc:  # --help, --version and usage errors
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        _flush_stdout()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout was closed early (e.g. `| head`): stop quietly, and keep Python from complaining at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except (ValueError, OSError) as exc:
        _flush_stdout()
        print(f"{PROG}: error: {error_line(exc, subparser)}", file=sys.stderr)
        return 2


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
