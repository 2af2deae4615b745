"""`offload bench` end to end on the tiny random-weight shape, plus the pieces it is built from.

One module-scoped run of `offload.cli.main(["bench", ...])` (every method, two contexts, one repeat) feeds the
schema tests; bad inputs go through the same entry point and must exit 2 with a one-line error naming the flag.
Nothing here asserts on speed: only on shapes of the results and on bookkeeping that must hold on any machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from offload.bandwidth import exact_offload_bound, measure_h2d_bandwidth
from offload.cli import main
from offload.shapes import MODEL_SHAPES, build_model
from tools import bench

CONTEXTS = (256, 512)
NEW_TOKENS = 4
# Tiny shape: 2 layers, 2 KV heads, head_dim 16, float32 -> 512 B of KV per token, 4 KiB per 16-token page and
# layer. 40% of the KV on the device is 13 pages at 256 tokens; one-page sinks and recent windows keep sparse mode
# inside that (it pins them on the device).
ARGS = [
    "bench", "--model-shape", "tiny", "--device", "cpu", "--context", ",".join(map(str, CONTEXTS)), "--new-tokens", str(NEW_TOKENS),
    "--repeats", "1", "--page-size", "16", "--kv-device-fraction", "0.4", "--sink-tokens", "16",
    "--recent-tokens", "16",
]
CPU_METHODS = ("dynamic", "offload-exact", "offload-sparse")
PAIRS = ("host->device", "device->host", "host->disk", "disk->host")
NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))
# Every row carries every field; None where it does not apply (or the row did not run).
ROW_FIELDS: dict[str, tuple[type, ...]] = {
    "method": (str,), "context": (int,), "device": (str,), "new_tokens": (int,), "repeats": (int,),
    "prefill_seconds": OPTIONAL_NUMBER, "decode_tokens_per_s": OPTIONAL_NUMBER,
    "peak_device_kv_bytes": (int, type(None)), "peak_host_bytes": (int, type(None)),
    "peak_device_alloc_bytes": (int, type(None)), "bytes_moved_per_token": (dict, type(None)),
    "stall_fraction": OPTIONAL_NUMBER, "kv_bytes": (int,), "pct_of_pcie_bound": OPTIONAL_NUMBER,
    "speedup_vs_dynamic": OPTIONAL_NUMBER, "speedup_vs_hf_offloaded": OPTIONAL_NUMBER,
    "error": (str, type(None)), "skipped": (str, type(None)),
}


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out, png = tmp / "bench.json", tmp / "bench.png"
    code, stdout, stderr = _run(ARGS + ["--out", str(out), "--plot", str(png)])
    assert code == 0, stderr
    return {"json": json.loads(out.read_text()), "png": png, "stdout": stdout}


def _rows(result: dict, method: str) -> list[dict]:
    return [r for r in result["json"]["rows"] if r["method"] == method]


def test_top_level_fields(result):
    data = result["json"]
    machine = data["machine"]
    for key in ("cpu", "cores", "ram_bytes", "gpu", "torch", "transformers"):
        assert key in machine
    assert machine["torch"] == torch.__version__
    assert isinstance(data["date"], str) and isinstance(data["command"], str)
    assert isinstance(data["h2d_bandwidth_bytes_per_s"], float) and data["h2d_bandwidth_bytes_per_s"] > 0
    assert set(data["exact_bound_tokens_per_s"]) == {str(c) for c in CONTEXTS}
    assert all(isinstance(v, float) and v > 0 for v in data["exact_bound_tokens_per_s"].values())
    assert data["contexts"] == list(CONTEXTS) and data["new_tokens"] == NEW_TOKENS


def test_every_row_has_every_field_with_its_type(result):
    rows = result["json"]["rows"]
    assert len(rows) == len(bench.METHODS) * len(CONTEXTS)
    for row in rows:
        for field, types in ROW_FIELDS.items():
            assert field in row, (row["method"], field)
            assert isinstance(row[field], types), (row["method"], field, row[field])
        if row["bytes_moved_per_token"] is not None:
            assert set(row["bytes_moved_per_token"]) == set(PAIRS)


def test_cpu_methods_ran_at_every_context(result):
    for method in CPU_METHODS:
        rows = _rows(result, method)
        assert sorted(r["context"] for r in rows) == list(CONTEXTS)
        for row in rows:
            assert row["error"] is None and row["skipped"] is None, row
            assert row["decode_tokens_per_s"] > 0 and row["prefill_seconds"] > 0
            assert row["kv_bytes"] == (row["context"] + NEW_TOKENS) * 512


@pytest.mark.skipif(torch.cuda.is_available(), reason="hf-offloaded runs on CUDA")
def test_hf_offloaded_is_skipped_on_cpu_with_its_note(result):
    rows = _rows(result, "hf-offloaded")
    assert len(rows) == len(CONTEXTS)
    for row in rows:
        assert row["skipped"] == bench.HF_OFFLOADED_CPU_NOTE
        assert row["decode_tokens_per_s"] is None


def test_offload_rows_respect_the_budget_and_report_traffic(result):
    for method in ("offload-exact", "offload-sparse"):
        for row in _rows(result, method):
            assert 0 < row["peak_device_kv_bytes"] <= row["device_budget_bytes"]
            assert row["device_budget_bytes"] == int(0.4 * row["kv_bytes"])
            assert row["peak_host_bytes"] > 0  # 60% of the KV had to go somewhere
            assert all(v >= 0 for v in row["bytes_moved_per_token"].values())
            assert 0 <= row["stall_fraction"] <= 1
            assert isinstance(row["speedup_vs_dynamic"], float)
    for row in _rows(result, "offload-exact"):
        # Exact attention reads every page each step: what is not on the device must come up.
        assert row["bytes_moved_per_token"]["host->device"] > 0
        assert isinstance(row["pct_of_pcie_bound"], float) and row["pct_of_pcie_bound"] > 0
        expected = result["json"]["exact_bound_tokens_per_s"][str(row["context"])]
        assert math.isclose(row["exact_bound_tokens_per_s"], expected)


def test_dynamic_keeps_all_kv_on_the_device(result):
    for row in _rows(result, "dynamic"):
        assert row["peak_device_kv_bytes"] == row["kv_bytes"]
        assert all(v == 0 for v in row["bytes_moved_per_token"].values())
        assert row["speedup_vs_dynamic"] is None


def test_table_and_plot(result):
    stdout = result["stdout"]
    assert "decode tok/s" in stdout
    for method in bench.METHODS:
        assert method in stdout
    assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefetch_variants_add_sparse_rows(tmp_path: Path):
    out = tmp_path / "r.json"
    argv = ARGS + ["--methods", "offload-sparse", "--prefetch-variants", "none", "--context", "256", "--out", str(out)]
    code, _, stderr = _run(argv)
    assert code == 0, stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["offload-sparse", "offload-sparse+prefetch=none"]
    assert rows[1]["prefetch"] == "none" and rows[1]["error"] is None


def test_quant_variants_add_rows_that_move_fewer_bytes(tmp_path: Path):
    """One row per offload method and kv_quant setting, side by side with full precision in the same run: the
    packed rows move the codec's share of the bytes from host to device."""
    from offload.quant import PageCodec

    out = tmp_path / "r.json"
    argv = ARGS + ["--methods", "offload-exact", "--quant-variants", "k8v4", "--context", "256", "--out", str(out)]
    code, _, stderr = _run(argv)
    assert code == 0, stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["offload-exact", "offload-exact+kv_quant=k8v4"]
    assert [r["kv_quant"] for r in rows] == ["none", "k8v4"] and rows[1]["error"] is None
    full, packed = (r["bytes_moved_per_token"]["host->device"] for r in rows)
    assert full > 0
    assert full / packed == pytest.approx(PageCodec.of("k8v4", 2, 16, 16).ratio(torch.float32), rel=0.05)


def test_host_attention_variants_add_rows_that_move_no_page(tmp_path: Path):
    """One row per host_attention setting beside the default's: "all" moves no page to the device, and every
    offload-exact row gets its share of the PCIe bound."""
    out = tmp_path / "r.json"
    argv = ARGS + ["--methods", "offload-exact", "--host-attention-variants", "all,off", "--context", "256",
                   "--kv-device-fraction", "0.3", "--out", str(out)]
    code, _, stderr = _run(argv)
    assert code == 0, stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["offload-exact", "offload-exact+host_attention=all",
                                           "offload-exact+host_attention=off"]
    assert all(r["error"] is None and r["pct_of_pcie_bound"] is not None for r in rows)
    moved = [r["bytes_moved_per_token"]["host->device"] for r in rows]
    assert moved[1] == 0 and moved[0] == moved[2] > 0


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--context", "0"], "--context"),
        (["--context", "128,abc"], "--context"),
        (["--context", "-5"], "--context"),
        (["--methods", "dynamic,vllm"], "--methods"),
        (["--model-shape", "gpt5"], "--model-shape"),
        (["--new-tokens", "0"], "--new-tokens"),
        (["--repeats", "0"], "--repeats"),
        (["--kv-device-fraction", "1.5"], "--kv-device-fraction"),
        (["--prefetch-variants", "psychic"], "--prefetch-variants"),
        (["--quant-variants", "k3v3"], "--quant-variants"),
        (["--host-attention-variants", "some"], "--host-attention-variants"),
        (["--context", "4093"], "--context"),  # 4093 + 4 new tokens > the tiny shape's 4096 positions
    ],
)
def test_bad_input_exits_2_naming_the_flag(extra: list[str], flag: str):
    code, _, stderr = _run(ARGS + extra)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"offload: error: {flag}:"), stderr


@pytest.mark.parametrize("which", ["--out", "--plot"])
@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_an_output_path_that_cant_be_written_fails_before_the_runs(tmp_path: Path, which: str, where: str):
    """Bug: --out or --plot naming a directory (or a path under a regular file) failed only after the runs, with an
    OSError naming neither the flag nor the reason, and left `<out>.tmp` behind; --plot DIR even wrote `DIR.png`
    beside it."""
    (tmp_path / "file").write_text("x")
    target = tmp_path / "dir" if where == "a directory" else tmp_path / "file" / "results"
    (tmp_path / "dir").mkdir()
    code, stdout, stderr = _run(ARGS + [which, str(target)])
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"offload: error: {which}:"), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"] and not any((tmp_path / "dir").iterdir())


# ---- the pieces --------------------------------------------------------------------------------------------------


def test_parse_contexts_dedups_and_keeps_order():
    assert bench.parse_contexts("512, 128,512") == [512, 128]


def test_shapes_build_finite_models_and_tie_like_the_real_ones():
    model = build_model("tiny", "cpu", torch.float32)
    logits = model(input_ids=torch.randint(0, 256, (1, 8))).logits
    assert torch.isfinite(logits).all()
    smol = build_model("smollm2-135m", "cpu", torch.bfloat16, layers=1)
    assert smol.lm_head.weight is smol.model.embed_tokens.weight
    assert smol.config.num_key_value_heads == 3 and smol.config.max_position_embeddings == 8192
    assert smol.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.isfinite(smol(input_ids=torch.randint(0, 1000, (1, 8))).logits).all()
    assert MODEL_SHAPES["llama3-8b"]["num_key_value_heads"] == 8
    with pytest.raises(ValueError, match="known: .*llama3-8b"):
        build_model("llama9", "cpu", torch.float32)


def test_bandwidth_and_bound():
    assert measure_h2d_bandwidth("cpu", nbytes=8 << 20, repeats=2) > 0
    assert exact_offload_bound(1e6, 2e9) == 2000.0
    assert exact_offload_bound(0, 2e9) == math.inf
    with pytest.raises(ValueError, match="bandwidth"):
        exact_offload_bound(1.0, 0.0)


def _labelled(axis) -> dict[float, str]:
    axis.axes.figure.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    return {float(t.get_loc()): t.label1.get_text() for t in axis.get_major_ticks()
            if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi}


@pytest.mark.parametrize("speeds", [(41.0, 38.5, 30.2, 28.0), (900.0, 120.0, 15.0, 2.5)], ids=["narrow", "wide"])
def test_plot_labels_every_context_and_several_speeds(speeds: tuple[float, ...]) -> None:
    """Bug: the bench plot's log axes showed one labelled tick (or none), so its points could not be read."""
    contexts = [2048, 4096, 8192, 32768, 131040]
    rows = [{"method": m, "context": c, "decode_tokens_per_s": speeds[i] / (1 + j / 10)}
            for i, m in enumerate(["dynamic", "offload-exact", "offload-sparse", "hf-offloaded"])
            for j, c in enumerate(contexts)]
    rows.append({"method": "offload-exact", "context": 65536, "decode_tokens_per_s": None})  # a failed row
    ax = bench.plot_figure(rows, "t").axes[0]
    x = _labelled(ax.xaxis)
    assert sorted(x) == sorted(contexts + [65536])
    assert x[2048] == "2K" and x[131040] == "131040"
    y = _labelled(ax.yaxis)
    assert len(y) >= 3, y
    assert all(float(label) == pytest.approx(loc, rel=0.01) for loc, label in y.items())  # labels say the value


def test_batches_are_rows_of_their_own(tmp_path: Path):
    """--batch: a row per batch size, tokens/s over every sequence, the KV and budgets of the whole batch, and the
    throughput against the same method at batch 1."""
    out = tmp_path / "batch.json"
    argv = ["bench", "--model-shape", "tiny", "--device", "cpu", "--context", "256", "--new-tokens", "3",
            "--kv-device-fraction", "0.6",
            "--repeats", "1", "--page-size", "16", "--methods", "dynamic,offload-exact", "--batch", "1,3",
            "--out", str(out)]
    code, stdout, stderr = _run(argv)
    assert code == 0, stderr
    rows = json.loads(out.read_text())["rows"]
    by = {(r["method"], r["batch"]): r for r in rows}
    assert set(by) == {(m, b) for m in ("dynamic", "offload-exact") for b in (1, 3)}
    for method in ("dynamic", "offload-exact"):
        one, three = by[(method, 1)], by[(method, 3)]
        assert three["kv_bytes"] == 3 * one["kv_bytes"]
        assert one["speedup_vs_batch_1"] is None
        assert math.isclose(three["speedup_vs_batch_1"], three["decode_tokens_per_s"] / one["decode_tokens_per_s"])
    assert by[("offload-exact", 3)]["device_budget_bytes"] > by[("offload-exact", 1)]["device_budget_bytes"]
    assert "batch" in stdout.splitlines()[1]


@pytest.mark.parametrize("text", ["0", "1,1", "two", ""])
def test_bad_batch_flag_is_one_line(text):
    code, _, stderr = _run(ARGS + ["--batch", text])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("offload: error: --batch:"), stderr
