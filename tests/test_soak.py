"""A short soak: 2,000 greedy decode steps of benchmarks/soak.py's set-up (a sliding-window Mistral whose pages keep
moving device -> host -> disk and being released), checked as the full run is checked, with bounds for its length:
RSS grows by less than 1 MiB from step 500 to the end, open files, threads, pinned bytes and the disk file don't
change, every tier holds pages and the tiers churn; the tokens equal DynamicCache's, and the disk directory is
empty afterwards. `python benchmarks/soak.py` runs the 100,000-step version."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import soak  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STEPS = 2000
EVERY = 100
WARMUP = 500
RSS_BOUND = 1 << 20  # bytes: about 700 bytes a step would cross it


def test_short_soak_holds_its_resources_steady_and_stays_exact(tmp_path: Path) -> None:
    model = soak.build_model()
    kv = tmp_path / "kv"
    # One thread per pool: the pools start theirs lazily, so with more the count may still rise (within its bound)
    # after the warm-up point of so short a run.
    run = soak.soak(model, STEPS, EVERY, str(kv), io_threads=1)
    assert soak.disk_files(str(kv)) == []
    summary, problems = soak.check(run.samples, WARMUP, rss_tolerance=1.0)  # RSS: the absolute bound below
    assert problems == [], problems
    growth = summary["rss_last_bytes"] - summary["rss_warmup_bytes"]
    assert growth < RSS_BOUND, f"RSS grew {growth} bytes from step {WARMUP} to {STEPS}"
    assert all(isinstance(summary[k], int) for k in ("fds", "threads_python", "threads_os", "disk_file_bytes"))
    assert summary["pinned_bytes"] == 0 and summary["disk_file_bytes"] > 0
    last = run.samples[-1]
    assert last["tokens"] == STEPS and [s["step"] for s in run.samples] == list(range(0, STEPS + 1, EVERY))
    opened = soak.LAYERS * STEPS // soak.PAGE  # pages opened over the run
    assert min(last["evictions"].values()) > opened // 4  # the device and the host gave up pages all along
    assert (run.tokens == soak.reference_tokens(model, STEPS)).all()
