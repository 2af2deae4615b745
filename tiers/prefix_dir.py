"""A prefix cache in a local directory: one file per entry, an SQLite index for the LRU, shared by processes.

Layout:
    <dir>/index.sqlite               key, size, last use of every entry (the LRU order and the byte total),
                                     and the budget last given for the directory
    <dir>/entries/<key[:2]>/<key>.kv one value per file, exactly its bytes

Writes: a value goes to a temp file next to its final name, which is then hard-linked onto the final name.
A link fails when the name exists, so the first writer of a key wins and a second one writes nothing (the
server store's SET NX); a reader opens only final names, so it never sees a partial file. Where the file
system has no hard links the temp file is renamed over the name instead (os.replace: still atomic, the last
writer wins). Temp files of a writer killed midway are removed by the next open, once they are 10 minutes old.

Index: every change of the index is one `BEGIN IMMEDIATE` transaction, and SQLite's lock (waited for up to
`timeout` seconds) serializes them across processes. Last use is a logical clock: each transaction stamps
max(now in ns, the newest stamp + 1), so the LRU order is exact even within one clock tick. A `put` indexes
what it wrote and then evicts from the least recently used end, deleting rows and files in the same
transaction, until the indexed bytes are within the budget. An explicit budget is recorded in the index; a
store opened without one uses the recorded budget (else DEFAULT_DIR_BUDGET), so the processes that share the
directory, and `offload cache stats`, agree on it.

NOTE: the index and the files can disagree for a moment (a writer killed between link and index, an entry
evicted while another process re-puts it). Reads heal that: a file without a row is returned and indexed, a
row without a file is a miss and is dropped. Nothing is fsynced: this is a cache, and after a power loss the
caller's validation finds a damaged entry and deletes it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

from tiers.prefix import DEFAULT_DIR_BUDGET, PrefixStore, StoreError, check_items, check_keys

logger = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite"
ENTRIES_NAME = "entries"
SUFFIX = ".kv"
TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 600
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, size INTEGER NOT NULL, used INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_used ON entries (used)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
# Errors where a hard link is not possible at all on this file system (not "the name exists").
_NO_LINK = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def is_store(path: str) -> bool:
    """True when `path` is a directory that holds a prefix cache (creates nothing)."""
    return os.path.isfile(os.path.join(path, INDEX_NAME)) or os.path.isdir(os.path.join(path, ENTRIES_NAME))


class DirStore(PrefixStore):
    kind = "dir"

    def __init__(self, path: str, budget: int | None, timeout: float):
        self.where = path
        self.timeout = timeout
        self.root = os.path.abspath(path)
        self.entries = os.path.join(self.root, ENTRIES_NAME)
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ValueError(f"prefix_cache: {path} exists and is not a directory")
        with self._io("can't be opened"):
            os.makedirs(self.entries, exist_ok=True)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = -1
        with self._transaction() as db:  # creates the index now: a directory that can't hold one fails at open
            if budget is None:
                row = db.execute("SELECT value FROM meta WHERE name = 'budget'").fetchone()
                budget = DEFAULT_DIR_BUDGET if row is None else int(row[0])
            else:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('budget', ?)", (budget,))
        self.budget: int = budget
        self._remove_stale_temps()

    # ---- plumbing ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except (OSError, sqlite3.Error) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise StoreError(f"prefix_cache: {self.where} {what}: {' '.join(reason.split())}") from None

    def _connect(self) -> sqlite3.Connection:
        # A connection is not used across fork: a child opens its own.
        if self._db is None or self._pid != os.getpid():
            db = sqlite3.connect(os.path.join(self.root, INDEX_NAME), timeout=self.timeout, isolation_level=None,
                                 check_same_thread=False)
            # WAL: readers don't wait for a writer. Where it is not supported the default journal still works.
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            for statement in _SCHEMA:
                db.execute(statement)
            self._db, self._pid = db, os.getpid()
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the index, under this object's thread lock and SQLite's process lock."""
        with self._io("index failed"), self._lock:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _stamp(db: sqlite3.Connection) -> int:
        newest = db.execute("SELECT COALESCE(MAX(used), 0) FROM entries").fetchone()[0]
        return max(time.time_ns(), newest + 1)

    def _path(self, key: str) -> str:
        return os.path.join(self.entries, key[:2], key + SUFFIX)

    def _files(self, suffix: str) -> Iterator[os.DirEntry]:
        """The files under entries/<xx>/ whose names end with `suffix`."""
        for sub in _scandir(self.entries):
            if sub.is_dir(follow_symlinks=False):
                yield from (entry for entry in _scandir(sub.path) if entry.name.endswith(suffix))

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for entry in self._files(TEMP_SUFFIX):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    logger.info("prefix cache: removed %s left by a killed writer", entry.path)

    def _unlink(self, key: str) -> bool:
        try:
            os.unlink(self._path(key))
            return True
        except FileNotFoundError:
            return False

    # ---- the store ---------------------------------------------------------------------------------------------

    def get(self, keys: list[str]) -> list[bytes | None]:
        check_keys(keys)
        values: list[bytes | None] = []
        with self._io("can't be read"):
            for key in keys:
                try:
                    with open(self._path(key), "rb") as f:
                        values.append(f.read())
                except FileNotFoundError:  # never written, or evicted by another process
                    values.append(None)
        if not keys:
            return values
        with self._transaction() as db:
            stamp = self._stamp(db)
            for i, (key, value) in enumerate(zip(keys, values)):
                if value is None:
                    db.execute("DELETE FROM entries WHERE key = ?", (key,))
                    continue
                if db.execute("UPDATE entries SET used = ? WHERE key = ?", (stamp + i, key)).rowcount == 0 \
                        and os.path.exists(self._path(key)):  # a file the index lost: index it again
                    db.execute("INSERT OR IGNORE INTO entries VALUES (?, ?, ?)", (key, len(value), stamp + i))
        return values

    def contains(self, keys: list[str]) -> list[bool]:
        check_keys(keys)
        with self._io("can't be read"):
            return [os.path.exists(self._path(key)) for key in keys]

    def put(self, items: list[tuple[str, bytes]]) -> int:
        check_items(items)
        written: dict[str, int] = {}
        present: list[str] = []
        seen: set[str] = set()
        for key, value in items:
            if key in seen or len(value) > self.budget:
                continue
            seen.add(key)
            if self._write(key, value):
                written[key] = len(value)
            else:
                present.append(key)
        if not written and not present:
            return 0
        with self._transaction() as db:
            stamp = self._stamp(db)
            for i, (key, size) in enumerate(written.items()):
                db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (key, size, stamp + i))
            for i, key in enumerate(present, start=len(written)):  # heal: a file the index does not list
                with contextlib.suppress(FileNotFoundError):
                    size = os.stat(self._path(key)).st_size
                    db.execute("INSERT OR IGNORE INTO entries VALUES (?, ?, ?)", (key, size, stamp + i))
            self._evict(db)
        return len(written)

    def _write(self, key: str, value: bytes) -> bool:
        """Writes one entry unless its file exists; True when this call created it."""
        final = self._path(key)
        if os.path.exists(final):
            return False
        temp = f"{final}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        with self._io("can't be written"):
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                with open(temp, "xb") as f:
                    f.write(value)
                try:
                    os.link(temp, final)
                except FileExistsError:
                    return False  # another writer was first: its value stays
                except OSError as e:
                    if e.errno not in _NO_LINK:
                        raise
                    os.replace(temp, final)
                return True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)

    def _evict(self, db: sqlite3.Connection) -> None:
        """Inside a transaction: drops the least recently used entries until the indexed bytes fit the budget."""
        total = db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
        if total <= self.budget:
            return
        victims: list[str] = []
        for key, size in db.execute("SELECT key, size FROM entries ORDER BY used"):
            victims.append(key)
            total -= size
            if total <= self.budget:
                break
        for key in victims:
            db.execute("DELETE FROM entries WHERE key = ?", (key,))
            self._unlink(key)
        logger.debug("prefix cache: evicted %d entries from %s", len(victims), self.where)

    def delete(self, keys: list[str]) -> None:
        check_keys(keys)
        if not keys:
            return
        with self._transaction() as db:
            for key in keys:
                db.execute("DELETE FROM entries WHERE key = ?", (key,))
                self._unlink(key)

    def stats(self) -> dict[str, Any]:
        with self._io("index failed"), self._lock:
            entries, size = self._connect().execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        return {"store": self.kind, "where": self.where, "entries": entries, "bytes": size, "budget": self.budget,
                "policy": "lru"}

    def clear(self) -> int:
        with self._transaction() as db:
            keys = {key for (key,) in db.execute("SELECT key FROM entries")}
            db.execute("DELETE FROM entries")
            for entry in self._files(SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    keys.add(entry.name[: -len(SUFFIX)])
        return len(keys)

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
            self._db = None


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []
