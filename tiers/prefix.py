"""Byte stores for a prefix cache of KV pages: a directory, or a Valkey/Redis server shared by many machines.

A prefix cache keeps the KV pages of prompts already seen, keyed by a hash of the tokens they cover, so a later
request that starts with the same tokens loads those pages instead of recomputing them. This module only stores
bytes under keys; building, hashing and validating the pages is the caller's job (`offload.prefix`).

    store = open_store("/var/cache/offload-kv", budget=8 << 30)   # or "redis://cache-host:6379/0"
    store.put([(key, page_bytes), ...])      # -> how many it wrote (entries already present are kept)
    store.get([key, ...])                    # -> [bytes | None, ...], a hit counts as a use for the LRU
    store.contains([key, ...])               # -> [bool, ...], no effect on the LRU
    store.delete([key])                      # an entry the caller found corrupt
    store.stats(); store.clear(); store.close()

Keys are lowercase hex strings (a SHA-256 is 64 of them). Values are opaque bytes. Both stores keep within their
budget by evicting the least recently used entries, and both are safe to share between processes: a value is
written whole or not at all, and a put never replaces an entry that is already there, so every reader sees one
complete value that some writer wrote.

`spec` picks the store: a string with "://" is a server URL (`redis://`, `valkey://`, or `rediss://` /
`valkeys://` for TLS; `redis://[user:password@]host[:port][/db]`), anything else is a directory path.

Errors: a bad spec, budget or timeout is a ValueError naming the parameter (`prefix_cache:`,
`prefix_cache_budget:`, `prefix_cache_timeout:`); a store that can't be reached, read or written now is a
`StoreError`, which is an OSError, so the CLI reports it on one line. Callers treat a StoreError as a miss (or a
put that did not happen): a cache that is down must slow requests down, never fail them.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from typing import Any

KEY_RE = re.compile(r"[0-9a-f]{1,128}")
DEFAULT_DIR_BUDGET = 4 << 30
DEFAULT_TIMEOUT = 2.0
MAX_TIMEOUT = 600
SCHEMES = ("redis", "valkey", "rediss", "valkeys")
SPEC_HELP = "expected a directory path or a redis://host:port/db URL"


class StoreError(OSError):
    """The store can't be reached or read/written now (server down, timeout, I/O error). One-line message naming
    the store. An OSError, so that `offload.cli` reports it as `offload: error: ...` with exit code 2."""


class PrefixStore(abc.ABC):
    """Opaque values under lowercase hex keys, kept within `budget` bytes by LRU eviction.

    Every method raises StoreError when the store can't be used now, and ValueError on a key that is not
    lowercase hex (a bug in the caller)."""

    kind: str  # "dir" or "valkey"
    where: str  # the directory path, or the URL with any password replaced by "***"
    budget: int | None  # bytes

    @abc.abstractmethod
    def get(self, keys: list[str]) -> list[bytes | None]:
        """The values in the order of `keys`, None where absent. A hit counts as a use for the LRU."""

    @abc.abstractmethod
    def contains(self, keys: list[str]) -> list[bool]:
        """Whether each key has an entry, without counting as a use."""

    @abc.abstractmethod
    def put(self, items: list[tuple[str, bytes]]) -> int:
        """Stores the entries not already present and returns how many it wrote; evicts the least recently used
        entries to stay within the budget. An entry larger than the whole budget is not stored."""

    @abc.abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Drops these entries (absent keys are ignored)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """{"store": kind, "where": where, "entries": int, "bytes": int, "budget": int | None, "policy": str}"""

    @abc.abstractmethod
    def clear(self) -> int:
        """Removes every entry of this store (on a server, only this store's namespace); returns how many."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases connections and handles; the store is not used afterwards."""

    def __enter__(self) -> PrefixStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where!r}, budget={self.budget})"


def check_keys(keys: Sequence[str]) -> None:
    for key in keys:
        if not isinstance(key, str) or KEY_RE.fullmatch(key) is None:
            raise ValueError(f"keys: expected lowercase hex strings of 1 to 128 characters, got {key!r}")


def check_items(items: Sequence[tuple[str, bytes]]) -> None:
    check_keys([key for key, _ in items])
    for key, value in items:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"items: the value of {key} must be bytes, got {type(value).__name__}")


def is_server_spec(spec: str) -> bool:
    """True when `spec` names a server (it has "://"), False when it is a directory path."""
    return "://" in spec


def check_budget(budget: int | None) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"prefix_cache_budget: expected an int number of bytes >= 1 or None, got {budget!r}")
    return budget


def check_timeout(timeout: float) -> float:
    # A comparison, not math.isfinite: it takes ints too large for a float; nan compares false.
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"prefix_cache_timeout: expected a number of seconds > 0 and at most {MAX_TIMEOUT}, "
                         f"got {timeout!r}")
    return float(timeout)


def open_store(spec: str, budget: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> PrefixStore:
    """The store that `spec` names: a directory (created if missing; `budget` None means the budget last given for
    it, else 4 GiB) or a server URL (`budget` None leaves the server's maxmemory alone). `timeout`: seconds that a
    server connection, read or write, or the directory's index lock may take before the operation fails with
    StoreError.

    A server is not contacted here: the first operation connects, so opening never fails for a server that is
    down, the operations do."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"prefix_cache: {SPEC_HELP}, got {spec!r}")
    budget = check_budget(budget)
    timeout = check_timeout(timeout)
    if is_server_spec(spec):
        from tiers.prefix_valkey import ServerStore

        return ServerStore(spec, budget=budget, timeout=timeout)
    from tiers.prefix_dir import DirStore

    return DirStore(spec, budget=budget, timeout=timeout)


def __getattr__(name: str) -> Any:
    # `from tiers.prefix import DirStore` without importing both implementations up front.
    if name == "DirStore":
        from tiers.prefix_dir import DirStore

        return DirStore
    if name == "ServerStore":
        from tiers.prefix_valkey import ServerStore

        return ServerStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
