"""The prefix cache (offload/prefix.py) and continued sequences, end to end on tiny random models: a later runtime
(or process) loads the stored pages of a shared prefix and computes only the rest, with the tokens of the model's
own DynamicCache; a conversation in one block computes no earlier turn; a corrupted, truncated or foreign entry is
a miss; a dead server is a miss; concurrent publishers leave whole entries.

The server tests run against a real valkey-server (tests/servers.py); nothing here fakes it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from offload import offload
from offload.models import tiny_llama
from offload.prefix import CorruptEntry, EntryFormat, TokenLog, chain_keys, model_fingerprint

from test_architectures import tiny as tiny_arch

PAGE = 16
NEW = 8
DOC = 150  # 9 full pages and 6 tokens


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=3)


def ids_of(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (1, n), generator=g)


DOCUMENT = ids_of(DOC, 0)


def question(seed: int, n: int = 11) -> torch.Tensor:
    return torch.cat([DOCUMENT, ids_of(n, seed)], dim=1)


@torch.no_grad()
def greedy(model, ids: torch.Tensor, **kwargs) -> list[int]:
    # An explicit all-ones mask: some configs have a pad token id that a random prompt may hold.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def options(tmp_path: Path, store: str, **more) -> dict:
    """Three tiers with most pages below the device, and the prefix cache."""
    return {"device_budget": 24 * 1024, "host_budget": 32 * 1024, "disk_dir": str(tmp_path / "kv"),
            "page_size": PAGE, "prefix_cache": store, **more}


def run(model, ids: torch.Tensor, opts: dict) -> tuple[list[int], dict]:
    with offload(model, **opts) as rt:
        tokens = greedy(model, ids)
        stats = rt.stats()
    return tokens, stats


# -- keys and entries ------------------------------------------------------------------------------------------

def test_chain_keys_fix_the_whole_prefix():
    root = "ab" * 32
    ids = list(range(100))
    keys = chain_keys(root, ids, 16)
    assert len(keys) == 6 and len(set(keys)) == 6
    assert chain_keys(root, ids[:40], 16) == keys[:2]  # a prefix has the prefix's keys
    assert chain_keys(root, ids, 16, keys[:3]) == keys  # extending gives the same keys
    changed = ids.copy()
    changed[20] = 999  # in page 1: pages 0 keeps its key, every later one changes
    other = chain_keys(root, changed, 16)
    assert other[0] == keys[0] and all(a != b for a, b in zip(other[1:], keys[1:]))
    assert chain_keys("cd" * 32, ids, 16)[0] != keys[0]  # another model's root


def test_fingerprint_tells_models_dtypes_and_settings_apart(model):
    base = model_fingerprint(model, torch.float32, 16, "none")
    assert model_fingerprint(model, torch.float32, 16, "none") == base
    other = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=4)  # same shapes, other weights
    assert model_fingerprint(other, torch.float32, 16, "none") != base
    assert model_fingerprint(model, torch.bfloat16, 16, "none") != base
    assert model_fingerprint(model, torch.float32, 32, "none") != base
    assert model_fingerprint(model, torch.float32, 16, "k8v4") != base


def test_entries_round_trip_and_every_mismatch_is_corrupt():
    fmt = EntryFormat("ab" * 32, layers=2, heads=2, page_size=4, head_dim=8, dtype=torch.bfloat16)
    page = torch.randn(2, 2, 2, 4, 8).to(torch.bfloat16)
    key = "12" * 32
    data = fmt.encode(key, page)
    assert torch.equal(fmt.decode(data, key), page)
    cases = {
        "another key": (data, "34" * 32),
        "truncated": (data[:-1], key),
        "empty": (b"", key),
        "not an entry": (b"x" * len(data), key),
    }
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    cases["a flipped payload bit"] = (bytes(flipped), key)
    foreign = EntryFormat("cd" * 32, 2, 2, 4, 8, torch.bfloat16).encode(key, page)
    cases["another model"] = (foreign, key)
    wider = EntryFormat("ab" * 32, 2, 2, 4, 8, torch.float32).encode(key, page.float())
    cases["another dtype"] = (wider, key)
    for name, (blob, k) in cases.items():
        with pytest.raises(CorruptEntry):
            fmt.decode(blob, k)
            pytest.fail(name)


def test_token_log_follows_forwards():
    log = TokenLog()
    log.feed(torch.tensor([[1, 2, 3]]), held=0)
    log.feed(torch.tensor([[4]]), held=3)
    assert log.list() == [1, 2, 3, 4]
    log.feed(torch.tensor([[9, 9]]), held=2)  # a forward after one that stored nothing past token 2
    assert log.list() == [1, 2, 9, 9]
    log.feed(None, held=4)  # a forward on embeddings: the ids are unknown from then on
    assert log.list() is None


# -- a later runtime loads the shared prefix -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["exact", "sparse", "k8v4", "publish-all"])
def test_a_new_runtime_loads_the_document_and_gives_the_same_tokens(model, tmp_path: Path, mode: str):
    more = {"sparse": {"attention": "sparse", "token_budget": 1.0},
            "k8v4": {"kv_quant": "k8v4"},
            "publish-all": {"prefix_cache_publish": "all"}}.get(mode, {})
    opts = options(tmp_path, str(tmp_path / "prefix"), **more)
    first, s1 = run(model, question(1), opts)
    second, s2 = run(model, question(2), opts)
    # The same settings without a prefix cache: the loaded pages must place exactly as computed ones.
    alone, _ = run(model, question(2), {**opts, "prefix_cache": None})
    assert second == alone
    if mode in ("exact", "publish-all"):
        assert second == greedy(model, question(2), past_key_values=DynamicCache())
    pc1, pc2 = s1["prefix_cache"], s2["prefix_cache"]
    assert pc1["misses"] == 1 and pc1["pages_written"] == (DOC + 11) // PAGE
    shared = DOC // PAGE  # the document's full pages; the page holding the question differs
    assert pc2["hits"] == 1 and pc2["pages_loaded"] == shared and pc2["corrupt"] == 0
    assert s2["tokens"]["loaded"] == shared * PAGE
    assert s2["tokens"]["prefill"] == question(2).shape[1] - shared * PAGE  # only the rest was computed
    assert pc2["bytes_read"] > 0 and pc2["time_saved_seconds"] is not None
    assert not os.listdir(tmp_path / "kv")  # the disk tier's files are gone; the store stays
    if mode == "publish-all":
        # The pages of the generated tokens were published too: a prompt holding them loads them.
        continued = torch.cat([question(1), torch.tensor([first])], dim=1)
        _, s3 = run(model, continued, opts)
        assert s3["prefix_cache"]["pages_loaded"] == (continued.shape[1] - 1) // PAGE


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_models_load_a_prefix_longer_than_the_window(arch, tmp_path: Path):
    m = tiny_arch(arch)
    opts = {"page_size": PAGE, "prefix_cache": str(tmp_path / "prefix")}
    run(m, question(1), opts)
    second, stats = run(m, question(2), opts)
    assert stats["prefix_cache"]["pages_loaded"] == DOC // PAGE
    assert second == greedy(m, question(2), past_key_values=DynamicCache(config=m.config))


def test_another_model_finds_nothing(model, tmp_path: Path):
    opts = options(tmp_path, str(tmp_path / "prefix"))
    run(model, question(1), opts)
    other = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=5)
    tokens, stats = run(other, question(1), opts)
    assert stats["prefix_cache"]["pages_loaded"] == 0 and stats["prefix_cache"]["corrupt"] == 0
    assert tokens == greedy(other, question(1), past_key_values=DynamicCache())


def _entry_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and p.suffix == ".kv")


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_a_damaged_entry_is_counted_and_recomputed(model, tmp_path: Path, damage: str, caplog):
    store = tmp_path / "prefix"
    opts = options(tmp_path, str(store))
    run(model, question(1), opts)
    files = _entry_files(store)
    assert len(files) == (DOC + 11) // PAGE
    # Damage the entry of page 4 (found by loading each: its key is in its header).
    from offload.prefix import _HEAD
    import json

    def key_of(path: Path) -> str:
        data = path.read_bytes()
        return json.loads(data[_HEAD.size:_HEAD.size + _HEAD.unpack_from(data)[1]])["key"]

    keys = chain_keys(model_fingerprint(model, torch.float32, PAGE, "none"), question(1)[0].tolist(), PAGE)
    victim = next(p for p in files if key_of(p) == keys[4])
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) - 100]
    else:  # an entry of another page stored under this key
        data = bytearray(next(p for p in files if key_of(p) == keys[5]).read_bytes())
    victim.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="offload.prefix"):
        tokens, stats = run(model, question(2), opts)
    pc = stats["prefix_cache"]
    assert pc["corrupt"] == 1 and pc["pages_loaded"] == 4  # the pages before the damaged one
    assert stats["tokens"]["prefill"] == question(2).shape[1] - 4 * PAGE
    assert tokens == greedy(model, question(2), past_key_values=DynamicCache())
    assert any("unusable" in r.getMessage() for r in caplog.records)
    # The damaged entry was dropped, and the run wrote it again (with the pages of its own question).
    _, again = run(model, question(2), opts)
    pc = again["prefix_cache"]
    assert pc["pages_loaded"] == (question(2).shape[1] - 1) // PAGE and pc["corrupt"] == 0


# -- conversations in one block --------------------------------------------------------------------------------

def _conversation(model, turns: list[torch.Tensor], cache=None) -> list[list[int]]:
    ids = torch.empty((1, 0), dtype=torch.long)
    outs = []
    for turn in turns:
        ids = torch.cat([ids, turn], dim=1)
        kwargs = {} if cache is None else {"past_key_values": cache}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             **kwargs)
        outs.append(out[0, ids.shape[1]:].tolist())
        ids = out
    return outs


def test_a_three_turn_conversation_computes_no_earlier_turn(model, tmp_path: Path):
    turns = [ids_of(120, 10), ids_of(13, 11), ids_of(40, 12)]
    expected = _conversation(model, turns, DynamicCache())
    with offload(model, **options(tmp_path, None)) as rt:
        got = _conversation(model, turns)
        stats = rt.stats()
    assert got == expected
    # Each turn computed its own tokens only: the first prompt, then the last answer token and the new turn.
    assert stats["tokens"]["prefill"] == 120 + (1 + 13) + (1 + 40)
    assert stats["tokens"]["reused"] == (120 + NEW - 1) + (120 + NEW + 13 + NEW - 1)


def test_a_prompt_that_does_not_extend_the_sequence_starts_a_new_one(model, tmp_path: Path):
    with offload(model, **options(tmp_path, None)) as rt:
        greedy(model, question(1))
        tokens = greedy(model, question(2))  # shares the document, but not the question
        stats = rt.stats()
    assert tokens == greedy(model, question(2), past_key_values=DynamicCache())
    assert stats["tokens"]["reused"] == 0
    assert stats["tokens"]["prefill"] == question(1).shape[1] + question(2).shape[1]


def test_cli_generation_loads_the_prefix(model, tmp_path: Path):
    """The command line's loop (tools/common.generate_stream) asks the runtime with the prompt's ids."""
    from tools.common import generate_stream

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    opts = options(tmp_path, str(tmp_path / "prefix"))
    outs, loaded = [], []
    for q in (1, 2, 2):
        with offload(model, **opts) as rt:
            outs.append(generate_stream(model, Tok(), rt, question(q), NEW, lambda s: None, prefill_chunk=32,
                                        progress=False))
            loaded.append(rt.stats()["prefix_cache"]["pages_loaded"])
    assert loaded == [0, DOC // PAGE, (question(2).shape[1] - 1) // PAGE]
    assert outs[1] == outs[2] == greedy(model, question(2), past_key_values=DynamicCache())[:len(outs[1])]


# -- the server store --------------------------------------------------------------------------------------------

def test_a_new_runtime_loads_from_the_server(model, tmp_path: Path, kv_server):
    opts = options(tmp_path, kv_server.url)
    run(model, question(1), opts)
    tokens, stats = run(model, question(2), opts)
    assert stats["prefix_cache"]["store"] == "valkey"
    assert stats["prefix_cache"]["pages_loaded"] == DOC // PAGE
    assert tokens == greedy(model, question(2), past_key_values=DynamicCache())


def test_a_server_killed_mid_run_stops_nothing(model, tmp_path: Path, kv_server, caplog):
    opts = options(tmp_path, kv_server.url, prefix_cache_publish="all", prefix_cache_timeout=1.0)
    run(model, question(1), opts)
    steps = []

    def kill_on_third_step(module, args, kwargs):
        steps.append(1)
        if len(steps) == 3:
            kv_server.kill()

    with caplog.at_level(logging.WARNING, logger="offload.prefix"):
        with offload(model, **opts) as rt:
            hook = model.register_forward_pre_hook(kill_on_third_step, with_kwargs=True)
            try:
                tokens = greedy(model, question(2))
            finally:
                hook.remove()
            stats = rt.stats()
        # A new runtime with the server gone: a miss, computed.
        later, later_stats = run(model, question(2), opts)
    expected = greedy(model, question(2), past_key_values=DynamicCache())
    assert tokens == expected and later == expected
    assert stats["prefix_cache"]["pages_loaded"] == DOC // PAGE
    assert later_stats["prefix_cache"]["pages_loaded"] == 0 and later_stats["prefix_cache"]["errors"] >= 1
    warnings = [r.getMessage() for r in caplog.records if "prefix cache" in r.getMessage()]
    assert warnings and all("\n" not in w for w in warnings)


def test_an_unreachable_server_is_a_warning_and_a_miss(model, tmp_path: Path, caplog):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    opts = options(tmp_path, f"redis://127.0.0.1:{port}/0", prefix_cache_timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="offload.prefix"):
        tokens, stats = run(model, question(1), opts)
    assert tokens == greedy(model, question(1), past_key_values=DynamicCache())
    assert stats["prefix_cache"]["errors"] >= 1 and stats["prefix_cache"]["pages_loaded"] == 0
    assert sum("unreachable" in r.getMessage() or "failed" in r.getMessage() for r in caplog.records) == 1


# -- concurrent publishers ---------------------------------------------------------------------------------------

_PUBLISHER = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from offload import offload
    from offload.models import tiny_llama
    import test_prefix_cache as t
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=3)
    torch.set_num_threads(1)
    with offload(model, page_size=t.PAGE, prefix_cache=sys.argv[1]) as rt:
        tokens = t.greedy(model, t.question(int(sys.argv[2])))
        stats = rt.stats()["prefix_cache"]
    print(json.dumps({{"tokens": tokens, "loaded": stats["pages_loaded"], "corrupt": stats["corrupt"]}}))
""")


@pytest.mark.parametrize("store", ["dir", "server"])
def test_four_processes_publishing_at_once_leave_whole_entries(model, tmp_path: Path, store: str, request):
    import json

    spec = str(tmp_path / "prefix") if store == "dir" else request.getfixturevalue("kv_server").url
    script = tmp_path / "publish.py"
    script.write_text(_PUBLISHER.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                                          os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), spec, "1"], stdout=subprocess.PIPE, env=env)
             for _ in range(4)]
    results = [json.loads(p.communicate(timeout=240)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    fifth = subprocess.run([sys.executable, str(script), spec, "1"], stdout=subprocess.PIPE, env=env, timeout=240)
    last = json.loads(fifth.stdout)
    assert last["corrupt"] == 0 and last["loaded"] == (question(1).shape[1] - 1) // PAGE
    assert all(r["tokens"] == last["tokens"] for r in results)
    assert last["tokens"] == greedy(model, question(1), past_key_values=DynamicCache())
    if store == "dir":
        assert not [p for p in (tmp_path / "prefix").rglob("*") if ".tmp" in p.name]
