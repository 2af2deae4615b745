"""The `offload` command: `offload generate | profile | bench | cache [options]`.

Each subcommand is a module of the `tools` package with `add_arguments(parser)` and `run(args) -> int`. Only the
chosen one is imported, so a subcommand whose module is missing or broken is still listed and fails alone, with
a one-line error.

Exit codes: 0 success; 2 a bad argument or input (one line on stderr: `offload: error: <message>`, no
traceback; argparse's usage errors also exit 2); 130 interrupted by Ctrl-C, 143 by SIGTERM, 129 by SIGHUP
(128 + the signal's number; the runtime's context manager has removed its disk files on the way out).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

PROG = "offload"
COMMANDS: dict[str, str] = {
    "generate": "generate text with the KV cache offloaded to device, host and disk",
    "profile": "run a generation with tracing on and report where the time and bytes went",
    "bench": "measure throughput and memory over contexts, budgets and policies",
    "cache": "inspect or empty a prefix cache store",
}

Runner = Callable[[argparse.Namespace], int]
# Signals that stop a run the way Ctrl-C does: `timeout`, `kill`, container stops, systemd and Slurm send SIGTERM;
# closing the terminal sends SIGHUP.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGHUP. A KeyboardInterrupt, so that everything that cleans up
    after Ctrl-C (the runtime's context manager removes its disk files) does the same here."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise `Terminated` in the main thread; the handlers before are restored
    after. Only the first signal raises: a second one must not cut the cleanup of the first short."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
    """The exception's message on one line; a leading "name:" that is a flag is written as the flag, and so is an
    option named in the message (`pass disk_dir` -> `pass --disk-dir`) where the name has an underscore (plain
    words such as "device" stay as they are)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if parser is None:
        return text
    flags = _flags(parser)
    name, sep, rest = text.partition(":")
    if sep and flags.get(name.strip()):
        text = flags[name.strip()] + ":" + rest
    return re.sub(r"(?<![\w./-])([a-z]+(?:_[a-z]+)+)(?![\w/])",
                  lambda m: flags.get(m.group(1), m.group(1)), text)


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
        with stop_signals_raise():
            return int(args._run(args) or 0)
    except KeyboardInterrupt as exc:
        _flush_stdout()
        if isinstance(exc, Terminated):
            print(f"{PROG}: terminated by {signal.Signals(exc.signum).name}", file=sys.stderr)
            return 128 + exc.signum
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
