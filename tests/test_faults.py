"""Faults below the device during generation: each one is recovered with the tokens of DynamicCache, or stops the
run with one error line naming what failed; the disk directory is empty afterwards either way.

The faults come from tests/faults.py: a disk tier whose reads and writes fail on request, and damage done to its
file between the prefill and the decode steps that read it back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import faults
from faults import Faults
from offload import offload
from offload.recover import Unrecoverable
from offload.runtime import Runtime
from test_cli import assert_one_line_error, run_cli

NEW = 6


def _page_bytes(model, page_size: int) -> int:
    c = model.config
    return 2 * c.num_key_value_heads * page_size * (c.hidden_size // c.num_attention_heads) * model.dtype.itemsize


def _options(model, disk_dir: Path, page_size: int = 8, **more) -> dict:
    """A device that holds a few pages per layer and a host that holds 2: most of the prompt goes to disk."""
    pb = _page_bytes(model, page_size)
    layers = model.config.num_hidden_layers
    return dict(page_size=page_size, device_budget=(2 * layers + 4) * pb, host_budget=2 * pb, disk_dir=str(disk_dir),
                **more)


def _prompt(n: int = 160, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


# The disk tier's two I/O paths: buffered I/O on the thread pool (8-token pages: 1.5 KiB halves), and native AIO
# with O_DIRECT (64-token pages: 12 KiB halves); with the prompt length each uses (most of it on disk).
IO = {"threads": (8, 160), "aio": (64, 448)}


@pytest.fixture(params=list(IO))
def io(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "aio":
        faults.skip_without_aio(tmp_path)
    return request.param


def _io_case(model, disk_dir: Path, io: str, **more) -> tuple[torch.Tensor, dict]:
    """The prompt and the options of the I/O path `io` (io_engine given: the run fails where it can't be used)."""
    page_size, n = IO[io]
    return _prompt(n), _options(model, disk_dir, page_size, io_engine=io, **more)


def _greedy(model, ids: torch.Tensor, cache, new: int = NEW, between=None) -> torch.Tensor:
    """Greedy decoding driven by hand: a prefill, then `between()` (which damages the disk), then `new` steps."""
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        if between is not None:
            between()
        out = [int(logits[0, -1].argmax())]
        for _ in range(new - 1):
            logits = model(torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True).logits
            out.append(int(logits[0, -1].argmax()))
    return torch.tensor(out)


def _reference(model, ids: torch.Tensor, new: int = NEW) -> torch.Tensor:
    return _greedy(model, ids, DynamicCache(config=model.config), new)


def _run(model, ids, options, between=None, new: int = NEW):
    with offload(model, **options) as rt:
        tokens = _greedy(model, ids, rt.cache(), new, between=lambda: between(rt) if between else None)
        stats = rt.stats()
    return tokens, stats


def _kv_file(rt) -> str:
    assert rt.disk_tier is not None and rt.disk_tier.num_used > 0, "nothing went to disk"
    return rt.disk_tier.path


def _disk_slot(rt, layer: int, page: int | None = None) -> int:
    """The disk slot of a page of `layer` that lives only on disk (`page`, or the first such)."""
    t = rt.table
    only = (t.slot["disk"][layer] >= 0) & (t.slot["host"][layer] < 0) & (t.slot["device"][layer] < 0)
    if page is None:
        page = int(only.nonzero()[0, 0])
    assert bool(only[page]), f"page {page} of layer {layer} is not on disk alone"
    return int(t.slot["disk"][layer, page])


def assert_empty(path: Path) -> None:
    assert not path.exists() or os.listdir(path) == [], os.listdir(path)


# ---- recovered: the tokens of DynamicCache ----------------------------------------------------------------------


def test_flipped_bytes_are_caught_and_the_pages_recomputed(tiny_gqa3_model, tmp_path: Path, io: str) -> None:
    model = tiny_gqa3_model
    ids, options = _io_case(model, tmp_path / "kv", io)
    hit = []

    def damage(rt) -> None:
        disk = rt.disk_tier
        for layer in range(rt.layers):  # page 2 of every layer: each decode step needs it
            slot = _disk_slot(rt, layer, 2)
            faults.flip(_kv_file(rt), slot * disk.slot_bytes + 100)
            hit.append(slot)

    tokens, stats = _run(model, ids, options, damage)
    assert torch.equal(tokens, _reference(model, ids))
    assert stats["faults"]["damaged"] == len(hit) and stats["faults"]["recomputed"] == len(hit)
    assert_empty(tmp_path / "kv")


def test_a_truncated_file_is_rebuilt_in_one_pass(tiny_gqa3_model, tmp_path: Path, io: str) -> None:
    """Every disk page is lost at once: the first failed load finds them all (a scrub) and the model re-runs once."""
    model = tiny_gqa3_model
    ids, options = _io_case(model, tmp_path / "kv", io)
    lost = []

    def damage(rt) -> None:
        lost.append(rt.disk_tier.num_used)
        faults.truncate(_kv_file(rt))

    tokens, stats = _run(model, ids, options, damage)
    assert torch.equal(tokens, _reference(model, ids))
    assert stats["faults"]["recomputed"] == lost[0] == stats["faults"]["damaged"]
    assert_empty(tmp_path / "kv")


def test_a_file_deleted_while_open_keeps_working(tiny_gqa3_model, tmp_path: Path, io: str) -> None:
    model = tiny_gqa3_model
    ids, options = _io_case(model, tmp_path / "kv", io)
    tokens, stats = _run(model, ids, options, lambda rt: faults.delete(_kv_file(rt)))
    assert torch.equal(tokens, _reference(model, ids))
    assert stats["bytes_moved"]["disk->host"] > 0 and stats["faults"]["damaged"] == 0
    assert_empty(tmp_path / "kv")


@pytest.mark.parametrize("fault", ["read_eio", "short_read"])
def test_a_transient_read_error_passes_on_a_second_read(tiny_gqa3_model, tmp_path: Path, monkeypatch,
                                                         fault: str, io: str) -> None:
    model = tiny_gqa3_model
    ids, options = _io_case(model, tmp_path / "kv", io)
    plan = Faults(**{fault: 1})
    faults.install(monkeypatch, plan)
    tokens, stats = _run(model, ids, options)
    assert plan.injected == [fault.replace("_", " ").replace("read eio", "read EIO")]
    assert torch.equal(tokens, _reference(model, ids))
    assert stats["faults"]["reread"] > 0 and stats["faults"]["damaged"] == 0
    assert_empty(tmp_path / "kv")


def test_a_bad_block_is_recomputed_every_time_it_is_read(tiny_gqa3_model, tmp_path: Path, monkeypatch, io: str) -> None:
    """Reads and writes of slot 3 always fail (a bad block): its page can't be written back, and is rebuilt from
    the model each step that reads it."""
    model = tiny_gqa3_model
    ids, options = _io_case(model, tmp_path / "kv", io)
    plan = Faults()
    faults.install(monkeypatch, plan)
    tokens, stats = _run(model, ids, options, lambda rt: plan.bad_slots.add(3))
    assert torch.equal(tokens, _reference(model, ids))
    assert stats["faults"]["recomputed"] >= NEW - 1
    assert_empty(tmp_path / "kv")


def test_a_failed_write_goes_to_other_slots(tiny_gqa3_model, tmp_path: Path, monkeypatch, io: str) -> None:
    model = tiny_gqa3_model
    ids, options = _io_case(model, tmp_path / "kv", io)
    plan = Faults(write_eio=1, after_writes=2)
    faults.install(monkeypatch, plan)
    tokens, stats = _run(model, ids, options)
    assert plan.injected == ["write EIO"]
    assert torch.equal(tokens, _reference(model, ids))
    assert_empty(tmp_path / "kv")


def test_the_prefix_cache_is_another_copy(tiny_gqa3_model, tmp_path: Path) -> None:
    """With a prefix cache holding the prompt's pages, a damaged disk page is taken from there, not recomputed."""
    model = tiny_gqa3_model
    ids = _prompt()
    store = tmp_path / "prefix"
    options = _options(model, tmp_path / "kv", prefix_cache=str(store))

    def damage(rt) -> None:
        rt.stats()  # waits for the publisher: the prompt's pages are in the store
        slot = _disk_slot(rt, 1, 2)
        faults.flip(_kv_file(rt), slot * rt.disk_tier.slot_bytes + 8)

    tokens, stats = _run(model, ids, options, damage)
    assert torch.equal(tokens, _reference(model, ids))
    assert stats["faults"]["from_prefix_cache"] == 1 and stats["faults"]["recomputed"] == 0
    assert_empty(tmp_path / "kv")


# ---- a clear error: no tokens ---------------------------------------------------------------------------------


def test_damage_without_tokens_to_recompute_is_one_error_naming_the_page(tiny_gqa3_model, tmp_path: Path) -> None:
    """A sequence fed as embeddings has no token ids: a damaged page can't be recomputed, and the error says which
    tier, layer and page, and why."""
    model = tiny_gqa3_model
    ids = _prompt()
    with pytest.raises(Unrecoverable, match=r"disk: layer \d+ page \d+ .*checksum mismatch.*embeddings"):
        with offload(model, **_options(model, tmp_path / "kv")) as rt, torch.no_grad():
            cache = rt.cache()
            model(inputs_embeds=model.get_input_embeddings()(ids), past_key_values=cache, use_cache=True)
            slot = _disk_slot(rt, 0)
            faults.flip(_kv_file(rt), slot * rt.disk_tier.slot_bytes)
            model(torch.tensor([[5]]), past_key_values=cache, use_cache=True)
    assert_empty(tmp_path / "kv")


def test_a_write_that_fails_twice_stops_the_run_naming_disk_dir(tiny_gqa3_model, tmp_path: Path,
                                                                  monkeypatch, io: str) -> None:
    model = tiny_gqa3_model
    faults.install(monkeypatch, Faults(write_eio=-1))
    with pytest.raises(OSError, match=r"^\[Errno 5\] disk_dir: writing layer \d+ pages? \d+.* failed: "):
        _run(model, *_io_case(model, tmp_path / "kv", io))
    assert_empty(tmp_path / "kv")


def test_a_full_disk_mid_run_is_a_value_error_naming_disk_dir(tiny_gqa3_model, tmp_path: Path, monkeypatch, io: str) -> None:
    model = tiny_gqa3_model
    faults.install(monkeypatch, Faults(write_enospc=-1, after_writes=1))
    with pytest.raises(ValueError, match=r"^disk_dir: .* is full \(writing layer"):
        _run(model, *_io_case(model, tmp_path / "kv", io))
    assert_empty(tmp_path / "kv")


def test_a_full_disk_at_preallocation_is_one_error_naming_disk_dir(tiny_gqa3_model, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """fallocate fails when the file is created, at the first spill (growth mid-run: tests/test_io_robustness.py)."""
    model = tiny_gqa3_model

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ValueError, match=r"^disk_dir: .* free, the disk tier needs"):
        _run(model, _prompt(), _options(model, tmp_path / "kv"))
    assert_empty(tmp_path / "kv")


def test_a_stuck_read_hits_io_timeout(tiny_gqa3_model, tmp_path: Path, monkeypatch, io: str) -> None:
    model = tiny_gqa3_model
    plan = Faults()
    faults.install(monkeypatch, plan)

    def stick(rt) -> None:
        plan.stall_read, plan.short_read = 1.5, -1

    with pytest.raises(TimeoutError, match=r"io_timeout: a disk read of \d+ pages of layer \d+ did not finish in "
                                           r"0\.3 s"):
        _run(model, *_io_case(model, tmp_path / "kv", io, io_timeout=0.3), stick)
    assert_empty(tmp_path / "kv")


def _kill_threads(pool) -> None:
    """Makes every worker of `pool` exit, as a crash inside them would: SystemExit raised in each, asynchronously,
    delivered when a task wakes it. The pool is first made to start all its workers (it starts more while it has
    fewer than its maximum)."""
    gate = threading.Barrier(pool._max_workers + 1)
    for _ in range(pool._max_workers):
        pool.submit(gate.wait)
    gate.wait()
    threads = list(pool._threads)
    assert len(threads) == pool._max_workers
    for _ in range(200):  # raised inside a task, the exception is that task's: raise it again until they exit
        alive = [t for t in threads if t.is_alive()]
        if not alive:
            break
        for t in alive:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(SystemExit))
        pool.submit(int)
        alive[0].join(0.02)
    assert not any(t.is_alive() for t in threads)


def test_a_dead_io_thread_is_detected(tiny_gqa3_model, tmp_path: Path) -> None:
    model = tiny_gqa3_model

    def kill_io(rt) -> None:
        _kill_threads(rt.engine.pool)

    with pytest.raises(OSError, match=r"^\[Errno 5\] io: the I/O thread offload-io\S* died; a disk (read|write) of"):
        _run(model, _prompt(), _options(model, tmp_path / "kv", io_timeout=60), kill_io)
    assert_empty(tmp_path / "kv")


def test_a_dead_aio_thread_is_detected(tiny_gqa3_model, tmp_path: Path) -> None:
    """The disk tier's AIO ring loses the thread that reaps its completions: the next disk read or write fails at
    once with the thread's name (no io_timeout wait), and is not taken for a damaged page."""
    model = tiny_gqa3_model

    def kill_reaper(rt) -> None:
        ring = rt.disk_tier._ring
        thread = ring._thread
        for _ in range(200):
            if not thread.is_alive():
                break
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
            with ring._lock:
                ring._lock.notify_all()  # wakes it if it waits for work
            thread.join(0.02)
        assert not ring.alive()

    faults.skip_without_aio(tmp_path)
    with pytest.raises(OSError, match=r"^\[Errno 5\] io: the I/O thread offload-disk-aio died; a disk (read|write) of"):
        _run(model, *_io_case(model, tmp_path / "kv", "aio", io_timeout=60), kill_reaper)
    assert_empty(tmp_path / "kv")


# ---- the command line --------------------------------------------------------------------------------------------


def test_the_cli_reports_a_failed_run_in_one_line_and_exits_2(capsys, tmp_path: Path, tiny_model_dir: Path,
                                                               monkeypatch) -> None:
    faults.install(monkeypatch, Faults(write_eio=-1))
    kv = tmp_path / "kv"
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "hello " * 40,
                           "--page-size", "8", "--device-budget", "40KiB", "--host-budget", "4KiB",
                           "--disk-dir", str(kv), "--max-new-tokens", "4")
    assert code == 2
    line = assert_one_line_error(err, "--disk-dir")
    assert "Input/output error" in line and "failed" in line
    assert_empty(kv)


def test_the_cli_refuses_aio_where_pages_cant_take_o_direct(capsys, tmp_path: Path, tiny_model_dir: Path) -> None:
    """--io-engine aio with 1 KiB page halves: one line naming --io-engine and why, when the disk tier starts."""
    kv = tmp_path / "kv"
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "hello " * 40,
                           "--page-size", "8", "--device-budget", "16KiB", "--host-budget", "4KiB",
                           "--disk-dir", str(kv), "--max-new-tokens", "4", "--io-engine", "aio")
    assert code == 2
    line = assert_one_line_error(err, "--io-engine")
    assert line.endswith("it needs O_DIRECT, which this tier can't use: the half-page size 1024 B is not a multiple "
                         "of 4096")
    assert_empty(kv)


def test_a_dead_prefix_publisher_is_replaced_and_nothing_hangs(tiny_gqa3_model, tmp_path: Path) -> None:
    """The thread that writes pages to the prefix cache dies: waiting for it returns, its queued pages are counted
    as an error, and the next publish starts a new thread."""
    model = tiny_gqa3_model
    ids = _prompt(96)
    with offload(model, page_size=8, prefix_cache=str(tmp_path / "prefix")) as rt, torch.no_grad():
        cache = rt.cache()
        model(ids[:, :32], past_key_values=cache, use_cache=True)
        before = rt.stats()["prefix_cache"]
        thread = rt.prefix._thread
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
        model(ids[:, 32:64], past_key_values=cache, use_cache=True)  # wakes it: it dies with this publish
        thread.join(5)
        assert not thread.is_alive()
        died = rt.stats()["prefix_cache"]
        model(ids[:, 64:], past_key_values=cache, use_cache=True)
        after = rt.stats()["prefix_cache"]
    assert before["pages_written"] == 4 and died["errors"] == before["errors"] + 1
    assert died["pages_written"] == 4 and after["pages_written"] == 8  # pages 4..7 were lost with the thread


# ---- host pages: sealed when written, checked whenever copied out --------------------------------------------------


def _host_pages(rt, alone: bool) -> list[tuple[int, int, int]]:
    """(layer, page, host slot) of the pages in the host pool (`alone`: those with no copy in another tier)."""
    t = rt.table
    held = t.slot["host"] >= 0
    if alone:
        held &= (t.slot["device"] < 0) & (t.slot["disk"] < 0)
    return [(l, p, int(t.slot["host"][l, p])) for l, p in held.nonzero().tolist()]


def _flip_host(rt, slot: int, half: str = "k", at: int = 5) -> None:
    pool = rt.host_tier.k if half == "k" else rt.host_tier.v
    raw = pool[slot].view(-1).view(torch.uint8)
    raw[at] = raw[at] ^ 0x10


def test_a_flipped_host_page_is_rebuilt_before_it_is_loaded(tiny_gqa3_model, tmp_path: Path) -> None:
    """Host pages loaded by each decode step (layers with disk pages stream theirs): damage is caught at the copy,
    the page rebuilt in its slot (by the model: no other tier holds it), and every token is DynamicCache's."""
    model = tiny_gqa3_model
    ids = _prompt()
    hit = []

    def damage(rt) -> None:
        hit.extend(_host_pages(rt, alone=True))
        assert hit, "no page lives in the host pool alone"
        for i, (_, _, slot) in enumerate(hit):
            _flip_host(rt, slot, "kv"[i % 2])

    tokens, stats = _run(model, ids, _options(model, tmp_path / "kv"), damage)
    assert torch.equal(tokens, _reference(model, ids))
    assert stats["faults"]["damaged"] == len(hit) and stats["faults"]["recomputed"] == len(hit)
    assert_empty(tmp_path / "kv")


def test_a_damaged_host_page_never_reaches_the_disk(tiny_gqa3_model, tmp_path: Path) -> None:
    """Host pages evicted to disk are checked first: the disk gets the right page, under its own checksum."""
    model = tiny_gqa3_model
    ids = _prompt()
    expected = {}

    def damage(rt) -> None:
        host = rt.host_tier
        for layer, page, slot in _host_pages(rt, alone=True):
            expected[(layer, page)] = (host.k[slot].clone(), host.v[slot].clone())
            _flip_host(rt, slot)
        rt.placement.evict_host(len(expected))
        disk = rt.disk_tier
        for (layer, page), (k, v) in expected.items():
            slot = int(rt.table.slot["disk"][layer, page])
            assert slot >= 0 and int(rt.table.slot["host"][layer, page]) < 0
            kk, vv = torch.empty_like(k)[None], torch.empty_like(v)[None]
            disk.read([slot], kk, vv)  # passes the disk's checksum, and holds the page as it was
            assert torch.equal(kk[0], k) and torch.equal(vv[0], v)

    tokens, stats = _run(model, ids, _options(model, tmp_path / "kv"), damage)
    assert expected, "no page lives in the host pool alone"
    assert torch.equal(tokens, _reference(model, ids))
    assert stats["faults"]["damaged"] == len(expected)
    assert_empty(tmp_path / "kv")


def test_a_host_page_with_a_copy_on_disk_is_rebuilt_from_it(tiny_gqa3_model, tmp_path: Path) -> None:
    model = tiny_gqa3_model
    ids = _prompt()
    hit = []

    def damage(rt) -> None:
        t = rt.table
        streamed = ((t.slot["disk"] >= 0) & (t.slot["host"] < 0) & (t.slot["device"] < 0)).any(1)  # loads its pages
        for layer, page, slot in _host_pages(rt, alone=True):
            if not streamed[layer]:
                continue
            disk_slot = rt.disk_tier.allocate(1)
            rt.disk_tier.write(disk_slot, rt.host_tier.k[slot:slot + 1], rt.host_tier.v[slot:slot + 1])
            rt.table.set("disk", layer, page, disk_slot)
            _flip_host(rt, slot)
            hit.append(slot)

    tokens, stats = _run(model, ids, _options(model, tmp_path / "kv"), damage)
    assert hit
    assert torch.equal(tokens, _reference(model, ids))
    # (A page that leaves the host before it is loaded is read from its disk copy: nothing to rebuild.)
    assert 1 <= stats["faults"]["damaged"] == stats["faults"]["from_disk"] <= len(hit)
    assert stats["faults"]["recomputed"] == 0
    assert_empty(tmp_path / "kv")


def test_a_damaged_host_page_with_no_source_fails_naming_it(tiny_gqa3_model, tmp_path: Path) -> None:
    model = tiny_gqa3_model
    ids = _prompt()
    with pytest.raises(Unrecoverable, match=r"^\[Errno 5\] host: layer \d+ page \d+ \(slot \d+ of the host pool\) is "
                                            r"unreadable: checksum mismatch; .*embeddings"):
        with offload(model, **_options(model, tmp_path / "kv")) as rt, torch.no_grad():
            cache = rt.cache()
            model(inputs_embeds=model.get_input_embeddings()(ids), past_key_values=cache, use_cache=True)
            pages = _host_pages(rt, alone=True)
            assert pages
            _flip_host(rt, pages[0][2])
            model(torch.tensor([[5]]), past_key_values=cache, use_cache=True)
    assert_empty(tmp_path / "kv")


def test_host_pages_read_in_place_are_checked_each_step_when_asked(tiny_gqa3_model, monkeypatch) -> None:
    """No disk tier: exact steps on the CPU gather host pages straight from the pool; with the measurement switch
    on, they check them first."""
    monkeypatch.setattr(Runtime, "check_in_place", True)
    model = tiny_gqa3_model
    ids = _prompt()
    pb = _page_bytes(model, 8)
    options = dict(page_size=8, device_budget=(2 * model.config.num_hidden_layers + 4) * pb, host_budget=64 * pb)
    hit = []

    def damage(rt) -> None:
        hit.extend(_host_pages(rt, alone=True))
        for i, (_, _, slot) in enumerate(hit[:4]):
            _flip_host(rt, slot, "kv"[i % 2], at=3)

    tokens, stats = _run(model, ids, options, damage)
    assert len(hit) >= 4
    assert torch.equal(tokens, _reference(model, ids))
    assert stats["faults"]["damaged"] == 4 and stats["faults"]["recomputed"] == 4
