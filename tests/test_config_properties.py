"""Bad input at scale: `OffloadConfig` options and their command-line flags over adversarial values.

The rule: an invalid value raises ValueError whose message starts with the option's name (`io_timeout: ...`),
never another exception; a valid one constructs. The regressions below each carry the bug they pin.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.cli import main
from offload.config import OffloadConfig
from offload.sizes import MAX_SIZE, parse_size


# ---- regressions -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["9" * 400, "1" + "0" * 400 + "GiB", str(MAX_SIZE + 1), "8388608TiB",
                                   10**30, 1e300])
def test_a_size_too_large_for_any_budget_is_a_value_error(value: object) -> None:
    """A size string with more digits than a float holds raised OverflowError (via float infinity), and 10**30
    bytes passed as a budget; sizes now stop at 8 EiB, with a ValueError naming the option."""
    with pytest.raises(ValueError, match="^host_budget: a size must be at most"):
        OffloadConfig(host_budget=value)


def test_size_strings_are_exact() -> None:
    """Size strings went through float, which rounded 2**53 + 1 bytes to 2**53."""
    assert parse_size("9007199254740993", "host_budget") == 2**53 + 1
    assert parse_size(str(MAX_SIZE), "host_budget") == MAX_SIZE
    assert parse_size("0.1KB", "host_budget") == 100


@pytest.mark.parametrize("value", [[], {}, {"k8v4"}, ["k8v4"]])
def test_kv_quant_that_is_unhashable(value: object) -> None:
    """kv_quant is looked up in a dict: a list, dict or set raised TypeError (unhashable type)."""
    with pytest.raises(ValueError, match="^kv_quant: expected one of"):
        OffloadConfig(kv_quant=value)


@pytest.mark.parametrize("name", ["measure_recall", "trace"])
@pytest.mark.parametrize("value", ["no", "false", "", None, 0, 1, 1.0])
def test_switches_take_only_bools(name: str, value: object) -> None:
    """measure_recall and trace took any value by its truth: trace="no" recorded a timeline."""
    with pytest.raises(ValueError, match=f"^{name}: expected True or False"):
        OffloadConfig(**{name: value})


class BytesPath:
    """An os.PathLike that gives bytes."""

    def __fspath__(self) -> bytes:
        return b"kv"


class BrokenPath:
    """An os.PathLike that gives neither str nor bytes."""

    def __fspath__(self) -> object:
        return 3


@pytest.mark.parametrize("name", ["disk_dir", "prefix_cache"])
@pytest.mark.parametrize("value", ["a\x00b", "kv\ud800", " ", "\t\n", BytesPath(), BrokenPath(), "redis://h\x00/0"])
def test_paths_a_file_system_cannot_take(name: str, value: object) -> None:
    """A path with a NUL byte or a lone surrogate was taken, and failed later (after the model loaded) with
    "embedded null byte" or UnicodeEncodeError, naming nothing; a PathLike giving bytes was kept as bytes, and for
    prefix_cache raised TypeError; a blank disk_dir named a directory " "."""
    with pytest.raises(ValueError, match=f"^{name}: "):
        OffloadConfig(**{name: value})


@pytest.mark.parametrize("value", [b"cpu", bytearray(b"cpu"), 0, 1])
def test_device_is_a_str(value: object) -> None:
    """torch.device took bytes (b"cpu" was kept as the device) and ints (0 was cuda:0)."""
    with pytest.raises(ValueError, match="^device: "):
        OffloadConfig(device=value)


def test_prefix_cache_budget_without_prefix_cache() -> None:
    """prefix_cache_budget without prefix_cache was ignored without a word (disk_budget without disk_dir is an
    error)."""
    with pytest.raises(ValueError, match="^prefix_cache_budget: given without prefix_cache"):
        OffloadConfig(prefix_cache_budget="1GiB")
    assert OffloadConfig(prefix_cache="kv-prefix", prefix_cache_budget="1GiB").prefix_cache_budget_bytes == 2**30


def test_profile_that_fails_its_checks_creates_no_out_directory(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`offload profile --out DIR` created DIR before checking the runtime flags, so a typo left it behind."""
    out = tmp_path / "out"
    assert main(["profile", "--prompt", "hi", "--out", str(out), "--page-size", "0"]) == 2
    assert "--page-size" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("text", ["inf", "1e400", "1e300", "nan", "0"])
def test_profile_sample_interval_is_finite(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--sample-interval inf (or 1e300) passed the check and reached the sampler's thread, whose wait raised
    OverflowError (timestamp out of range) there, after the model loaded."""
    code = main(["profile", "--prompt", "hi", "--out", str(tmp_path / "out"), "--sample-interval", text])
    assert code == 2
    assert capsys.readouterr().err.startswith("offload: error: --sample-interval: expected seconds > 0")


@pytest.mark.parametrize("flag", ["--prefix-cache-timeout", "--io-timeout", "--history"])
def test_float_flag_with_many_digits(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A float option's flag was parsed as an int where it could be: 400 nines reached prefix_cache_timeout's check
    as an int too large for float(), and `offload` died of OverflowError with a traceback."""
    code = main(["generate", "--prompt", "hi", "--prefix-cache", str(tmp_path / "prefix"), f"{flag}={'9' * 400}"])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"offload: error: {flag}: expected")


@pytest.mark.parametrize("action", ["stats", "clear"])
@pytest.mark.parametrize("flags", [["--prefix-cache="], ["--prefix-cache= "], ["--prefix-cache=a\x00b"],
                                   ["--prefix-cache=redis://h\x00/0"],
                                   ["--prefix-cache=no-such-dir", "--prefix-cache-timeout=nan"]])
def test_cache_command_checks_its_flags_first(action: str, flags: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`offload cache clear` of a path with a NUL byte, or with a bad --prefix-cache-timeout, printed "removed 0
    entries" and exited 0; `stats` of an empty path said " does not exist"; a host with a NUL byte was tried."""
    assert main(["cache", action, *flags]) == 2
    err = capsys.readouterr().err
    name = flags[-1].split("=")[0]
    assert err.startswith(f"offload: error: {name}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("text", [str(2**64), str(10**30), "-1"])
def test_bench_seed_in_range(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench --seed 2**64 was taken: every row then failed when it seeded its prompt (torch's seeds are 64-bit),
    and the run ended with exit code 0 and a table of errors."""
    assert main(["bench", "--model", str(tmp_path / "no-model"), f"--seed={text}"]) == 2
    assert capsys.readouterr().err.startswith("offload: error: --seed: expected an int from 0 to")
