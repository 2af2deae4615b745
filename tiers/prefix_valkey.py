"""A prefix cache on a Valkey or Redis server, shared by every process and machine that can reach it.

Entries are plain string keys `offload:kv:<hex>` holding the value's bytes, so the server's own memory limit
and LRU do the eviction, and `clear` touches nothing outside that namespace. Commands, each a pipeline of one
round trip per call:
    get       MGET, 16 keys per command (a hit is a use for the server's LRU)
    contains  EXISTS per key (EXISTS does not touch the LRU)
    put       SET key value NX, pipelines of at most 64 MiB of values: the server applies each SET whole, and
              NX means a concurrent writer of the same key never replaces the first value
    delete    DEL; clear: SCAN MATCH offload:kv:* + UNLINK; stats: SCAN + STRLEN, and CONFIG GET (or INFO)

Budget: with a `budget`, the first operation sets the server's `maxmemory` to it and `maxmemory-policy` to
`allkeys-lru`. Both are server-wide: they apply to the server's other keys too, so give the cache a server (or
at least an instance) of its own. A managed server that refuses CONFIG keeps its own settings, with a
warning. Without a budget the server's settings are left alone. `maxmemory` counts the server's whole memory
(keys, overhead, buffers), so a budget holds somewhat less than its size in values.

Failures: the connection, every read and every write time out after `timeout` seconds and are never retried,
so an operation on a server that is down or stuck fails with StoreError in about `timeout`, not later. The
first operation, and the first after a connection failure, pings the server and (re)applies the budget.
A full server that does not evict (policy `noeviction`) answers SET with an OOM error: those entries are
not written, which is not a failure.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

from tiers.prefix import SCHEMES, SPEC_HELP, PrefixStore, StoreError, check_items, check_keys

logger = logging.getLogger(__name__)

NAMESPACE = "offload:kv:"
DEFAULT_PORT = 6379
GET_CHUNK = 16
PUT_CHUNK_BYTES = 64 << 20
KEY_CHUNK = 1000  # keys per DEL / SCAN step / STRLEN pipeline
POLICY = "allkeys-lru"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _masked(spec: str) -> str:
    """`spec` with the password of its user info replaced by ***, for messages."""
    return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", spec)


def parse_url(spec: str) -> dict[str, Any]:
    """The connection settings of a `redis://[user:password@]host[:port][/db]` URL, and `where`: the URL with the
    password masked and the default port and db filled in. Raises ValueError("prefix_cache: ...")."""
    shown = _masked(spec)
    try:
        url = urllib.parse.urlsplit(spec)
        port = DEFAULT_PORT if url.port is None else url.port
    except ValueError as e:
        raise ValueError(f"prefix_cache: {shown} is not a valid URL ({e}); {SPEC_HELP}") from None
    if port == 0:
        raise ValueError(f"prefix_cache: {shown}: the port must be from 1 to 65535, got 0")
    scheme = url.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"prefix_cache: {shown} has an unknown scheme {url.scheme!r}; expected one of "
            f"{', '.join(s + '://' for s in SCHEMES)} or a directory path"
        )
    if not url.hostname:
        raise ValueError(f"prefix_cache: {shown} names no host; {SPEC_HELP}")
    path = url.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ValueError(f"prefix_cache: {shown}: the database must be a number such as /0, got /{path}")
    if url.query or url.fragment:
        raise ValueError(f"prefix_cache: {shown}: options after ? or # are not supported; {SPEC_HELP}")
    username = urllib.parse.unquote(url.username) if url.username else None
    password = urllib.parse.unquote(url.password) if url.password is not None else None
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    user_info = ""
    if username or password is not None:
        user_info = (username or "") + (":***" if password is not None else "") + "@"
    db = int(path) if path else 0
    return {
        "host": url.hostname, "port": port, "db": db, "username": username, "password": password,
        "ssl": scheme in ("rediss", "valkeys"), "where": f"{scheme}://{user_info}{host}:{port}/{db}",
    }


class ServerStore(PrefixStore):
    kind = "valkey"

    def __init__(self, url: str, budget: int | None, timeout: float):
        settings = parse_url(url)
        try:
            import valkey
        except ImportError:
            raise ValueError("prefix_cache: a redis:// URL needs the valkey client: pip install valkey") from None
        self.where = settings.pop("where")
        self.budget = budget
        self.timeout = timeout
        self._errors = valkey.exceptions
        # No retries (the client's default, made explicit): a retry would double the time to fail.
        # Replies are read 1 MiB at a time rather than 64 KiB: entries are megabytes (0.40 -> 0.49 GB/s for 3 MB
        # entries with the pure-Python parser, 0.56 -> 1.11 GB/s with libvalkey's; benchmarks/prefix_cache.py).
        ssl = settings.pop("ssl")
        pool = valkey.ConnectionPool(
            connection_class=valkey.SSLConnection if ssl else valkey.Connection, **settings,
            socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False, socket_read_size=1 << 20)
        self.client = valkey.Valkey(connection_pool=pool)
        self._ready = False
        self._lock = threading.Lock()
        self._warned_full = False

    # ---- plumbing ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Connects on first use; turns every client, socket and server error into one StoreError line."""
        errors = self._errors
        try:
            self._ensure_ready()
            yield
        except (errors.ConnectionError, errors.TimeoutError, OSError) as e:
            self._ready = False  # ping and apply the budget again on the next call
            raise StoreError(f"prefix_cache: {self.where} unreachable: {_one_line(e)}") from None
        except errors.ValkeyError as e:
            raise StoreError(f"prefix_cache: {self.where} {what} failed: {_one_line(e)}") from None

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            self.client.ping()
            if self.budget is not None:
                self._apply_budget()
            self._ready = True

    def _apply_budget(self) -> None:
        try:
            self.client.config_set("maxmemory", self.budget)
            self.client.config_set("maxmemory-policy", POLICY)
        except self._errors.ResponseError as e:  # a managed server: CONFIG is renamed or not permitted
            logger.warning("prefix cache: %s refused CONFIG SET maxmemory (%s); the server's own memory limit and "
                           "eviction policy apply", self.where, _one_line(e))
            return
        overhead = int(self.client.info("memory").get("used_memory_overhead", 0))
        if overhead >= self.budget:
            logger.warning("prefix cache: %s needs %d bytes for itself, more than the budget of %d bytes: it can "
                           "hold no entries; raise prefix_cache_budget", self.where, overhead, self.budget)

    @staticmethod
    def _name(key: str) -> str:
        return NAMESPACE + key

    def _scan(self) -> Iterator[list[bytes]]:
        """Our keys, in batches of up to KEY_CHUNK."""
        batch: list[bytes] = []
        for name in self.client.scan_iter(match=NAMESPACE + "*", count=KEY_CHUNK):
            batch.append(name)
            if len(batch) >= KEY_CHUNK:
                yield batch
                batch = []
        if batch:
            yield batch

    # ---- the store ---------------------------------------------------------------------------------------------

    def get(self, keys: list[str]) -> list[bytes | None]:
        check_keys(keys)
        if not keys:
            return []
        with self._io("get"):
            pipe = self.client.pipeline(transaction=False)
            for i in range(0, len(keys), GET_CHUNK):
                pipe.mget([self._name(key) for key in keys[i : i + GET_CHUNK]])
            return [value for chunk in pipe.execute() for value in chunk]

    def contains(self, keys: list[str]) -> list[bool]:
        check_keys(keys)
        if not keys:
            return []
        with self._io("contains"):
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._name(key))
            return [bool(n) for n in pipe.execute()]

    def put(self, items: list[tuple[str, bytes]]) -> int:
        check_items(items)
        seen: set[str] = set()
        chunks: list[list[tuple[str, bytes]]] = [[]]
        chunk_bytes = 0
        for key, value in items:
            if key in seen or (self.budget is not None and len(value) > self.budget):
                continue
            seen.add(key)
            if chunks[-1] and chunk_bytes + len(value) > PUT_CHUNK_BYTES:
                chunks.append([])
                chunk_bytes = 0
            chunks[-1].append((key, value))
            chunk_bytes += len(value)
        written = 0
        with self._io("put"):
            for chunk in chunks:
                if not chunk:
                    continue
                pipe = self.client.pipeline(transaction=False)
                for key, value in chunk:
                    pipe.set(self._name(key), value, nx=True)
                for result in pipe.execute(raise_on_error=False):
                    if isinstance(result, self._errors.OutOfMemoryError):
                        self._full(result)
                    elif isinstance(result, Exception):
                        raise result
                    else:
                        written += bool(result)
        return written

    def _full(self, error: Exception) -> None:
        if not self._warned_full:
            self._warned_full = True
            logger.warning("prefix cache: %s is out of memory and evicts nothing (%s); new entries are not stored",
                           self.where, _one_line(error))

    def delete(self, keys: list[str]) -> None:
        check_keys(keys)
        with self._io("delete"):
            for i in range(0, len(keys), KEY_CHUNK):
                self.client.delete(*[self._name(key) for key in keys[i : i + KEY_CHUNK]])

    def stats(self) -> dict[str, Any]:
        entries = size = 0
        with self._io("stats"):
            for batch in self._scan():
                pipe = self.client.pipeline(transaction=False)
                for name in batch:
                    pipe.strlen(name)
                lengths = pipe.execute()
                entries += len(batch)
                size += sum(lengths)
            maxmemory, policy = self._memory_settings()
        return {"store": self.kind, "where": self.where, "entries": entries, "bytes": size,
                "budget": maxmemory or None, "policy": policy}

    def _memory_settings(self) -> tuple[int, str]:
        """(maxmemory, maxmemory-policy) from CONFIG GET, or from INFO memory where CONFIG is not permitted."""
        try:
            config = {_text(k): _text(v) for k, v in self.client.config_get("maxmemory*").items()}
            return int(config["maxmemory"]), config["maxmemory-policy"]
        except (self._errors.ResponseError, KeyError, ValueError):
            info = self.client.info("memory")
            return int(info.get("maxmemory", 0)), _text(info.get("maxmemory_policy", "unknown"))

    def clear(self) -> int:
        removed = 0
        with self._io("clear"):
            for batch in self._scan():
                removed += self.client.unlink(*batch)
        return removed

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a connection to a dead server must not fail
            self.client.close()
