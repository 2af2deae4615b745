"""`offload cache stats|clear`: inspect or empty a prefix cache store, a directory or a Valkey/Redis server.

    offload cache stats --prefix-cache ~/.cache/offload-prefix
    offload cache stats --prefix-cache redis://cache-host:6379/0 --json
    offload cache clear --prefix-cache redis://cache-host:6379/0

`stats` prints the entries, their bytes, the budget and the eviction policy (`--json`: one JSON object);
`clear` removes every entry and prints how many. On a server only the prefix cache's keys are read or removed
(`offload:kv:*`), and a server that can't be reached is a one-line error after `--prefix-cache-timeout` seconds.

Neither command creates anything: `stats` of a directory that holds no prefix cache is an error (a typo in the
path should not read as an empty cache), and `clear` of one has nothing to do.
"""

from __future__ import annotations

import argparse
import json
import os

from offload.config import check_prefix_cache
from offload.sizes import format_size
from tiers.prefix import DEFAULT_TIMEOUT, check_timeout, is_server_spec, open_store
from tiers.prefix_dir import is_store

HELP = "inspect or empty a prefix cache store: a directory, or a Valkey/Redis server shared by many runs"
ACTIONS = ("stats", "clear")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS,
                        help="stats: entries, bytes, budget and policy; clear: remove every entry")
    parser.add_argument("--prefix-cache", required=True, metavar="DIR|URL",
                        help="the store: a directory, or redis://host:port/db (also valkey://, and rediss:// or "
                        "valkeys:// for TLS)")
    parser.add_argument("--prefix-cache-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"seconds a server may take to connect or answer (default: {DEFAULT_TIMEOUT})")
    parser.add_argument("--json", action="store_true", help="stats: print them as one JSON object")


def _missing_directory(spec: str) -> str | None:
    """Why `spec` is a directory path with no prefix cache in it, or None when there is one (or it is a URL)."""
    if is_server_spec(spec):
        return None
    if not os.path.exists(spec):
        return f"{spec} does not exist"
    if os.path.isdir(spec) and not is_store(spec):
        return f"{spec} holds no prefix cache"
    return None  # a store, or a file: open_store says what is wrong with it


def format_stats(stats: dict) -> str:
    budget = stats.get("budget")
    rows = [
        ("store", stats["store"]),
        ("where", stats["where"]),
        ("entries", f"{stats['entries']:,}"),
        ("bytes", format_size(stats["bytes"])),
        ("budget", "unlimited" if budget is None else format_size(budget)),
    ]
    if "policy" in stats:
        rows.append(("policy", str(stats["policy"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    # The checks of `generate --prefix-cache`, before a missing directory makes `clear` a no-op that skips them.
    spec = check_prefix_cache(args.prefix_cache)
    check_timeout(args.prefix_cache_timeout)
    missing = _missing_directory(spec)
    if missing is not None:
        if args.action == "stats":
            raise ValueError(f"prefix_cache: {missing}")
        print(f"removed 0 entries: {missing}")
        return 0
    with open_store(spec, timeout=args.prefix_cache_timeout) as store:
        if args.action == "stats":
            stats = store.stats()
            print(json.dumps(stats) if args.json else format_stats(stats))
        else:
            removed = store.clear()
            print(f"removed {removed:,} {'entry' if removed == 1 else 'entries'} from {store.where}")
    return 0
