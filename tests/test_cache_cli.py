"""`offload cache stats|clear`: the output for a directory and for a real server, one-line errors with exit code 2
for a bad or unreachable store, and that looking at a store that isn't there creates nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from offload.cli import main
from offload.sizes import format_size
from tiers.prefix import open_store


BUDGET = 16 << 20  # well above the ~1 MiB a server uses for itself


def key(i: int) -> str:
    return f"{i:064x}"


def fill(spec: str, sizes: list[int]) -> None:
    with open_store(spec, budget=BUDGET) as store:
        store.put([(key(i), b"x" * n) for i, n in enumerate(sizes)])


def cache(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["cache", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "inspect or empty a prefix cache store" in capsys.readouterr().out


@pytest.fixture(params=["dir", "valkey"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "dir":
        return str(tmp_path / "prefix")
    return request.getfixturevalue("kv_server_url")


def test_stats_and_clear(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    fill(spec, [1000, 2000, 3000])
    code, out, err = cache(capsys, "stats", "--prefix-cache", spec)
    assert (code, err) == (0, "")
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["store"] == ("valkey" if "://" in spec else "dir")
    assert (lines["where"], lines["entries"], lines["bytes"]) == (spec, "3", format_size(6000))
    assert lines["budget"] == "16.0MiB" and lines["policy"] in ("lru", "allkeys-lru")

    code, out, _ = cache(capsys, "stats", "--json", "--prefix-cache", spec)
    stats = json.loads(out)
    assert code == 0 and (stats["entries"], stats["bytes"], stats["budget"]) == (3, 6000, BUDGET)

    code, out, _ = cache(capsys, "clear", "--prefix-cache", spec)
    assert (code, out) == (0, f"removed 3 entries from {spec}\n")
    assert json.loads(cache(capsys, "stats", "--json", "--prefix-cache", spec)[1])["entries"] == 0


def test_no_store_there_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    code, out, err = cache(capsys, "stats", "--prefix-cache", str(missing))
    assert (code, out) == (2, "")
    assert err == f"offload: error: --prefix-cache: {missing} does not exist\n"
    code, out, _ = cache(capsys, "clear", "--prefix-cache", str(missing))
    assert (code, out) == (0, f"removed 0 entries: {missing} does not exist\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cache(capsys, "stats", "--prefix-cache", str(empty))
    assert code == 2 and "holds no prefix cache" in err
    assert cache(capsys, "clear", "--prefix-cache", str(empty))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not list(empty.iterdir())


def test_dead_server_is_a_one_line_error(kv_server, capsys: pytest.CaptureFixture[str]) -> None:
    fill(kv_server.url, [10])
    kv_server.kill()
    for action in ("stats", "clear"):
        start = time.monotonic()
        code, out, err = cache(capsys, action, "--prefix-cache", kv_server.url, "--prefix-cache-timeout", "1")
        assert time.monotonic() - start < 2.0
        assert (code, out) == (2, "")
        assert err.startswith(f"offload: error: --prefix-cache: {kv_server.url} unreachable: ")
        assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["stats"], "the following arguments are required: --prefix-cache"),
    (["stats", "--prefix-cache", "ftp://host/0"], "offload: error: --prefix-cache: ftp://host/0 has an unknown scheme"),
    (["stats", "--prefix-cache", "redis://h:1/0", "--prefix-cache-timeout", "0"],
     "offload: error: --prefix-cache-timeout: expected a number of seconds > 0"),
    (["size", "--prefix-cache", "/tmp"], "invalid choice: 'size'"),
    ([], "the following arguments are required: action, --prefix-cache"),
])
def test_usage_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cache(capsys, *args)
    assert (code, out) == (2, "")
    assert message in err and "Traceback" not in err


def test_password_stays_hidden(capsys: pytest.CaptureFixture[str]) -> None:
    from servers import free_port

    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/0"
    code, _, err = cache(capsys, "stats", "--prefix-cache", url)
    assert code == 2 and "hunter2" not in err and "user:***@" in err
