"""Profiling: the Chrome trace, the sampler, the summary's interval arithmetic, the timeline PNG, and end to end
on a tiny random Llama over three tiers, through the Python API and through `offload profile`.

Cheap layers first: synthetic tracers with hand-checkable answers, then one real run shared by the end-to-end
tests (module fixture), then the CLI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from offload.report import (
    difference,
    intersection_length,
    plot_timeline,
    summarize,
    summary_markdown,
    union,
    union_length,
)
from offload.sampler import Sampler
from offload.trace import TRACK_ORDER, Tracer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_chrome(doc: dict) -> list[dict]:
    """Asserts the Chrome trace-event invariants and returns the events."""
    assert set(doc) == {"traceEvents", "displayTimeUnit"} and doc["displayTimeUnit"] == "ms"
    events = doc["traceEvents"]
    for ev in events:
        for key in ("ph", "ts", "pid", "tid"):
            assert key in ev, (key, ev)
        assert ev["ph"] in ("M", "X", "i", "C"), ev
        if ev["ph"] == "X":
            assert "dur" in ev and ev["dur"] >= 0, ev
        assert ev["ts"] >= 0, ev
    return events


def thread_names(events: list[dict]) -> dict[int, str]:
    return {ev["tid"]: ev["args"]["name"] for ev in events if ev["ph"] == "M" and ev["name"] == "thread_name"}


def check_png(path: str) -> None:
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def synthetic() -> Tracer:
    """A hand-made run at t = 10 s: compute [0,4] and [6,8]; host->device [1,2] and [3,7]; disk read [7,9];
    stall [4,6] (layer 1) and [9,10] (layer 0); occupancy device 0 for 2 s, then 100 bytes until t=10."""
    tr = Tracer()
    t0 = 10.0
    tr.span("compute", "attention", t0 + 0, t0 + 4, layer=0, pages=2, tokens=32)
    tr.span("compute", "attention", t0 + 6, t0 + 8, layer=1, pages=2, tokens=32)
    h2d = {"src": "host", "dst": "device", "thread": "h2d"}
    tr.span("host->device", "load", t0 + 1, t0 + 2, bytes=1000, pages=1, layer=0, **h2d)
    tr.span("host->device", "prefetch", t0 + 3, t0 + 7, bytes=3000, pages=3, layer=1, **h2d)
    tr.span("disk read", "load", t0 + 7, t0 + 9, bytes=2000, pages=2, layer=1, src="disk", dst="host", thread="io-0")
    tr.span("stall", "wait", t0 + 4, t0 + 6, layer=1, on="host->device")
    tr.span("stall", "wait", t0 + 9, t0 + 10, layer=0, on="disk read")
    tr.instant("policy", "evict", t0 + 5, tier="device", pages=1, layer=0)
    tr.instant("policy", "prefetch hit", t0 + 3, layer=1, pages=3)
    tr.counter("occupancy", t0 + 0, {"device": 0, "host": 0, "disk": 0})
    tr.counter("occupancy", t0 + 2, {"device": 100, "host": 50, "disk": 0})
    return tr


# ---- intervals -------------------------------------------------------------------------------------------------


def test_interval_arithmetic() -> None:
    assert union([(3, 5), (0, 1), (0.5, 2), (5, 6), (7, 7)]) == [(0, 2), (3, 6)]
    assert union_length([(0, 2), (1, 3), (10, 11)]) == 4
    assert intersection_length([(0, 4), (6, 8)], [(1, 2), (3, 7)]) == 1 + 1 + 1
    assert intersection_length([(0, 1)], [(2, 3)]) == 0
    assert intersection_length([], [(0, 1)]) == 0
    assert difference([(0, 10), (12, 14)], [(1, 2), (3, 4), (9, 13)]) == [(0, 1), (2, 3), (4, 9), (13, 14)]
    assert difference([(0, 1)], []) == [(0, 1)] and difference([(0, 1)], [(-1, 2)]) == []


# ---- trace -----------------------------------------------------------------------------------------------------


def test_chrome_trace_tracks_and_units(tmp_path: Any) -> None:
    tr = synthetic()
    path = tmp_path / "trace.json"
    tr.save(path)
    events = check_chrome(json.loads(path.read_text()))
    names = thread_names(events)
    # Tracks in the fixed order, the counters on "samples".
    in_tid_order = [names[t] for t in sorted(names)]
    assert in_tid_order == ["compute", "host->device", "disk read", "stall", "policy", "samples"]
    assert in_tid_order == [t for t in TRACK_ORDER if t in names.values()]
    tid = {name: t for t, name in names.items()}
    by_ph = lambda ph: [ev for ev in events if ev["ph"] == ph]  # noqa: E731
    spans = by_ph("X")
    assert len(spans) == 7
    assert {ev["tid"] for ev in spans} == {tid[n] for n in ("compute", "host->device", "disk read", "stall")}
    first = min(spans, key=lambda ev: ev["ts"])
    assert first["ts"] == 0 and first["dur"] == pytest.approx(4e6)  # microseconds from the first event
    load = next(ev for ev in spans if ev["name"] == "prefetch")
    assert load["ts"] == pytest.approx(3e6) and load["args"]["bytes"] == 3000 and load["tid"] == tid["host->device"]
    instants = by_ph("i")
    assert {ev["name"] for ev in instants} == {"evict", "prefetch hit"}
    assert all(ev["s"] == "t" and ev["tid"] == tid["policy"] for ev in instants)
    counters = by_ph("C")
    assert [ev["args"]["device"] for ev in counters] == [0, 100] and all(ev["tid"] == tid["samples"] for ev in counters)


def test_chrome_trace_odd_args_and_empty() -> None:
    tr = Tracer()
    assert check_chrome(tr.to_chrome())[0]["args"]["name"] == "offload"
    tr.span("my track", "x", 1.0, 2.0, device=torch.device("cpu"), n=torch.tensor(3), bad=float("nan"))
    events = check_chrome(json.loads(json.dumps(tr.to_chrome(), allow_nan=False)))
    x = next(ev for ev in events if ev["ph"] == "X")
    assert x["args"] == {"device": "cpu", "n": 3, "bad": None}
    assert thread_names(events)[x["tid"]] == "my track"


def test_sampler_records_host_counters() -> None:
    """Host RSS and disk I/O exist on every machine; GPU counters only with CUDA and NVML (silently absent)."""
    tr = Tracer()
    with Sampler(tr, interval=0.01) as s:
        torch.ones(1 << 20).sum()
        time.sleep(0.05)
    assert "host rss" in s.sources
    rss = tr.samples("host rss")
    assert len(rss) >= 3 and all(c.values["rss"] > 0 for c in rss)
    if not torch.cuda.is_available():
        assert not tr.samples("gpu memory") and not tr.samples("pcie")
    with pytest.raises(ValueError, match="interval"):
        Sampler(tr, interval=0)


# ---- summary ---------------------------------------------------------------------------------------------------


def test_summary_arithmetic_on_synthetic_intervals() -> None:
    tr = synthetic()
    s = summarize({}, tr)
    t = s["time"]
    assert t["wall_seconds"] == pytest.approx(10)
    assert t["compute_seconds"] == t["compute_span_seconds"] == pytest.approx(6)  # [0,4] + [6,8]
    assert t["transfer_seconds"] == pytest.approx(7)  # [1,2] + [3,9]
    assert t["overlap_seconds"] == pytest.approx(4)  # [1,2] + [3,4] + [6,8]
    assert t["stall_seconds"] == pytest.approx(3) and t["stall_traced_seconds"] == pytest.approx(3)
    assert t["idle_seconds"] == pytest.approx(0)  # compute ∪ transfer ∪ stall covers [0,10]
    h2d = s["transfers"]["host->device"]
    assert h2d["bytes"] == 4000 and h2d["spans"] == 2 and h2d["busy_seconds"] == pytest.approx(5)
    assert h2d["bandwidth_gbps"] == pytest.approx(4000 / 5 / 1e9)
    assert s["transfers"]["disk->host"]["bytes"] == 2000 and s["transfers"]["host->disk"]["bandwidth_gbps"] is None
    assert s["stall_seconds_per_layer"] == pytest.approx([1, 2])
    # device: 0 for 2 s, then 100 for 8 s -> mean 80.
    assert s["occupancy"]["device"]["mean_bytes"] == pytest.approx(80)
    assert s["occupancy"]["host"]["mean_bytes"] == pytest.approx(40)
    assert s["prefetch"]["accuracy"] is None and s["prefetch"]["prefetched_share"] is None


def test_stall_inside_compute_is_not_overlap() -> None:
    """The runtime's attention span includes its waits for copies: a copy that compute waits on is not overlap."""
    tr = Tracer()
    tr.span("compute", "attention", 0.0, 10.0, layer=0)
    tr.span("stall", "wait", 2.0, 5.0, layer=0, on="host->device")
    tr.span("host->device", "load", 1.0, 5.0, bytes=4000, pages=1, layer=0)
    t = summarize({}, tr)["time"]
    assert t["compute_span_seconds"] == pytest.approx(10) and t["compute_seconds"] == pytest.approx(7)
    assert t["overlap_seconds"] == pytest.approx(1)  # [1,2]: afterwards compute waits for the copy
    assert t["stall_seconds"] == pytest.approx(3) and t["idle_seconds"] == pytest.approx(0)


def test_summary_copies_stats() -> None:
    """Numbers the summary shares with stats() are taken from it, never recomputed from the trace."""
    stats = {
        "bytes_moved": {"host->device": 7, "device->host": 8, "host->disk": 9, "disk->host": 10},
        "peak_resident_bytes": {"device": 1, "host": 2, "disk": 3},
        "resident_bytes": {"device": 0, "host": 1, "disk": 2},
        "loads": {"needed": 1, "predicted": 4, "promoted": 2},
        "prefetch": {"issued": 4, "hits": 3},
        "stall_seconds": 0.25,
        "stall_seconds_per_layer": [0.25, 0.0],
        "tokens": {"prefill": 300, "decode": 4, "reused": 0, "loaded": 0},
        "budgets": {"device": 10, "host": 20, "disk": 30},
    }
    s = summarize(stats, synthetic())
    assert {p: x["bytes"] for p, x in s["transfers"].items()} == stats["bytes_moved"]
    assert s["stall_seconds"] == s["time"]["stall_seconds"] == 0.25
    assert s["stall_seconds_per_layer"] == [0.25, 0.0]
    assert s["prefetch"]["accuracy"] == 0.75 and s["prefetch"]["prefetched_share"] == 0.75
    assert s["loads"] == stats["loads"]
    assert {t: o["peak_bytes"] for t, o in s["occupancy"].items()} == stats["peak_resident_bytes"]
    assert s["occupancy"]["disk"]["budget_bytes"] == 30 and s["stats"] == stats
    md = summary_markdown(s)
    assert "| host->device |" in md and "75.0%" in md and "## Stall per layer" in md
    json.dumps(s, allow_nan=False)
    assert summarize(stats, None)["time"]["overlap_seconds"] == 0  # stats only


def test_prefetch_accuracy_is_not_confused_with_the_share_of_loads_prefetched() -> None:
    """Bug: exact mode reported "issued 900, hits 898, hit rate 9.2%": the rate divided hits by every page
    loaded, on demand ones included, which reads as a failing prefetcher. Accuracy is hits / issued; the other
    ratio is named for what it is."""
    from tools.common import format_stats_table

    stats = {"loads": {"needed": 8870, "predicted": 900, "promoted": 0}, "prefetch": {"issued": 900, "hits": 898}}
    pf = summarize(stats, None)["prefetch"]
    assert pf["accuracy"] == pytest.approx(898 / 900) and pf["prefetched_share"] == pytest.approx(898 / 9768)
    assert "hit_rate" not in pf
    md = summary_markdown(summarize(stats, None))
    assert "| accuracy: hits / predicted | 99.8% |" in md
    assert "| prefetched share of loads: hits / (hits + needed) | 9.2% |" in md
    assert "| loads needed: pages the step attends to, brought to the device | 8870 |" in md
    assert "hit rate" not in md
    table = format_stats_table(stats)
    assert any(line.startswith("prefetch accuracy (hits/issued)") and line.endswith("99.8%")
               for line in table.splitlines()), table
    assert any(line.startswith("prefetch share of loads prefetched") and line.endswith("9.2%")
               for line in table.splitlines()), table


def test_no_prefetch_ratios_where_nothing_was_predicted() -> None:
    """Exact mode makes no prediction: its loads are all needed, and no accuracy is reported for it."""
    from tools.common import format_stats_table

    stats = {"loads": {"needed": 45120, "predicted": 0, "promoted": 0}, "prefetch": None}
    s = summarize(stats, None)
    assert s["prefetch"]["accuracy"] is None and s["prefetch"]["prefetched_share"] is None
    md = summary_markdown(s)
    assert "| loads needed: pages the step attends to, brought to the device | 45120 |" in md
    assert "accuracy" not in md and "miss" not in md
    assert "accuracy" not in format_stats_table(stats)


# ---- picture ---------------------------------------------------------------------------------------------------


def test_timeline_png(tmp_path: Any) -> None:
    tr = synthetic()
    tr.counter("host rss", 10.5, {"rss": 3e8})
    tr.counter("host rss", 11.5, {"rss": 3.1e8})
    path = str(tmp_path / "timeline.png")
    plot_timeline(tr, path, {"budgets": {"device": 120, "host": 1 << 30}, "tokens": {"prefill": 3, "decode": 1,
            "reused": 0, "loaded": 0}})
    check_png(path)
    empty = str(tmp_path / "empty.png")
    plot_timeline(Tracer(), empty)  # nothing recorded: still a readable picture
    check_png(empty)


# ---- end to end: a tiny random Llama over three tiers ---------------------------------------------------------

# Page of the tiny model: 2 KV heads x 16 tokens x head_dim 16 x fp32, K and V.
TINY_PAGE = 2 * 2 * 16 * 16 * 4
# 300 tokens x 2 layers = 38 pages: 10 fit the device cache (12 minus a 2-page workspace), 10 the host, the rest
# spills to disk; decoding then reads pages back from all three.
BUDGETS = {"device_budget": 12 * TINY_PAGE, "host_budget": 10 * TINY_PAGE, "page_size": 16}


def tiny_model() -> torch.nn.Module:
    from offload.models import tiny_llama

    return tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128)


@torch.no_grad()
def run_tiny(model: torch.nn.Module, rt: Any, prompt_tokens: int = 300, decode_steps: int = 4) -> None:
    ids = torch.randint(0, 128, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    cache = rt.cache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    for _ in range(decode_steps):
        out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Tracer]:
    """(stats, tracer) of one traced run with the sampler on, shared by the end-to-end tests."""
    from offload import offload

    model = tiny_model()
    disk = tmp_path_factory.mktemp("disk")
    with offload(model, disk_dir=str(disk), trace=True, **BUDGETS) as rt:
        assert isinstance(rt.tracer, Tracer)
        with Sampler(rt.tracer, interval=0.01):
            run_tiny(model, rt)
        stats = rt.stats()
    return stats, rt.tracer


def test_run_over_three_tiers_traces_every_tier_pair(traced_run: tuple[dict, Tracer], tmp_path: Any) -> None:
    stats, tracer = traced_run
    for track, pair in {"host->device": "host->device", "device->host": "device->host",
                        "disk read": "disk->host", "disk write": "host->disk"}.items():
        spans = tracer.spans(track)
        assert spans, f"no {track} spans although stats moved {stats['bytes_moved'][pair]} bytes {pair}"
        assert stats["bytes_moved"][pair] > 0
        assert 0 < sum(e.args["bytes"] for e in spans) <= stats["bytes_moved"][pair], pair
        assert all(e.end >= e.start and e.args["pages"] >= 1 for e in spans)
    assert tracer.spans("compute") and tracer.samples("occupancy") and tracer.samples("host rss")
    assert {c.values.keys() >= {"device", "host", "disk"} for c in tracer.samples("occupancy")} == {True}
    path = tmp_path / "trace.json"
    tracer.save(path)
    names = set(thread_names(check_chrome(json.loads(path.read_text()))).values())
    assert {"compute", "host->device", "device->host", "disk read", "disk write", "samples"} <= names


def test_every_counted_byte_has_a_span(traced_run: tuple[dict, Tracer]) -> None:
    """Regression: some moves were counted in stats() without a span (disk reads into a CPU workspace, pages
    spilled with .cpu()), so bandwidth was not over all the traffic."""
    stats, tracer = traced_run
    s = summarize(stats, tracer)
    assert {p: x["traced_bytes"] for p, x in s["transfers"].items()} == stats["bytes_moved"]


def test_summary_equals_stats_of_the_same_run(traced_run: tuple[dict, Tracer]) -> None:
    stats, tracer = traced_run
    s = summarize(stats, tracer)
    assert s["stats"] == stats
    assert {pair: x["bytes"] for pair, x in s["transfers"].items()} == stats["bytes_moved"]
    assert {t: o["peak_bytes"] for t, o in s["occupancy"].items()} == stats["peak_resident_bytes"]
    assert {t: o["final_bytes"] for t, o in s["occupancy"].items()} == stats["resident_bytes"]
    assert s["stall_seconds"] == stats["stall_seconds"]
    assert s["stall_seconds_per_layer"] == stats["stall_seconds_per_layer"]
    assert s["loads"] == stats["loads"]
    if stats["prefetch"] is not None:
        assert {k: s["prefetch"][k] for k in ("issued", "hits")} == stats["prefetch"]
    for key in ("tokens", "kv_bytes", "attended_fraction"):
        assert s[key] == stats[key], key
    assert s["tokens"] == {"prefill": 300, "decode": 4, "reused": 0, "loaded": 0}
    t = s["time"]
    assert 0 < t["compute_seconds"] <= t["wall_seconds"] and 0 <= t["overlap_seconds"] <= t["compute_seconds"]
    assert t["stall_traced_seconds"] <= stats["stall_seconds"] + 1e-6  # each wait is one stall span
    for tier in ("device", "host", "disk"):
        o = s["occupancy"][tier]
        assert 0 < o["mean_bytes"] <= o["peak_bytes"], tier
    json.dumps(s, allow_nan=False)


def test_trace_off_records_nothing(tmp_path: Any) -> None:
    from offload import offload

    model = tiny_model()
    with offload(model, disk_dir=str(tmp_path), **BUDGETS) as rt:
        assert rt.tracer is None
        run_tiny(model, rt, prompt_tokens=40, decode_steps=1)
        assert rt.stats()["tokens"]["decode"] == 1


def _retained_growth(trace: bool, tmp_path: Any) -> int:
    """Bytes the runtime's own files hold after 12 more decode steps that they did not hold before."""
    import os
    import tracemalloc

    from offload import offload

    model = tiny_model()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with offload(model, disk_dir=str(tmp_path), trace=trace, **BUDGETS) as rt, torch.no_grad():
        cache = rt.cache()
        # 45 + 4 warm-up tokens: the measured 12 steps stay inside one 16-token page (no page is opened).
        out = model(input_ids=torch.randint(0, 128, (1, 45)), past_key_values=cache)
        nxt = out.logits[:, -1:].argmax(-1)
        tracemalloc.start()
        # Both snapshots are taken at the same point of a step, so objects of the step in flight cancel out.
        for _ in range(4):
            nxt = model(input_ids=nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
        before = tracemalloc.take_snapshot()
        for _ in range(12):
            nxt = model(input_ids=nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    ours = [tracemalloc.Filter(True, os.path.join(root, d, "*")) for d in ("offload", "policies", "tiers")]
    diff = after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
    return sum(max(0, d.size_diff) for d in diff)


def test_trace_off_allocates_nothing_per_step(tmp_path: Any) -> None:
    """What the runtime keeps does not grow with decode steps when tracing is off; with tracing on it does
    (the events), which shows the measurement can see per-step allocations."""
    on, off = _retained_growth(True, tmp_path), _retained_growth(False, tmp_path)
    assert on > 4_000 + off, (on, off)
    assert off < 2_000, off  # interpreter free lists, not state kept per step


def test_phases_show_in_torch_profiler(tmp_path: Any) -> None:
    from offload import offload

    model = tiny_model()
    with offload(model, disk_dir=str(tmp_path), **BUDGETS) as rt, torch.no_grad():
        cache = rt.cache()
        with torch.profiler.profile() as prof:
            nxt = model(input_ids=torch.randint(0, 128, (1, 40)), past_key_values=cache).logits[:, -1:].argmax(-1)
            model(input_ids=nxt, past_key_values=cache)
    names = {e.key for e in prof.key_averages()}
    assert {"offload.prefill", "offload.decode"} <= names, sorted(n for n in names if n.startswith("offload"))


# ---- the command line ------------------------------------------------------------------------------------------


def char_tokenizer_model(path: str) -> None:
    """A tiny model directory: a character-level tokenizer (printable ASCII) and a tiny Llama of its vocabulary.
    Built in a second, unlike a tokenizer read from a GGUF file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from offload.models import tiny_llama

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)
    tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=len(tok)).save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("tiny-model"))
    char_tokenizer_model(path)
    yield path


def test_cli_profile_writes_four_valid_files(tiny_model_dir: str, tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    from offload.cli import main

    out = tmp_path / "profile"
    prompt = "The quick brown fox jumps over the lazy dog. " * 7  # 315 characters, one token each
    rc = main([
        "profile", "--model", tiny_model_dir, "--prompt", prompt, "--max-new-tokens", "3", "--no-progress",
        "--device-budget", str(BUDGETS["device_budget"]), "--host-budget", str(BUDGETS["host_budget"]),
        "--page-size", "16", "--disk-dir", str(tmp_path / "disk"), "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("trace.json", "summary.json", "summary.md", "timeline.png"):
        assert (out / name).stat().st_size > 0, name
    events = check_chrome(json.loads((out / "trace.json").read_text()))
    assert any(ev["ph"] == "X" and ev["cat"] == "disk write" for ev in events)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"]["prefill"] == len(prompt) and summary["transfers"]["host->disk"]["bytes"] > 0
    assert summary["transfers"]["host->disk"]["bytes"] == summary["stats"]["bytes_moved"]["host->disk"]
    assert (out / "summary.md").read_text() == captured.out  # stdout: the summary tables only
    check_png(str(out / "timeline.png"))


def test_cli_profile_bad_out(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    """--out under a regular file fails in a second, before the model loads, naming the flag."""
    from offload.cli import main
    from tools.profile import prepare_out

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="^out: "):
        prepare_out(str(blocker / "sub"))
    with pytest.raises(ValueError, match="^out: .* not a directory"):
        prepare_out(str(blocker))
    assert main(["profile", "--prompt", "hi", "--out", str(blocker / "sub")]) == 2
    assert "--out:" in capsys.readouterr().err
