"""The `offload` command line: flags, one-line errors with exit codes, and generation end to end.

Most tests run `offload.cli.main([...])` in-process on a tiny random-weight Llama saved to disk with a small
byte-level BPE tokenizer trained here (no hub access); one runs a real subprocess to check exit codes and that
no traceback leaks; one (slow) runs the real SmolLM2 model through all three tiers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_model import CORPUS, MAX_POSITIONS

from offload.cli import main
from offload.config import OffloadConfig
from tools import common

REPO = Path(__file__).resolve().parents[1]
# Three tiers on the tiny model (2 layers, 2 KV heads, head_dim 16, float32): a page of 16 tokens is 4 KiB per
# layer; the device holds 6 pages (4 of them cache), the host 4, the disk the rest of a ~150-token sequence.
THREE_TIERS = ["--page-size", "16", "--device-budget", "24KiB", "--host-budget", "16KiB"]


@pytest.fixture(scope="session")
def gpt2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=64)).save_pretrained(
        directory
    )
    return directory


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *names: str) -> str:
    """stderr holds exactly one `offload: error:` line, last, naming one of `names`, and no traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("offload: error:")]
    assert len(errors) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == errors[0]
    assert any(name in errors[0] for name in names), errors[0]
    return errors[0]


def assert_empty_dir(path: Path) -> None:
    assert not path.exists() or list(path.iterdir()) == [], list(path.iterdir())


# ---- parsing ---------------------------------------------------------------------------------------------------


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in ("generate", "profile", "bench"):
        assert name in out


def test_generate_help_has_a_flag_per_config_option(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(capsys, "generate", "--help")
    assert code == 0
    for name in OffloadConfig.option_names():
        assert "--" + name.replace("_", "-") in out
    for flag in ("--model", "--dtype", "--prompt", "--prompt-file", "--max-new-tokens", "--stats"):
        assert flag in out


def _parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    common.add_runtime_options(parser)
    return parser.parse_args(list(argv))


def test_unset_flags_keep_the_config_defaults() -> None:
    assert common.config_from_args(_parse()) == OffloadConfig()


def test_flags_become_config_fields(tmp_path: Path) -> None:
    cfg = common.config_from_args(
        _parse(
            "--device-budget", "8MiB", "--host-budget", "1GB", "--disk-dir", str(tmp_path), "--page-size", "32",
            "--attention", "sparse", "--token-budget", "512", "--measure-recall", "--io-threads", "2",
        )
    )
    assert cfg.device_budget_bytes == 8 * 2**20 and cfg.host_budget_bytes == 10**9
    assert cfg.disk_dir == str(tmp_path) and cfg.page_size == 32 and cfg.attention == "sparse"
    assert cfg.token_budget == 512 and isinstance(cfg.token_budget, int)
    assert cfg.measure_recall is True and cfg.trace is False and cfg.io_threads == 2
    assert common.config_from_args(_parse("--token-budget", "0.25")).token_budget == 0.25


def test_token_budget_that_is_not_a_number_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "generate", "--prompt", "x", "--token-budget", "lots")
    assert code == 2 and "--token-budget" in err and "Traceback" not in err


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "generate", "--prompt", "x", "--no-such-flag")
    assert code == 2 and "--no-such-flag" in err


def test_missing_subcommand_module_is_listed_and_fails_alone(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tools.bench", None)  # makes `import tools.bench` fail
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "bench" in out
    code, _, err = run_cli(capsys, "bench", "--whatever", "1")
    assert code == 2
    assert_one_line_error(err, "bench")


# ---- bad input, caught before the model runs -------------------------------------------------------------------


BAD_OPTIONS = [
    (["--device-budget", "12XB"], "--device-budget"),
    (["--attention", "dense"], "--attention"),
    (["--prefetch", "psychic"], "--prefetch"),
    (["--eviction", "random-ish"], "--eviction"),
    (["--selection", "oracle"], "--selection"),
    (["--token-budget", "0"], "--token-budget"),
    (["--token-budget", "1.5"], "--token-budget"),
    (["--token-budget", "-3"], "--token-budget"),
    (["--page-size", "0"], "--page-size"),
    (["--io-threads", "0"], "--io-threads"),
    (["--select-block", "24"], "--select-block"),
    (["--head-selection", "each"], "--head-selection"),
    (["--dense-layers", "-1"], "--dense-layers"),
    (["--history", "1.5"], "--history"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
]


@pytest.mark.parametrize("options,name", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_naming_it(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model_dir: Path, options: list[str], name: str
) -> None:
    kv = tmp_path / "kv"
    code, out, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "hello", "--disk-dir", str(kv), *options
    )
    assert code == 2 and out == ""
    assert_one_line_error(err, name)
    assert_empty_dir(kv)


def test_missing_prompt_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(tmp_path / "nope.txt"))
    assert code == 2
    line = assert_one_line_error(err, "--prompt-file")
    assert "nope.txt does not exist" in line


def test_no_prompt(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "generate")
    assert code == 2
    assert_one_line_error(err, "--prompt")


def test_prompt_file_wins_over_prompt(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "p.txt"
    path.write_text("from the file", encoding="utf-8")
    args = argparse.Namespace(prompt="from the flag", prompt_file=str(path))
    assert common.read_prompt(args) == "from the file"


# ---- bad input that needs the model ----------------------------------------------------------------------------


def test_unknown_model_path(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi")
    assert code == 2
    assert_one_line_error(err, "--model")


def test_unsupported_architecture(capsys: pytest.CaptureFixture, gpt2_model_dir: Path) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", str(gpt2_model_dir), "--prompt", "hi")
    assert code == 2
    line = assert_one_line_error(err, "--model")
    assert "gpt2" in line


def test_disk_dir_that_cannot_be_written(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model_dir: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--disk-dir", str(blocker / "kv")
    )
    assert code == 2
    assert_one_line_error(err, "--disk-dir", "disk_dir")
    assert blocker.read_text() == "not a directory"


def test_device_budget_too_small_for_one_page(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model_dir: Path
) -> None:
    kv = tmp_path / "kv"
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--page-size", "16",
        "--device-budget", "2KiB", "--disk-dir", str(kv),
    )
    assert code == 2
    assert_one_line_error(err, "--device-budget", "device_budget")
    assert_empty_dir(kv)


def test_budgets_too_small_for_the_sequence_fail_before_prefill(
    capsys: pytest.CaptureFixture, tiny_model_dir: Path
) -> None:
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--prompt", CORPUS, "--page-size", "16",
        "--device-budget", "24KiB", "--host-budget", "4KiB",
    )
    assert code == 2
    line = assert_one_line_error(err, "--host-budget")
    assert "--disk-dir" in line  # the advice, in flags: raise --host-budget or pass --disk-dir


def test_prompt_longer_than_max_positions(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model_dir: Path) -> None:
    kv = tmp_path / "kv"
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text(CORPUS * 6, encoding="utf-8")
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--prompt-file", str(long_prompt), "--disk-dir", str(kv)
    )
    assert code == 2
    line = assert_one_line_error(err, "--prompt")
    assert f"maximum of {MAX_POSITIONS} positions" in line
    assert_empty_dir(kv)


# ---- generation ------------------------------------------------------------------------------------------------


def _reference_text(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """What plain transformers greedy generation (no offloading) prints for the same prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = common.encode_prompt(tokenizer, prompt, chat=True)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# Deprecation warnings from transformers about how the cache is passed (past_key_values became cache in 5.25) would
# reach the user's terminal: the run fails on any.
@pytest.mark.filterwarnings("error::FutureWarning")
def test_generate_through_three_tiers_matches_plain_generation(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model_dir: Path
) -> None:
    kv = tmp_path / "kv"
    prompt = CORPUS[:300]
    code, out, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--prompt", prompt, "--max-new-tokens", "24",
        "--disk-dir", str(kv), "--stats", "--no-progress", *THREE_TIERS,
    )
    assert code == 0, err
    assert "Traceback" not in err
    assert "Loading weights" not in err and "it/s" not in err  # --no-progress: no loading bars either
    assert out == _reference_text(tiny_model_dir, prompt, 24) + "\n"
    for row in ("bytes_moved host->disk", "peak_resident_bytes disk", "tokens decode", "kv_bytes"):
        assert row in err
    assert_empty_dir(kv)


def test_generate_loads_a_shared_prefix_from_the_prefix_cache(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Two runs with the same document and different questions: the second loads the document's pages and prints
    what plain generation prints; a bad flag value is one line and creates nothing."""
    store, kv = tmp_path / "prefix", tmp_path / "kv"
    flags = ["--model", str(tiny_model_dir), "--max-new-tokens", "12", "--disk-dir", str(kv), "--stats",
             "--no-progress", "--page-size", "16", "--prefix-cache", str(store), *THREE_TIERS]
    doc = CORPUS[:400]
    loaded = []
    for question in ("Who?", "Where?"):
        code, out, err = run_cli(capsys, "generate", "--prompt", f"{doc} {question}", *flags)
        assert code == 0, err
        assert out == _reference_text(tiny_model_dir, f"{doc} {question}", 12) + "\n"
        loaded.append(int(next(line for line in err.splitlines()
                               if line.startswith("prefix_cache pages_loaded")).split()[-1].replace(",", "")))
        assert_empty_dir(kv)
    assert loaded[0] == 0 and loaded[1] > 0
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--model", str(tiny_model_dir),
                           "--prefix-cache", "ftp://x", "--prefix-cache-publish", "some")
    assert code == 2
    assert_one_line_error(err, "--prefix-cache")


@pytest.mark.parametrize("prefetch", ["none", "temporal", "speculative"])
def test_generate_takes_the_sparse_flags(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_model_dir: Path, prefetch: str
) -> None:
    kv = tmp_path / "kv"
    code, out, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--prompt", CORPUS, "--max-new-tokens", "8",
        "--disk-dir", str(kv), "--stats", "--no-progress", "--attention", "sparse", "--token-budget", "0.3",
        "--sink-tokens", "4", "--recent-tokens", "8", "--dense-layers", "0", "--select-block", "4",
        "--head-selection", "query", "--prefetch", prefetch, "--eviction", "score", *THREE_TIERS,
    )
    assert code == 0, err
    assert out.strip() and "attended_fraction" in err
    shown = next(line for line in err.splitlines() if line.startswith("attended_fraction")).split()[-1]
    assert float(shown.rstrip("%")) < 100.0
    assert_empty_dir(kv)


def _stop_after(monkeypatch: pytest.MonkeyPatch, pieces: int, stop) -> list[str]:
    """Makes `offload generate` call `stop()` once `pieces` pieces of text have streamed; returns those pieces."""
    real = common.generate_stream
    seen: list[str] = []

    def stopping(*args, **kwargs):
        def on_text(piece: str) -> None:
            seen.append(piece)
            if len(seen) == pieces:
                stop()

        kwargs["on_text"] = on_text
        return real(*args, **kwargs)

    monkeypatch.setattr(common, "generate_stream", stopping)
    return seen


def test_interrupt_exits_130_and_cleans_the_disk_dir(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path
) -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    seen = _stop_after(monkeypatch, 3, interrupt)
    kv = tmp_path / "kv"
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--prompt", CORPUS[:300], "--max-new-tokens", "50",
        "--disk-dir", str(kv), "--no-progress", *THREE_TIERS,
    )
    assert code == 130
    assert err.rstrip("\n").splitlines()[-1] == "offload: interrupted"
    assert len(seen) == 3
    assert_empty_dir(kv)


def test_subprocess_exit_code_and_no_traceback() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    bad = subprocess.run(
        [sys.executable, "-m", "offload.cli", "generate", "--prompt", "hi", "--device-budget", "12XB"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert_one_line_error(bad.stderr, "--device-budget")


# ---- the pieces generate is made of ----------------------------------------------------------------------------


def test_text_stream_emits_multibyte_characters_whole(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "The pump 日本語 🙂 naïve café, the meter."
    ids = tokenizer(text)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token splits a character
    pieces: list[str] = []
    stream = common.TextStream(tokenizer, pieces.append)
    for n in range(1, len(ids) + 1):
        stream.push(ids[:n])
    stream.push(ids, final=True)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


class _PlainRuntime:
    """Stands in for a Runtime: a plain DynamicCache, to test the loop alone."""

    def cache(self, input_ids=None):
        from transformers import DynamicCache

        return DynamicCache()


@pytest.mark.parametrize("as_list", [False, True])
def test_generate_stream_stops_at_eos_int_or_list(tiny_model_dir: Path, as_list: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = common.encode_prompt(tokenizer, "The pump", chat=False)
    free = common.generate_stream(model, tokenizer, _PlainRuntime(), ids, 6, lambda s: None, progress=False)
    assert len(free) == 6
    eos = free[3]
    first = free.index(eos)
    model.generation_config.eos_token_id = [999_999, eos] if as_list else eos
    pieces: list[str] = []
    stopped = common.generate_stream(
        model, tokenizer, _PlainRuntime(), ids[0].tolist(), 6, pieces.append, prefill_chunk=2, progress=False
    )
    assert stopped == free[:first]
    assert "".join(pieces) == tokenizer.decode(free[:first], skip_special_tokens=True)


def test_format_stats_table() -> None:
    table = common.format_stats_table(
        {
            "bytes_moved": {"device->host": 0, "host->device": 3 * 2**20},
            "kv_bytes": 1536,
            "tokens": {"prefill": 3100, "decode": 64},
            "stall_seconds": 0.25,
            "attended_fraction": None,
            "budgets": {"device": 8 * 2**20},
            "stall_seconds_per_layer": [0.5, 0.25, 0.75],
        }
    )
    lines = table.splitlines()
    assert len(lines) == 9
    assert lines[1].split() == ["bytes_moved", "host->device", "3.0MiB"]
    assert "1.5KiB" in lines[2] and "3,100" in lines[3] and "0.250 s" in lines[5] and lines[6].endswith("-")
    assert lines[7].endswith("8.0MiB")
    assert lines[8].endswith("3 values: mean 0.500 s, max 0.750 s")
    assert len({len(line) for line in lines}) == 1  # aligned


@pytest.mark.slow
def test_default_model_through_three_tiers(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """The embedded SmolLM2: 30 layers, 3 KV heads, head_dim 64, so a 16-token page is 24 KiB per layer and the
    ~45 tokens here are 90 pages; the device holds 35 (one tail page per layer plus four for streaming), the host 21."""
    kv = tmp_path / "kv"
    code, out, err = run_cli(
        capsys, "generate", "--prompt", "Name three colors of the rainbow.", "--max-new-tokens", "8", "--stats",
        "--page-size", "16", "--device-budget", "840KiB", "--host-budget", "512KiB", "--disk-dir", str(kv),
        "--no-progress",
    )
    assert code == 0, err
    assert out.strip()
    # Bug: GGUF loading progress bars printed despite --no-progress (transformers' GGUF loader calls tqdm itself).
    assert "de-quantizing" not in err and "Loading weights" not in err and "it/s" not in err
    peak = {line.split()[1]: line.split()[2] for line in err.splitlines() if line.startswith("peak_resident_bytes")}
    assert set(peak) == {"device", "host", "disk"} and all(not size.startswith("0B") for size in peak.values()), peak
    assert_empty_dir(kv)


# ---- device ----------------------------------------------------------------------------------------------------

BAD_DEVICES = [
    ("cuda", False, 0, "not available"),
    ("cuda:0", False, 0, "not available"),
    ("cuda:7", True, 1, "does not exist; this machine has 1 CUDA device"),
    ("gpu0", True, 1, "expected cpu, cuda or cuda:N"),
    ("cuda:x", True, 1, "expected cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("device,available,count,says", BAD_DEVICES, ids=[d for d, *_ in BAD_DEVICES])
def test_unusable_device_is_one_line_before_loading(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device: str, available: bool,
    count: int, says: str,
) -> None:
    """Bug: `offload generate --device cuda` on a machine without CUDA printed a traceback and exited 1 (the same
    from the API); a malformed device or cuda:7 on a 1-GPU machine failed late too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr("tools.generate.load", lambda args: pytest.fail("the model was loaded"))
    code, out, err = run_cli(capsys, "generate", "--prompt", "hi", "--device", device)
    assert code == 2 and out == ""
    line = assert_one_line_error(err, "--device")
    assert line.startswith("offload: error: --device: ") and says in line
    with pytest.raises(ValueError, match=rf"^device: .*{says}"):
        OffloadConfig(device=device)
    from offload import offload

    with pytest.raises(ValueError, match=r"^device: "):
        with offload(torch.nn.Linear(1, 1), device=device):
            pass


# ---- where the prompt comes from -------------------------------------------------------------------------------


class _Stdin:
    """A stand-in for sys.stdin: bytes behind .buffer, and whether it is a terminal."""

    def __init__(self, data: bytes = b"", tty: bool = False):
        import io

        self.buffer = io.BytesIO(data)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def read(self) -> str:
        return self.buffer.read().decode()


def _prompt_args(prompt: str | None = None, prompt_file: str | None = None):
    import argparse

    return argparse.Namespace(prompt=prompt, prompt_file=prompt_file)


@pytest.mark.parametrize("how", ["piped", "--prompt -", "--prompt-file -"])
def test_prompt_from_stdin(how: str) -> None:
    """Bug: `echo hi | offload generate` said no prompt was given, and `--prompt -` sent a literal "-"."""
    args = {"piped": _prompt_args(), "--prompt -": _prompt_args(prompt="-"),
            "--prompt-file -": _prompt_args(prompt_file="-")}[how]
    assert common.read_prompt(args, stdin=_Stdin("naïve pump\n".encode())) == "naïve pump\n"


def test_no_prompt_and_a_terminal_on_stdin_is_one_clear_error(capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug (the other side of reading stdin): with a terminal on stdin, waiting for input would look like a hang."""
    monkeypatch.setattr(sys, "stdin", _Stdin(tty=True))
    code, _, err = run_cli(capsys, "generate")
    assert code == 2
    line = assert_one_line_error(err, "--prompt")
    assert "stdin" in line and "--prompt-file" in line


def test_generate_reads_a_piped_prompt(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                       tiny_model_dir: Path) -> None:
    """Bug: `echo ... | offload generate` (and `--prompt -`) must generate from the piped text."""
    prompt = CORPUS[:120]
    monkeypatch.setattr(sys, "stdin", _Stdin(prompt.encode()))
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "-",
                             "--max-new-tokens", "6", "--no-progress")
    assert code == 0, err
    assert out == _reference_text(tiny_model_dir, prompt, 6) + "\n"


def test_prompt_file_may_be_a_pipe(tmp_path: Path) -> None:
    """Bug: --prompt-file said "does not exist" for /dev/stdin and for a process substitution `<(...)`, which are
    pipes, not regular files."""
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("from a pipe",), daemon=True)
    writer.start()
    try:
        assert common.read_prompt(_prompt_args(prompt_file=str(fifo))) == "from a pipe"
    finally:
        writer.join(timeout=10)


@pytest.mark.parametrize("kind", ["directory", "latin-1", "missing"])
def test_prompt_file_errors_name_the_flag_the_file_and_the_reason(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                                   kind: str) -> None:
    """Bug: a directory was reported as "does not exist", and a non-UTF-8 file as a bare codec error that named
    neither the flag nor the file."""
    path = tmp_path / kind
    if kind == "directory":
        path.mkdir()
    elif kind == "latin-1":
        path.write_bytes("café".encode("latin-1"))
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(path))
    assert code == 2
    line = assert_one_line_error(err, "--prompt-file")
    assert line.startswith(f"offload: error: --prompt-file: {path} ")
    assert {"directory": "is a directory", "latin-1": "is not UTF-8 text", "missing": "does not exist"}[kind] in line


def test_unwritable_disk_dir_fails_before_the_model_loads(capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Bug: an unusable --disk-dir was reported only after the model had loaded (20 s with the default model)."""
    monkeypatch.setattr("tools.generate.load", lambda args: pytest.fail("the model was loaded first"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for disk_dir in (blocker, blocker / "kv"):
        code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--disk-dir", str(disk_dir))
        assert code == 2
        assert_one_line_error(err, "--disk-dir")
    assert blocker.read_text() == "not a directory"
    fresh = tmp_path / "new" / "kv"
    common.check_disk_dir_usable(str(fresh))  # creatable: fine, and not created by the check
    assert not (tmp_path / "new").exists()


# ---- signals ---------------------------------------------------------------------------------------------------


def test_sigterm_mid_run_exits_143_and_cleans_the_disk_dir(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Bug: SIGTERM (sent by `timeout`, `kill`, container stops, systemd, Slurm) left the disk tier's file, as
    large as the KV, behind. It now cleans up like Ctrl-C and exits with 128 + 15. (After SIGKILL, which nothing
    can catch, the next run removes the file: tests/test_tiers.py, test_stale_files_of_dead_processes_are_removed.)"""
    import signal
    import time

    kv = tmp_path / "kv"
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(CORPUS, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # One token per forward pass and many new tokens: the run lasts seconds after its file appears.
    proc = subprocess.Popen(
        [sys.executable, "-m", "offload.cli", "generate", "--model", str(tiny_model_dir), "--prompt-file",
         str(prompt), "--max-new-tokens", "120", "--prefill-chunk", "1", "--disk-dir", str(kv), "--no-progress",
         *THREE_TIERS],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (kv.is_dir() and any(kv.iterdir())):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no disk file appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert err.rstrip("\n").splitlines()[-1] == "offload: terminated by SIGTERM"
    assert_empty_dir(kv)


def test_sighup_in_process_exits_129_cleans_up_and_restores_the_handler(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Bug: SIGHUP (the terminal closed) killed the run without cleaning up, like SIGTERM."""
    import signal

    def hang_up() -> None:
        assert any(Path(kv).iterdir())  # the disk tier's file exists now
        os.kill(os.getpid(), signal.SIGHUP)

    seen = _stop_after(monkeypatch, 2, hang_up)
    kv = tmp_path / "kv"
    before = signal.getsignal(signal.SIGHUP)
    code, _, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--prompt", CORPUS[:300], "--max-new-tokens", "50",
        "--disk-dir", str(kv), "--no-progress", *THREE_TIERS,
    )
    assert code == 129 and len(seen) == 2
    assert err.rstrip("\n").splitlines()[-1] == "offload: terminated by SIGHUP"
    assert signal.getsignal(signal.SIGHUP) == before
    assert_empty_dir(kv)


# ---- the trace ---------------------------------------------------------------------------------------------------


def test_generate_trace_is_saved_not_thrown_away(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path, tiny_model_dir: Path) -> None:
    """Bug: `offload generate --trace` recorded a timeline and threw it away. --trace-file PATH saves it there;
    bare --trace saves ./offload-trace.json; both say where on stderr."""
    import json

    monkeypatch.chdir(tmp_path)
    explicit = tmp_path / "traces" / "run.json"
    explicit.parent.mkdir()
    for flags, path in ((["--trace-file", str(explicit)], explicit), (["--trace"], tmp_path / "offload-trace.json")):
        code, out, err = run_cli(
            capsys, "generate", "--model", str(tiny_model_dir), "--prompt", CORPUS[:200], "--max-new-tokens", "4",
            "--disk-dir", str(tmp_path / "kv"), "--no-progress", *THREE_TIERS, *flags,
        )
        assert code == 0, err
        assert f"trace written to {path}" in err.splitlines()[-1]
        events = json.loads(path.read_text())["traceEvents"]
        names = {e.get("args", {}).get("name") for e in events if e.get("ph") == "M"}
        assert any("disk" in str(n) for n in names) and any(e.get("ph") == "X" for e in events)
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--trace-file", str(tmp_path / "no" / "t.json"))
    assert code == 2
    assert_one_line_error(err, "--trace-file")


def test_a_trace_that_cant_be_saved_is_one_line_naming_the_flag_and_the_file(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Bug: a trace file that passed the checks before the run but could not be written at the end (a full disk,
    a special file) gave `offload: error: [Errno 28] No space left on device`, naming neither the flag nor the
    file."""
    from offload.trace import Tracer

    def full_disk(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Tracer, "save", full_disk)
    path = tmp_path / "t.json"
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens",
                           "2", "--no-progress", "--trace-file", str(path))
    assert code == 2
    assert_one_line_error(err, "--trace-file")
    assert str(path) in err and "No space left on device" in err


def test_option_names_inside_an_error_are_written_as_flags():
    """Bug: `--disk-budget 1GiB` without `--disk-dir` said "pass disk_dir": the command line names its flags, so
    an option named in the middle of a message is written as one too; paths and plain words stay as they are."""
    from offload.cli import build_parser, error_line

    _, subparsers = build_parser(["generate"])
    line = error_line(ValueError("disk_budget: given without disk_dir; pass disk_dir (/tmp/disk_dir stays)"),
                      subparsers["generate"])
    assert line == "--disk-budget: given without --disk-dir; pass --disk-dir (/tmp/disk_dir stays)"
    assert error_line(ValueError("device: cuda is not available"), subparsers["generate"]).startswith("--device:")


def test_bench_takes_no_progress():
    """Bug: `offload bench` refused --no-progress, so its model loading bars could not be silenced as in generate
    and profile."""
    from offload.cli import build_parser

    parser, _ = build_parser(["bench"])
    args = parser.parse_args(["bench", "--no-progress"])
    assert args.no_progress is True
