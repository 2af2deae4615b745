"""A run killed with SIGKILL mid-decode, with pages on disk, can't clean up: its slot file stays in disk_dir. The
next run in the same directory removes it (its pid is dead), gives the tokens of plain generation with
DynamicCache and leaves the directory empty.

The killed run is `python -m offload.cli generate` on a tiny random-weight Llama saved to disk with a small
byte-level BPE tokenizer trained here; it is killed as soon as it has streamed its first piece of text, i.e. while
it decodes. The next run is the same command, in-process, to the end.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from cli_model import train_tokenizer

from offload import offload
from offload.cli import main
from offload.models import tiny_llama
from tools import common

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "The ferry leaves the east pier at seven and returns at noon. Its engine room holds two diesel engines, a "
    "generator and a pump; the crew checks the oil, the fuel and the bilge before each crossing, and writes the "
    "readings in a book that the harbour master signs on Fridays."
)
# Pages of 16 tokens of a 2-layer model with 2 KV heads of 16 (4 KiB a page): 4 cache pages on the device, 4 on
# the host, the rest of a ~90-token prompt and its answer on disk.
THREE_TIERS = ["--page-size", "16", "--device-budget", "24KiB", "--host-budget", "16KiB"]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The command-line tests' tokenizer (tests/cli_model.py) and a tiny random Llama that never stops early."""
    directory = tmp_path_factory.mktemp("crash-model")
    tokenizer = train_tokenizer(directory)
    model = tiny_llama(vocab=len(tokenizer), max_positions=512, seed=3)
    model.generation_config.eos_token_id = None  # decode all NEW_TOKENS: the kill must land mid-decode
    model.save_pretrained(directory)
    return directory


def reference_text(model_dir: Path, prompt: str, new: int) -> str:
    """What greedy generation with transformers' DynamicCache, no offloading, prints for the same prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = common.encode_prompt(tokenizer, prompt, chat=True)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generate_args(model_dir: Path, prompt_file: Path, kv: Path, new: int) -> list[str]:
    return ["generate", "--model", str(model_dir), "--prompt-file", str(prompt_file), "--max-new-tokens", str(new),
            "--disk-dir", str(kv), "--no-progress", "--stats", *THREE_TIERS]


def kill_mid_decode(args: list[str]) -> tuple[int, list[Path]]:
    """Runs `offload <args>` in a subprocess and SIGKILLs it once the first text is out; (its pid, the files it
    left in disk_dir)."""
    kv = Path(args[args.index("--disk-dir") + 1])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "offload.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        assert ready, "no text within 180 s"
        first = os.read(proc.stdout.fileno(), 1)
        assert first, f"the run ended before it decoded: {proc.communicate()[1].decode()}"
        files = sorted(kv.iterdir()) if kv.is_dir() else []
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not psutil.pid_exists(proc.pid)
    return proc.pid, files


def test_the_run_after_a_sigkill_removes_its_file_and_is_exact(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                               model_dir: Path) -> None:
    kv = tmp_path / "kv"
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(TEXT, encoding="utf-8")
    args = generate_args(model_dir, prompt_file, kv, NEW_TOKENS)
    pid, seen = kill_mid_decode(args)
    # The killed run had its slot file, with pages written, and left it.
    left = sorted(kv.iterdir())
    assert [p.name for p in left] == [p.name for p in seen] and len(left) == 1
    assert left[0].name.startswith(f"offload-{pid}-") and left[0].suffix == ".kv"
    assert any(left[0].read_bytes())
    started = time.monotonic()
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == reference_text(model_dir, TEXT, NEW_TOKENS) + "\n"
    disk_rows = [line for line in err.splitlines() if line.startswith("peak_resident_bytes disk")]
    assert disk_rows and float(re.match(r"[\d.]+", disk_rows[0].split()[-1]).group()) > 0  # it spilled too
    assert list(kv.iterdir()) == []
    assert time.monotonic() - started < 120


def test_a_run_that_never_spills_still_removes_the_files_of_dead_runs(tmp_path: Path, tiny_llama_model) -> None:
    """A killed run's slot file (as large as the KV it held) stayed in disk_dir until some later run spilled to disk
    there; a run given the directory that fits in device and host memory left it."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    kv = tmp_path / "kv"
    kv.mkdir()
    (kv / f"offload-{proc.pid}-0123456789ab.kv").write_bytes(b"\0" * 4096)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with offload(tiny_llama_model, page_size=8, disk_dir=str(kv)) as rt, torch.no_grad():
        tiny_llama_model.generate(ids, max_new_tokens=4, do_sample=False)
        assert rt.disk_tier is None  # everything fit above the disk
    assert list(kv.iterdir()) == []
