"""Runtimes that share a process, a thread pool of the interpreter or a disk directory stay apart.

- Two different models, each under its own `offload()`, nested and one after the other, and the same model twice
  in sequence: each gives the greedy tokens of the model alone with DynamicCache, and the statistics of one
  runtime are those of a run of its model alone, whatever the other did.
- Two threads, each decoding its own model under its own `offload()` at the same time, with separate or shared
  disk directories: both give their DynamicCache tokens.
- Two processes sharing a disk directory: each keeps its own slot file (`offload-<pid>-<hex>.kv`) while the other
  starts, decodes and exits; the stale-file cleanup removes a dead process's file and leaves a live one's; both
  give their DynamicCache tokens, and none of their files is left.

Every run spills: budgets of a few pages push most of a 200-token prompt to the host and the disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from offload import offload

pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parents[1]
PROMPT = 200
NEW = 12
PAGE = 8
# The statistics that a run determines (no timings): equal for equal runs.
COUNTED = ("bytes_moved", "resident_bytes", "peak_resident_bytes", "budgets", "kv_bytes", "tokens", "loads",
           "evictions")


def spilling(model, disk_dir: Path) -> dict:
    """A device holding a few pages per layer and a host holding 4: most of the sequence goes to disk."""
    c = model.config
    pb = 2 * c.num_key_value_heads * PAGE * (c.hidden_size // c.num_attention_heads) * 4
    layers = c.num_hidden_layers
    return dict(page_size=PAGE, device_budget=(2 * layers + 8) * pb, host_budget=4 * pb, disk_dir=str(disk_dir))


def prompt(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids: torch.Tensor, new: int = NEW) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)


def reference(model, ids: torch.Tensor, new: int = NEW) -> torch.Tensor:
    """The model alone, with transformers' ordinary cache."""
    with torch.no_grad():
        return model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False)


def counted(stats: dict) -> dict:
    return {k: stats[k] for k in COUNTED}


def offload_names() -> set[str]:
    return {name for name in AttentionInterface._global_mapping if name.startswith("offload-")}


@pytest.fixture(scope="module")
def models(tiny_llama_model, tiny_gqa3_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """name -> (model, prompt, DynamicCache tokens, counted stats of a run of the model alone under offload())."""
    out = {}
    for name, model, seed in (("a", tiny_llama_model, 11), ("b", tiny_gqa3_model, 12)):
        ids = prompt(seed)
        ref = reference(model, ids)
        path = tmp_path_factory.mktemp(f"alone-{name}")
        with offload(model, **spilling(model, path)) as rt:
            assert torch.equal(greedy(model, ids), ref)
            alone = counted(rt.stats())
        assert alone["bytes_moved"]["host->disk"] > 0 and alone["bytes_moved"]["disk->host"] > 0
        assert not any(path.iterdir())
        out[name] = (model, ids, ref, alone)
    return out


# ---- two runtimes in one process ---------------------------------------------------------------------------------


def test_two_models_nested_each_exact_and_counted_alone(models, tmp_path: Path) -> None:
    (a, ids_a, ref_a, alone_a), (b, ids_b, ref_b, alone_b) = models["a"], models["b"]
    names = offload_names()
    with offload(a, **spilling(a, tmp_path / "kv-a")) as ra:
        assert torch.equal(greedy(a, ids_a), ref_a)
        after_a = ra.stats()
        with offload(b, **spilling(b, tmp_path / "kv-b")) as rb:
            assert a.config._attn_implementation == ra.attention_name
            assert b.config._attn_implementation == rb.attention_name
            assert torch.equal(greedy(b, ids_b), ref_b)
            assert counted(rb.stats()) == alone_b
            assert ra.stats() == after_a  # b's run moved nothing of a's
            assert torch.equal(greedy(a, ids_a), ref_a)  # a still runs on its own runtime inside b's block
            assert counted(rb.stats()) == alone_b  # ... and a's second run is not counted in b's runtime
        assert ra.stats()["tokens"]["prefill"] == 2 * PROMPT
        assert torch.equal(greedy(a, ids_a), ref_a)
    assert counted(after_a) == alone_a
    assert offload_names() == names
    assert not any((tmp_path / "kv-a").iterdir()) and not any((tmp_path / "kv-b").iterdir())


def test_two_models_one_after_the_other_each_exact_and_counted_alone(models, tmp_path: Path) -> None:
    (a, ids_a, ref_a, alone_a), (b, ids_b, ref_b, alone_b) = models["a"], models["b"]
    impl_a, impl_b = a.config._attn_implementation, b.config._attn_implementation
    with offload(a, **spilling(a, tmp_path / "kv")) as ra:
        assert torch.equal(greedy(a, ids_a), ref_a)
    after_a = ra.stats()
    with offload(b, **spilling(b, tmp_path / "kv")) as rb:
        assert torch.equal(greedy(b, ids_b), ref_b)
    assert counted(after_a) == alone_a and counted(rb.stats()) == alone_b
    assert ra.stats() == after_a
    assert (a.config._attn_implementation, b.config._attn_implementation) == (impl_a, impl_b)
    # Each model, outside any block, is the plain model again.
    assert torch.equal(reference(a, ids_a), ref_a) and torch.equal(reference(b, ids_b), ref_b)
    assert not any((tmp_path / "kv").iterdir())


def test_the_same_model_twice_in_sequence_starts_from_nothing(models, tmp_path: Path) -> None:
    """The second runtime of a model counts only its own run, in a disk directory the first one left empty; the
    first runtime's statistics stay readable and unchanged, and its caches are refused."""
    a, ids_a, ref_a, alone_a = models["a"]
    runs = []
    for _ in range(2):
        with offload(a, **spilling(a, tmp_path / "kv")) as rt:
            assert torch.equal(greedy(a, ids_a), ref_a)
            of_run = rt.stats()
            cache = rt.cache()  # a new sequence: the run's pages are released
        runs.append((rt, of_run, rt.stats()))
        assert not any((tmp_path / "kv").iterdir())
    (first, first_run, first_end), (second, second_run, _) = runs
    assert counted(first_run) == counted(second_run) == alone_a
    assert first.stats() == first_end  # the second runtime changed nothing of the first's
    assert first.attention_name != second.attention_name
    assert first.attention_name not in offload_names() and second.attention_name not in offload_names()
    with pytest.raises(ValueError, match="^cache: "):
        a(input_ids=ids_a[:, :1], past_key_values=cache, use_cache=True)


# ---- two threads ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_dir", [False, True], ids=["own-dirs", "shared-dir"])
def test_two_threads_each_with_its_own_runtime(models, tmp_path: Path, shared_dir: bool) -> None:
    """Each thread enters its own block and generates three times, the two threads released together each time;
    both give their DynamicCache tokens every time and leave their directories empty."""
    rounds = 3
    barrier = threading.Barrier(2, timeout=120)
    results: dict[str, list] = {}
    errors: list[BaseException] = []
    files_seen: list[set[str]] = []
    dirs = {name: tmp_path / ("kv" if shared_dir else f"kv-{name}") for name in models}

    def work(name: str) -> None:
        model, ids, ref, alone = models[name]
        try:
            with offload(model, **spilling(model, dirs[name])) as rt:
                outs = []
                for _ in range(rounds):
                    barrier.wait()
                    outs.append(greedy(model, ids))
                    barrier.wait()  # both runtimes hold their disk files here
                    files_seen.append({p.name for d in set(dirs.values()) for p in d.iterdir()})
                    barrier.wait()
                results[name] = [outs, rt.stats(), os.path.basename(rt.disk_tier.path)]
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(name,), name=f"isolation-{name}") for name in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    for name, (outs, stats, _) in results.items():
        _, _, ref, alone = models[name]
        assert all(torch.equal(out, ref) for out in outs), name
        assert stats["tokens"] == {k: rounds * v for k, v in alone["tokens"].items()}
        assert stats["bytes_moved"]["host->disk"] > 0 and stats["bytes_moved"]["disk->host"] > 0
    own_files = {results[name][2] for name in models}
    assert len(own_files) == 2 and all(f.startswith(f"offload-{os.getpid()}-") for f in own_files)
    assert all(seen == own_files for seen in files_seen)
    for d in set(dirs.values()):
        assert not any(d.iterdir())


# ---- two processes -----------------------------------------------------------------------------------------------

# A process that decodes a tiny model under offload() in a shared disk directory, in step with another one through
# marker files: both prefill (each now holds its slot file), both decode NEW tokens, then "first" leaves its block
# while "second" waits, and "second" decodes EXTRA more tokens over pages it wrote before "first" left. It prints
# one JSON line: its tokens, the DynamicCache tokens, its file and what it saw in the directory.
WORKER = r'''
import json, os, sys, time
import torch
from transformers import DynamicCache
from offload import offload
from offload.models import tiny_llama

disk_dir, sync, role, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
other = "second" if role == "first" else "first"
PROMPT, NEW, EXTRA, PAGE = 200, 16, 8, 8
torch.set_num_threads(1)


def mark(name):
    open(os.path.join(sync, f"{role}.{name}"), "w").close()


def wait(name):
    deadline = time.monotonic() + 240
    while not os.path.exists(os.path.join(sync, f"{other}.{name}")):
        if time.monotonic() > deadline:
            raise SystemExit(f"{role}: timed out waiting for {other}.{name}")
        time.sleep(0.01)


def step(model, token, cache):
    out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    return int(out.logits[0, -1].argmax())


model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=seed)
ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(seed))
pb = 2 * 2 * PAGE * 16 * 4
report = {"pid": os.getpid()}
with torch.no_grad():
    cache = DynamicCache(config=model.config)
    ref = [int(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())]
    for _ in range(NEW + EXTRA - 1):
        ref.append(step(model, ref[-1], cache))
    report["reference"] = ref
    opts = dict(page_size=PAGE, device_budget=12 * pb, host_budget=4 * pb, disk_dir=disk_dir)
    with offload(model, **opts) as rt:
        rt.expect_tokens(PROMPT + NEW + EXTRA)
        cache = rt.cache()
        tokens = [int(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())]
        mine = rt.disk_tier.path
        report["file"] = os.path.basename(mine)
        mark("ready")
        wait("ready")
        report["seen_ready"] = sorted(os.listdir(disk_dir))
        for _ in range(NEW - 1):
            tokens.append(step(model, tokens[-1], cache))
        report["disk_pages"] = rt.placement.resident_pages()["disk"]
        mark("decoded")
        wait("decoded")
        report["seen_decoded"] = sorted(os.listdir(disk_dir))
        mark("listed")
        wait("listed")  # neither leaves its block before both have looked
        if role == "second":
            wait("closed")  # the other process has left its block and removed its file
            report["seen_after_other"] = sorted(os.listdir(disk_dir))
            for _ in range(EXTRA):
                tokens.append(step(model, tokens[-1], cache))
        report["disk_read"] = rt.stats()["bytes_moved"]["disk->host"]
    if role == "first":
        report["seen_closed"] = sorted(os.listdir(disk_dir))
        mark("closed")
    report["tokens"] = tokens
print(json.dumps(report))
'''


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def test_two_processes_share_a_disk_dir(tmp_path: Path) -> None:
    kv, sync = tmp_path / "kv", tmp_path / "sync"
    kv.mkdir()
    sync.mkdir()
    # A file left by a process that no longer exists (removed by whichever process starts its disk tier first), and
    # one of a live process, this one (left alone by both).
    stale = kv / f"offload-{_dead_pid()}-0123456789ab.kv"
    stale.write_bytes(b"\0" * 4096)
    live = kv / f"offload-{os.getpid()}-0123456789ab.kv"
    live.write_bytes(b"\1" * 4096)
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = {role: subprocess.Popen([sys.executable, str(script), str(kv), str(sync), role, str(seed)], cwd=REPO,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role, seed in (("first", 21), ("second", 22))}
    reports = {}
    try:
        deadline = time.monotonic() + 300
        for role, proc in procs.items():
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, f"{role}:\n{err}"
            reports[role] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs.values():
            proc.kill()
    first, second = reports["first"], reports["second"]
    for r in (first, second):
        assert r["tokens"] == r["reference"][:len(r["tokens"])]
        assert r["file"].startswith(f"offload-{r['pid']}-") and r["file"].endswith(".kv")
        assert r["disk_pages"] > 0 and r["disk_read"] > 0
    assert len(second["tokens"]) == len(second["reference"])
    both = sorted([first["file"], second["file"], live.name])
    assert first["seen_ready"] == second["seen_ready"] == both  # the stale file is gone, the live one stays
    assert first["seen_decoded"] == second["seen_decoded"] == both
    assert first["seen_closed"] == second["seen_after_other"] == sorted([second["file"], live.name])
    assert live.read_bytes() == b"\1" * 4096
    assert sorted(os.listdir(kv)) == [live.name]
