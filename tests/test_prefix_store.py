"""The prefix cache's byte stores (`tiers.prefix`): one contract suite over a directory and a real Valkey server,
then what only one of them does (the directory's exact LRU and self-healing index, the server's eviction and
managed-server fallbacks), writers racing from several processes, and a server that dies or gets stuck.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest
import valkey

from servers import free_port, start_server
from tiers.prefix import StoreError, open_store
from tiers.prefix_dir import DirStore

TIMEOUT = 1.0


def key(i: int) -> str:
    return f"{i:064x}"


@pytest.fixture(params=["dir", "valkey"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store of each kind, empty: a new directory, or a fresh server."""
    if request.param == "dir":
        return str(tmp_path / "prefix")
    return request.getfixturevalue("kv_server_url")


# ---- the contract, for both stores -------------------------------------------------------------------------------


def test_round_trip(spec: str) -> None:
    with open_store(spec, timeout=TIMEOUT) as store:
        values = {key(i): os.urandom(1000 + i) for i in range(3)}
        assert store.put(list(values.items())) == 3
        assert store.get([key(2), key(9), key(0)]) == [values[key(2)], None, values[key(0)]]
        assert store.contains([key(9), key(1)]) == [False, True]
        assert store.get([]) == [] and store.contains([]) == [] and store.put([]) == 0
        assert store.kind == ("valkey" if "://" in spec else "dir")


def test_put_keeps_the_first_value(spec: str) -> None:
    """A put never replaces an entry (SET NX): the first value written stays, and the count says what was new."""
    with open_store(spec, timeout=TIMEOUT) as store:
        assert store.put([(key(1), b"first"), (key(1), b"same call")]) == 1
        assert store.put([(key(1), b"second"), (key(2), b"new")]) == 1
        assert store.get([key(1), key(2)]) == [b"first", b"new"]


def test_delete_stats_clear(spec: str) -> None:
    with open_store(spec, timeout=TIMEOUT) as store:
        store.put([(key(i), b"x" * (100 * (i + 1))) for i in range(4)])
        store.delete([key(0), key(7)])
        assert store.contains([key(0), key(1)]) == [False, True]
        stats = store.stats()
        assert (stats["store"], stats["where"]) == (store.kind, store.where)
        assert (stats["entries"], stats["bytes"]) == (3, 200 + 300 + 400)
        assert store.clear() == 3
        assert (store.stats()["entries"], store.stats()["bytes"]) == (0, 0)
        assert store.get([key(1), key(2)]) == [None, None]


def test_bad_keys_are_refused(spec: str) -> None:
    with open_store(spec, timeout=TIMEOUT) as store:
        for bad in ["AB", "../etc", "", "g0", 12]:
            with pytest.raises(ValueError, match="^keys: "):
                store.get([bad])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="^items: "):
            store.put([(key(1), "text")])  # type: ignore[list-item]


# ---- writers in several processes --------------------------------------------------------------------------------

WRITERS = 3
RACE_KEYS = 16


def race_value(writer: int, i: int) -> bytes:
    """Each writer's value differs in length and in every byte, so a torn or mixed entry can't pass for one."""
    return bytes([writer + 1]) * (40_000 + 9_000 * writer + 1_000 * i)


def race_writer(specs: list[str], writer: int, barrier, results) -> None:
    stores = [open_store(s, timeout=10.0) for s in specs]
    barrier.wait(timeout=60)
    written = [store.put([(key(i), race_value(writer, i)) for i in range(RACE_KEYS)]) for store in stores]
    results.put((writer, written))


def test_writers_in_several_processes(tmp_path: Path, kv_server_url: str) -> None:
    """Processes put the same keys at once: each key is written by exactly one of them, and every value read
    back is one writer's value, whole. One set of processes races on both stores: starting a process (it
    imports torch through the tiers package) is the slow part."""
    specs = [str(tmp_path / "prefix"), kv_server_url]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=race_writer, args=(specs, w, barrier, results)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    written = [results.get(timeout=120)[1] for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for s, spec in enumerate(specs):
        assert sum(counts[s] for counts in written) == RACE_KEYS, spec
        with open_store(spec) as store:
            for i, value in enumerate(store.get([key(i) for i in range(RACE_KEYS)])):
                assert value in {race_value(w, i) for w in range(WRITERS)}, (spec, i)
            assert store.stats()["entries"] == RACE_KEYS
    assert not list((tmp_path / "prefix").rglob("*.tmp"))


# ---- the directory -----------------------------------------------------------------------------------------------


def test_dir_evicts_least_recently_used(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), budget=300)
    assert store.put([(key(1), b"a" * 100), (key(2), b"b" * 100), (key(3), b"c" * 100)]) == 3
    store.get([key(1)])  # 1 is now the most recent: 2 is the oldest
    store.contains([key(2)])  # no effect on the order
    assert store.put([(key(4), b"d" * 100)]) == 1
    assert store.contains([key(i) for i in range(1, 5)]) == [True, False, True, True]
    assert store.put([(key(5), b"e" * 150)]) == 1  # 3 and then 1 go (150 bytes more than fit)
    assert store.contains([key(i) for i in range(1, 6)]) == [False, False, False, True, True]
    assert store.stats()["bytes"] == 250
    assert store.put([(key(6), b"f" * 301)]) == 0  # larger than the whole budget: not stored, nothing evicted
    assert store.contains([key(4), key(5), key(6)]) == [True, True, False]
    assert not list(tmp_path.rglob("*.tmp"))


def test_dir_default_budget_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b"
    store = open_store(str(path))
    assert (store.where, store.budget) == (str(path), 4 << 30)
    store.put([(key(0xAB), b"v")])
    assert (path / "entries" / "00" / f"{key(0xAB)}.kv").read_bytes() == b"v"
    assert (path / "index.sqlite").is_file()
    assert open_store(str(path), budget=1000).budget == 1000
    assert open_store(str(path)).budget == 1000  # a store opened without a budget keeps the directory's


def test_dir_index_heals(tmp_path: Path) -> None:
    """The files and the index can disagree after a crash or a race: reads fix the index, never fail."""
    store = open_store(str(tmp_path))
    store.put([(key(1), b"one"), (key(2), b"two")])
    (tmp_path / "entries" / "00" / f"{key(1)}.kv").unlink()  # evicted by another process, say
    entry = tmp_path / "entries" / "00" / f"{key(3)}.kv"
    entry.write_bytes(b"three")  # a writer killed between its link and the index
    assert store.get([key(1), key(2), key(3)]) == [None, b"two", b"three"]
    assert (store.stats()["entries"], store.stats()["bytes"]) == (2, 3 + 5)


def test_dir_removes_stale_temp_files(tmp_path: Path) -> None:
    open_store(str(tmp_path)).close()
    sub = tmp_path / "entries" / "00"
    sub.mkdir()
    stale, fresh = sub / f"{key(1)}.kv.123.ab.tmp", sub / f"{key(2)}.kv.124.cd.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    open_store(str(tmp_path)).close()
    assert not stale.exists() and fresh.exists()


def test_dir_io_error_is_store_error(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put([(key(1), b"v")])
    target = tmp_path / "entries" / "00" / f"{key(1)}.kv"
    target.unlink()
    target.mkdir()  # reading it now fails with EISDIR, an I/O error like any other
    with pytest.raises(StoreError, match=f"^prefix_cache: {tmp_path} can't be read: "):
        store.get([key(1)])


# ---- the server --------------------------------------------------------------------------------------------------


def test_server_budget_evicts_least_recently_used(kv_server_url: str) -> None:
    """With a budget the server evicts by (approximate) LRU; its LRU clock ticks once a second, so the entries
    written before a pause are the idle ones."""
    # The server picks each victim among a sample of keys (5 by default): now and then an idle entry is never
    # sampled and outlives newer ones (3 of 16 survived in one run). A larger sample makes the order near-exact, so
    # what is checked is the policy and budget the store set, not the sampling's luck.
    valkey.Valkey.from_url(kv_server_url).config_set("maxmemory-samples", 64)
    budget = 4 << 20
    store = open_store(kv_server_url, budget=budget, timeout=TIMEOUT)
    value = os.urandom(64 << 10)
    old, new = [key(i) for i in range(16)], [key(100 + i) for i in range(56)]  # 1 MiB, then 3.5 MiB
    store.put([(k, value) for k in old])
    time.sleep(1.5)
    for i in range(0, len(new), 8):  # with the server's own ~1 MiB, over the budget
        store.put([(k, value) for k in new[i : i + 8]])
    assert sum(store.contains(old)) <= 2  # the idle entries went first
    assert sum(store.contains(new)) >= 40
    store.put([(key(1000 + i), value) for i in range(128)])  # 8 MiB more: memory stays bounded
    stats = store.stats()
    assert (stats["budget"], stats["policy"]) == (budget, "allkeys-lru")
    assert 0 < stats["entries"] < 64 and stats["bytes"] <= budget
    used = valkey.Valkey.from_url(kv_server_url).info("memory")["used_memory"]
    assert used <= budget + (256 << 10)


def test_server_budget_below_its_own_needs(kv_server_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A budget below what the server needs for itself: warned about, and a full server is "not written",
    not an error."""
    store = open_store(kv_server_url, budget=1000, timeout=TIMEOUT)
    assert store.put([(key(1), b"v" * 100)]) == 0
    assert "can hold no entries" in caplog.text and "out of memory" in caplog.text
    assert store.get([key(1)]) == [None]


def test_server_settings_untouched_without_budget(kv_server_url: str) -> None:
    client = valkey.Valkey.from_url(kv_server_url)
    client.set("someone-else", b"theirs")
    store = open_store(kv_server_url, timeout=TIMEOUT)
    store.put([(key(1), b"ours")])
    stats = store.stats()
    assert (stats["budget"], stats["policy"], stats["entries"]) == (None, "noeviction", 1)
    assert store.clear() == 1
    assert client.get("someone-else") == b"theirs"  # clear stays in its namespace
    assert client.keys("offload:kv:*") == []


def test_server_that_refuses_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Managed servers rename or forbid CONFIG: the budget is not applied (a warning says so), stats read INFO."""
    server = start_server(tmp_path, ["--rename-command", "CONFIG", ""])
    try:
        store = open_store(server.url, budget=1 << 20, timeout=TIMEOUT)
        assert store.put([(key(1), b"v")]) == 1
        assert "refused CONFIG SET" in caplog.text
        assert store.stats()["budget"] is None and store.stats()["policy"] == "noeviction"
    finally:
        server.stop()


def test_dead_server_fails_fast(kv_server) -> None:
    store = open_store(kv_server.url, timeout=TIMEOUT)
    store.put([(key(1), b"v")])
    kv_server.kill()
    for op in (lambda: store.get([key(1)]), lambda: store.put([(key(2), b"w")]),
               lambda: store.contains([key(1)]), store.stats, store.clear):
        start = time.monotonic()
        with pytest.raises(StoreError, match=f"^prefix_cache: {kv_server.url} unreachable: "):
            op()
        assert time.monotonic() - start < 2 * TIMEOUT
    store.close()


def test_stuck_server_times_out_then_recovers(kv_server) -> None:
    """A server that accepts but never answers (stopped, swapping, overloaded) costs one timeout, not a hang."""
    store = open_store(kv_server.url, budget=8 << 20, timeout=TIMEOUT)
    store.put([(key(1), b"v")])
    kv_server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(StoreError, match="unreachable: Timeout"):
            store.get([key(1)])
        assert time.monotonic() - start < 2 * TIMEOUT
    finally:
        kv_server.resume()
    assert store.get([key(1)]) == [b"v"]


def test_unreachable_url() -> None:
    url = f"redis://user:secret@127.0.0.1:{free_port()}/0"
    store = open_store(url, timeout=TIMEOUT)  # opening does not connect
    assert store.where == url.replace("secret", "***")
    start = time.monotonic()
    with pytest.raises(StoreError, match="unreachable") as info:
        store.contains([key(1)])
    assert time.monotonic() - start < TIMEOUT
    assert "secret" not in str(info.value) and store.where in str(info.value)
    assert isinstance(info.value, OSError)


def test_valkey_client_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "valkey", None)
    with pytest.raises(ValueError, match=r"^prefix_cache: a redis:// URL needs the valkey client: pip install valkey"):
        open_store("redis://127.0.0.1:6379/0")


# ---- bad arguments -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    "", "  ", None, 7, "ftp://host/0", "redis://", "redis://host:port/0", "redis://host:6379/db0",
    "redis://host:6379/0?timeout=3", "http://host:6379",
])
def test_bad_spec(bad: object) -> None:
    with pytest.raises(ValueError, match="^prefix_cache: "):
        open_store(bad)  # type: ignore[arg-type]


def test_spec_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="^prefix_cache: .* exists and is not a directory"):
        open_store(str(tmp_path / "f"))


@pytest.mark.parametrize("budget", [0, -1, True, 1.5, "4GiB"])
def test_bad_budget(tmp_path: Path, budget: object) -> None:
    with pytest.raises(ValueError, match="^prefix_cache_budget: "):
        open_store(str(tmp_path), budget=budget)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), "2", True])
def test_bad_timeout(tmp_path: Path, timeout: object) -> None:
    with pytest.raises(ValueError, match="^prefix_cache_timeout: "):
        open_store(str(tmp_path), timeout=timeout)  # type: ignore[arg-type]


def test_url_forms() -> None:
    cases = {
        "redis://h": "redis://h:6379/0",
        "valkey://h:7000/3": "valkey://h:7000/3",
        "rediss://:pw@h/1": "rediss://:***@h:6379/1",
        "redis://[::1]:6380/0": "redis://[::1]:6380/0",
    }
    for url, where in cases.items():
        assert open_store(url).where == where
    assert isinstance(open_store("valkey://h"), open_store("redis://h").__class__)
    assert not isinstance(open_store("redis://h"), DirStore)
