"""Bad input at scale: every `OffloadConfig` option, and its command-line flag, over values from its documented
domain and adversarial ones (wrong types, boundaries, odd strings, paths and URLs, bad combinations).

The rule: an invalid value raises ValueError whose message starts with the option's name (`io_timeout: ...`),
never another exception; a valid one constructs. On the command line an invalid flag value exits with status 2
and one error line, `offload: error: --flag: ...` or argparse's usage error naming the flag, and no traceback; a
valid one gets as far as loading the model, where a path that does not exist stops it naming --model.

Each option has a `Domain` in DOMAINS; a new option without one fails `test_every_option_has_a_domain`. The
regressions found this way are kept below as plain examples, each with the bug it pins.
"""

from __future__ import annotations

import dataclasses
import math
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.cli import main
from offload.config import ATTENTION_MODES, HEAD_SELECTIONS, HOST_ATTENTION, IO_ENGINES, PREFIX_PUBLISH, OffloadConfig
from offload.quant import SETTINGS as KV_QUANT
from offload.sizes import MAX_SIZE, parse_size
from policies import EVICTION, PREFETCH, SELECTION
from tiers.prefix import SCHEMES, open_store

CUDA = torch.cuda.is_available()
TMP = "@TMP@"  # stands for the test's temporary directory in generated flag values
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLI_SETTINGS = settings(max_examples=12, deadline=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@dataclasses.dataclass
class Domain:
    """An option's values: `valid` and `invalid` Python values; `flag_valid` and `flag_invalid` the text after
    `--flag=` (None: the flag alone, for a switch)."""

    valid: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Any]
    flag_valid: st.SearchStrategy[str | None]
    flag_invalid: st.SearchStrategy[str]


# ---- building blocks -------------------------------------------------------------------------------------------

NONE = st.none()
BOOLS = st.booleans()
TEXT = st.text(max_size=12)
# Types that no option takes.
WRONG = st.one_of(
    st.binary(max_size=4), st.lists(st.integers(0, 9), max_size=2), st.tuples(st.integers(0, 9)),
    st.dictionaries(st.text(max_size=2), st.integers(0, 9), max_size=1), st.sets(st.integers(0, 9), max_size=2),
    st.complex_numbers(max_magnitude=10, allow_nan=False), st.builds(object),
)
HUGE = st.sampled_from([2**63, 2**64, 10**30, 10**300, -(10**30)])
ODD_NUMBERS = st.sampled_from(["", " ", "nan", "inf", "-inf", "1e400", "0x10", "1,5", "1.5.3", "one", "1 2", "--1"])


def _int_of(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _float_of(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def ints(lo: int, hi: int | None = None) -> Domain:
    """An int option from `lo` to `hi` (None: no upper bound)."""

    def inside(n: int | None) -> bool:
        return n is not None and n >= lo and (hi is None or n <= hi)

    outside = st.integers(max_value=lo - 1)
    if hi is not None:
        outside |= st.integers(min_value=hi + 1) | HUGE.filter(lambda n: not inside(n))
    valid = st.integers(lo, hi if hi is not None else 10**30)
    return Domain(
        valid=valid,
        invalid=st.one_of(outside, NONE, BOOLS, st.floats(), valid.map(float), valid.map(str), TEXT, WRONG),
        flag_valid=valid.map(str),
        flag_invalid=st.one_of(outside.map(str), st.floats().map(repr), ODD_NUMBERS, TEXT).filter(
            lambda t: not inside(_int_of(t))),
    )


def optional(domain: Domain) -> Domain:
    """`domain`, or None (the option's default, picked at run time)."""
    return dataclasses.replace(domain, valid=NONE | domain.valid,
                               invalid=domain.invalid.filter(lambda x: x is not None))


def floats(lo: float, hi: float, lo_open: bool, hi_open: bool) -> Domain:
    """A float option in the interval from `lo` to `hi`; ints inside it are valid too."""

    def inside(x: float | None) -> bool:
        return x is not None and (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)

    valid = st.floats(lo, hi, exclude_min=lo_open, exclude_max=hi_open) | st.integers(
        math.floor(lo), math.ceil(hi)).filter(inside)
    outside = st.one_of(st.floats().filter(lambda x: not inside(x)), st.integers(-(10**6), 10**6).filter(
        lambda n: not inside(n)), st.sampled_from([2**63, 10**30, 10**300, -(10**30)]))
    return Domain(
        valid=valid,
        invalid=st.one_of(outside, NONE, BOOLS, valid.map(str), TEXT, WRONG),
        flag_valid=valid.map(repr),
        flag_invalid=st.one_of(outside.map(repr), ODD_NUMBERS, TEXT).filter(lambda t: not inside(_float_of(t))),
    )


def choice(names: list[str]) -> Domain:
    """A str option that is one of `names`."""
    near = st.sampled_from(names).flatmap(lambda n: st.sampled_from([n.upper(), n.title(), f" {n}", f"{n} ",
                                                                      n[:-1], n + "\x00", ""]))
    wrong_text = (TEXT | near).filter(lambda t: t not in names)
    return Domain(
        valid=st.sampled_from(names),
        invalid=st.one_of(wrong_text, st.sampled_from(names).map(str.encode), NONE, BOOLS, st.integers(),
                          st.floats(), WRONG, st.sampled_from(names).map(lambda n: [n])),
        flag_valid=st.sampled_from(names),
        flag_invalid=wrong_text,
    )


def switch() -> Domain:
    """A bool option: a flag without a value."""
    return Domain(
        valid=BOOLS,
        invalid=st.one_of(NONE, st.integers(), st.floats(), st.sampled_from(["yes", "no", "true", "false", ""]),
                          TEXT, WRONG),
        flag_valid=st.just(None),
        flag_invalid=st.sampled_from(["yes", "no", "1", "0", "true", ""]) | TEXT,
    )


# Sizes: "512MiB", " 1.5 GB ", "4096", 4096, 4096.0.
UNITS = ["", "b", "B", "k", "KB", "kb", "ki", "KiB", "kib", "M", "MB", "MiB", "G", "GB", "GiB", "gib", "T", "TB",
         "TiB"]
SPACES = st.sampled_from(["", " ", "\t"])


def _size_text(least: int) -> st.SearchStrategy[str]:
    return st.builds(
        lambda a, n, frac, b, unit, c: f"{a}{n}{frac}{b}{unit}{c}",
        SPACES, st.integers(max(least, 0), 10**6), st.sampled_from(["", ".5", ".25", ".0", ".999"]), SPACES,
        st.sampled_from(UNITS), SPACES,
    )


ODD_SIZES = ["", " ", "1.5.3GiB", "-1MiB", "-5", "1e400", "1e3", "0x10", "\u0661\u0662", "\uff11\uff12", "10 G iB",
             "GiB", "1GiBB", "1,5GB", "+1", "1_000", "inf", "nan", "x" * 5000, "9" * 400, str(MAX_SIZE + 1),
             "1" + "0" * 19 + "B", "12\x00", "8EiB", "1PB", "5 parsecs", "5.", "1 .5GB", "16TiB" * 2]


def sizes(least: int = 0) -> Domain:
    """A byte size option: None, an int from `least` to MAX_SIZE, an integral float, or a size string."""
    valid_text = _size_text(least)
    below = st.sampled_from(["0", "0B", "0KiB", " 0.4 "]) if least > 0 else st.nothing()
    bad_text = st.one_of(st.sampled_from(ODD_SIZES), below,
                         TEXT.filter(lambda t: not any(c in string.digits for c in t)))
    outside = st.one_of(st.integers(max_value=least - 1), st.integers(min_value=MAX_SIZE + 1),
                        st.floats().filter(lambda x: not (x.is_integer() and least <= x <= MAX_SIZE)))
    return Domain(
        valid=st.one_of(NONE, st.integers(least, MAX_SIZE), st.integers(least, 2**53).map(float), valid_text),
        invalid=st.one_of(outside, bad_text, BOOLS, WRONG),
        flag_valid=valid_text | st.integers(least, MAX_SIZE).map(str),
        flag_invalid=bad_text | outside.filter(lambda x: isinstance(x, int)).map(str),
    )


# Paths: any non-blank str without a NUL byte or a lone surrogate (no file name can hold one), or an os.PathLike
# of one.
PATH_TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1,
                    max_size=16).filter(str.strip)
SAFE_NAME = st.text(string.ascii_letters + string.digits + "-_. ", min_size=1, max_size=10).filter(
    lambda t: t.strip() and t not in (".", ".."))


class BytesPath:
    """An os.PathLike that gives bytes: the options take str paths."""

    def __fspath__(self) -> bytes:
        return b"kv"


class BrokenPath:
    """An os.PathLike that gives neither str nor bytes."""

    def __fspath__(self) -> object:
        return 3


BAD_PATHS = st.one_of(
    st.sampled_from(["", " ", "\t\n", "a\x00b", "\x00", "kv\udc80\ud800"]),
    st.builds(lambda a, b: f"{a}\x00{b}", TEXT, TEXT),
    st.binary(max_size=4), st.builds(BytesPath), st.builds(BrokenPath), st.integers(), BOOLS, st.floats(),
    WRONG.filter(lambda v: not isinstance(v, bytes)),
)


def paths(name: str) -> Domain:
    """A directory option; its valid flag values are paths under the test's temporary directory."""
    return Domain(
        valid=st.one_of(NONE, PATH_TEXT, PATH_TEXT.map(Path)),
        invalid=BAD_PATHS,
        flag_valid=SAFE_NAME.map(lambda n: f"{TMP}/{name}/{n}"),
        flag_invalid=st.sampled_from(["", " ", "a\x00b", f"{TMP}/kv\x00"]),
    )


# Prefix cache: a directory path, or redis://[user[:password]@]host[:port][/db] (also valkey, rediss, valkeys).
HOSTS = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True) | st.sampled_from(
    ["127.0.0.1", "[::1]", "cache.example.com", "H"])
USERS = st.sampled_from(["", "user@", "user:secret@", ":secret@", "u%40x:p%3Aw@"])


def _url(scheme: str, user: str, host: str, port: object, db: object) -> str:
    return f"{scheme}://{user}{host}{'' if port is None else f':{port}'}{'' if db is None else f'/{db}'}"


URLS = st.builds(_url, st.sampled_from(SCHEMES), USERS, HOSTS, st.none() | st.integers(1, 65535),
                 st.none() | st.integers(0, 10**6))
BAD_URLS = st.one_of(
    st.sampled_from(["redis://", "redis://:0", "redis://:6379/0", "redis://h:99999", "redis://h:65536",
                     "redis://h:-1", "redis://h:x", "redis://h:1.5", "valkey://h/notadb", "rediss://h:6379/-1",
                     "redis://h/0/1", "redis://h/0?db=1", "redis://h/0#x", "redis://[::1", "http://h", "://h",
                     "redis://user@", "REDIS-X://h", "redis://h\x00/0"]),
    st.builds(_url, st.sampled_from(SCHEMES), USERS, HOSTS, st.integers(65536, 10**6), st.none()),
    st.builds(_url, st.sampled_from(SCHEMES), USERS, HOSTS, st.none(),
              st.text(string.ascii_letters + "-.", min_size=1, max_size=6)),
    st.builds(_url, st.from_regex(r"[a-z][a-z0-9+.-]{0,6}", fullmatch=True).filter(lambda s: s not in SCHEMES),
              USERS, HOSTS, st.none(), st.none()),
)
DIR_TEXT = PATH_TEXT.filter(lambda t: "://" not in t)


# Devices: "cpu", "cpu:N", torch.device; "cuda" and "cuda:0" where a GPU is.
GOOD_DEVICES = ["cpu", "cpu:0"] + (["cuda", "cuda:0"] if CUDA else [])
BAD_DEVICES = ["", " ", "CPU", "Cpu", "gpu", "meta", "mps", "hpu", "xpu", "cuda:-1", "cpu:-1", "cuda:0:1", "cuda:",
               "cpu\x00", " cpu", "cuda:99"] + ([] if CUDA else ["cuda", "cuda:0"])
DEVICE_TEXT = TEXT.filter(lambda t: not t.startswith(("cpu", "cuda")))

DIVISORS_64 = [1, 2, 4, 8, 16, 32, 64]
NOT_DIVISORS_64 = st.integers().filter(lambda n: n < 1 or 64 % n)


def _token_budget_text_ok(text: str) -> bool:
    """Whether `--token-budget=text` is valid: an int >= 1, or else a float in (0, 1]."""
    n = _int_of(text)
    if n is not None:
        return n >= 1
    x = _float_of(text)
    return x is not None and 0 < x <= 1


DOMAINS: dict[str, Domain] = {
    "device_budget": sizes(),
    "host_budget": sizes(),
    "disk_budget": sizes(),
    "disk_dir": paths("disk_dir"),
    "page_size": ints(1, 4096),
    "attention": choice(list(ATTENTION_MODES)),
    "token_budget": Domain(  # an int number of tokens, or a float fraction of the context
        valid=st.integers(1, 10**30) | st.floats(0, 1, exclude_min=True),
        invalid=st.one_of(st.integers(max_value=0), st.floats().filter(lambda x: not 0 < x <= 1), NONE, BOOLS,
                          st.sampled_from(["0.1", "512"]), TEXT, WRONG),
        flag_valid=st.integers(1, 10**30).map(str) | st.floats(0, 1, exclude_min=True).map(repr),
        flag_invalid=st.one_of(st.integers(max_value=0).map(str), st.floats().filter(lambda x: not 0 < x <= 1).map(
            repr), ODD_NUMBERS, TEXT).filter(lambda t: not _token_budget_text_ok(t)),
    ),
    "prefetch": choice(PREFETCH.names()),
    "eviction": choice(EVICTION.names()),
    "selection": choice(SELECTION.names()),
    "sink_tokens": ints(0),
    "recent_tokens": ints(0),
    "dense_layers": ints(0),
    "select_block": Domain(  # a divisor of page_size, here the default 64
        valid=NONE | st.sampled_from(DIVISORS_64),
        invalid=st.one_of(NOT_DIVISORS_64, HUGE, BOOLS, st.sampled_from([16.0, "16"]), st.floats(), TEXT, WRONG),
        flag_valid=st.sampled_from(DIVISORS_64).map(str),
        flag_invalid=st.one_of(NOT_DIVISORS_64.map(str), ODD_NUMBERS, st.just("16.0"), TEXT).filter(
            lambda t: _int_of(t) not in DIVISORS_64),
    ),
    "head_selection": choice(list(HEAD_SELECTIONS)),
    "history": floats(0.0, 1.0, lo_open=False, hi_open=True),
    "block_cache": floats(0.0, 1.0, lo_open=False, hi_open=True),
    "kv_quant": choice(list(KV_QUANT)),
    "measure_recall": switch(),
    "trace": switch(),
    "io_threads": ints(1, 64),
    "io_timeout": floats(0.0, 3600.0, lo_open=True, hi_open=False),
    "io_engine": choice(list(IO_ENGINES)),
    "load_buffers": optional(ints(2, 16)),
    "host_attention": choice(list(HOST_ATTENTION)),
    "device": Domain(
        valid=NONE | st.sampled_from(GOOD_DEVICES) | st.just(torch.device("cpu")),
        invalid=st.one_of(st.sampled_from(BAD_DEVICES), DEVICE_TEXT, st.integers(), BOOLS, st.floats(),
                          st.sampled_from(GOOD_DEVICES).map(str.encode), WRONG),
        flag_valid=st.sampled_from(GOOD_DEVICES),
        flag_invalid=st.sampled_from(BAD_DEVICES) | DEVICE_TEXT,
    ),
    "prefix_cache": Domain(
        valid=st.one_of(NONE, DIR_TEXT, DIR_TEXT.map(Path), URLS),
        invalid=BAD_PATHS | BAD_URLS,
        flag_valid=URLS | SAFE_NAME.map(lambda n: f"{TMP}/prefix/{n}"),
        flag_invalid=st.sampled_from(["", " ", "a\x00b"]) | BAD_URLS,
    ),
    "prefix_cache_budget": sizes(least=1),
    "prefix_cache_publish": choice(list(PREFIX_PUBLISH)),
    "prefix_cache_timeout": floats(0.0, 600.0, lo_open=True, hi_open=False),
}
# Options whose valid values need another option set.
NEEDS = {"disk_budget": "disk_dir", "prefix_cache_budget": "prefix_cache"}
OPTIONS = OffloadConfig.option_names()


def _with_needs(name: str, value: Any) -> dict[str, Any]:
    options = {name: value}
    if name in NEEDS and value is not None:
        options[NEEDS[name]] = "kv-dir"
    return options


def test_every_option_has_a_domain() -> None:
    assert set(DOMAINS) == set(OPTIONS), "add a Domain for each new OffloadConfig option"


# ---- the Python API --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIONS)
@SETTINGS
@given(data=st.data())
def test_valid_values_construct(name: str, data: st.DataObject) -> None:
    value = data.draw(DOMAINS[name].valid, label=name)
    OffloadConfig(**_with_needs(name, value))


@pytest.mark.parametrize("name", OPTIONS)
@SETTINGS
@given(data=st.data())
def test_invalid_values_raise_value_error_naming_the_option(name: str, data: st.DataObject) -> None:
    value = data.draw(DOMAINS[name].invalid, label=name)
    with pytest.raises(ValueError) as e:
        OffloadConfig(**_with_needs(name, value))
    assert str(e.value).startswith(f"{name}: "), str(e.value)
    assert "\n" not in str(e.value)


@st.composite
def valid_options(draw: st.DrawFn) -> dict[str, Any]:
    """Every option valid alone, with page_size and select_block drawn together (a divisor, or any int); the
    options that need another may lack it."""
    options = {name: draw(DOMAINS[name].valid, label=name) for name in OPTIONS}
    options["page_size"] = page = draw(st.integers(1, 4096) | st.sampled_from([16, 64, 96, 128]), label="page_size")
    divisors = [d for d in range(1, min(page, 256) + 1) if page % d == 0] + [page]
    options["select_block"] = draw(NONE | st.sampled_from(divisors) | st.integers(1, 8192), label="select_block")
    return options


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=valid_options())
def test_combinations(options: dict[str, Any]) -> None:
    """Valid options together construct, unless a rule between two of them is broken: then the error names one
    of the two."""
    broken = []
    if options["disk_dir"] is None and options["disk_budget"] is not None \
            and parse_size(options["disk_budget"], "disk_budget") > 0:
        broken.append("disk_budget")
    if options["select_block"] is not None and options["page_size"] % options["select_block"]:
        broken.append("select_block")
    if options["prefix_cache"] is None and options["prefix_cache_budget"] is not None:
        broken.append("prefix_cache_budget")
    if not broken:
        config = OffloadConfig(**options)
        assert config.page_size % config.block_size() == 0
        assert 1 <= config.token_budget_for(1) and 1 <= config.token_budget_for(10**6)
        return
    with pytest.raises(ValueError) as e:
        OffloadConfig(**options)
    assert str(e.value).split(":")[0] in broken, str(e.value)


UNIT_BYTES = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30,
              "gib": 2**30, "ti": 2**40, "tib": 2**40}


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 10**15), frac=st.sampled_from(["", ".5", ".25", ".125", ".0000001"]),
       unit=st.sampled_from(sorted(UNIT_BYTES)), upper=st.booleans())
def test_size_strings_parse_exactly(n: int, frac: str, unit: str, upper: bool) -> None:
    """"<n>[.<frac>]<unit>" is that many units in bytes, rounded down, with no float rounding on the way."""
    from fractions import Fraction

    expected = int(Fraction(f"{n}{frac}") * UNIT_BYTES[unit])
    text = f"{n}{frac}{unit.upper() if upper else unit}"
    if expected > MAX_SIZE:
        with pytest.raises(ValueError, match="^size: a size must be at most"):
            parse_size(text, "size")
    else:
        assert parse_size(text, "size") == expected


# ---- the command line ------------------------------------------------------------------------------------------

COMMANDS = ("generate", "profile", "bench")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argv(command: str, tmp: Path, name: str, text: str | None) -> list[str]:
    """`offload <command>` with option `name` set to `text` (None: the switch alone), a model path that does not
    exist, and what else the command needs to get as far as loading it."""
    argv = [command, "--model", str(tmp / "no-model")]
    if command != "bench":
        argv += ["--prompt", "hi"]
    if command == "profile":
        argv += ["--out", str(tmp / "out")]
    if name in NEEDS:
        argv.append(f"{_flag(NEEDS[name])}={tmp / NEEDS[name]}")
    argv.append(_flag(name) if text is None else f"{_flag(name)}={text.replace(TMP, str(tmp))}")
    return argv


def error_line(command: str, err: str) -> str:
    """The one error line on stderr, `offload: error: ...` alone or argparse's `offload <command>: error: ...`
    after the usage; no traceback."""
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    assert lines, "nothing on stderr"
    if lines[0].startswith("usage: "):
        assert lines[-1].startswith(f"offload {command}: error: "), err
        assert not any(line.startswith("offload") and "error:" in line for line in lines[:-1]), err
    else:
        assert len(lines) == 1 and lines[0].startswith("offload: error: "), err
    return lines[-1]


def names_flag(line: str, command: str, flag: str) -> bool:
    return line.startswith((f"offload: error: {flag}: ", f"offload {command}: error: argument {flag}: "))


@pytest.mark.parametrize("name", OPTIONS)
@CLI_SETTINGS
@given(data=st.data())
def test_flags(name: str, data: st.DataObject, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid flag value gets as far as loading the model (whose path does not exist); an invalid one exits 2
    with one error line naming the flag, before anything is created."""
    capsys.readouterr()
    command = data.draw(st.sampled_from(COMMANDS), label="command")
    valid = data.draw(st.booleans(), label="valid")
    domain = DOMAINS[name]
    text = data.draw(domain.flag_valid if valid else domain.flag_invalid, label="text")
    tmp = Path(tempfile.mkdtemp(dir=tmp_path))
    code = main(_argv(command, tmp, name, text))
    out, err = capsys.readouterr()
    line = error_line(command, err)
    assert (code, out) == (2, ""), err
    if not valid:
        assert names_flag(line, command, _flag(name)), line
        assert list(tmp.iterdir()) == []
    elif command == "bench" and name == "attention":
        assert names_flag(line, command, "--attention"), line  # bench sets it per method
    else:
        assert names_flag(line, command, "--model") and "does not exist" in line, line


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "prefix"
    with open_store(str(path)):
        pass
    return path


@CLI_SETTINGS
@given(data=st.data())
def test_cache_flags(data: st.DataObject, store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`offload cache`: a bad --prefix-cache or --prefix-cache-timeout exits 2 with one line naming it, whether
    the action is stats or clear; a valid timeout on an empty store works."""
    capsys.readouterr()
    action = data.draw(st.sampled_from(["stats", "clear"]), label="action")
    if data.draw(st.booleans(), label="spec"):
        flag = "--prefix-cache"
        argv = ["cache", action, f"{flag}={data.draw(DOMAINS['prefix_cache'].flag_invalid, label='text')}"]
        valid = False
    else:
        flag = "--prefix-cache-timeout"
        valid = data.draw(st.booleans(), label="valid")
        domain = DOMAINS["prefix_cache_timeout"]
        text = data.draw(domain.flag_valid if valid else domain.flag_invalid, label="text")
        argv = ["cache", action, f"--prefix-cache={store_dir}", f"{flag}={text}"]
    code = main(argv)
    out, err = capsys.readouterr()
    if valid:
        assert (code, err) == (0, ""), err
        return
    line = error_line("cache", err)
    assert (code, out) == (2, ""), err
    assert names_flag(line, "cache", flag), line


BAD_COMMAND_FLAGS = [
    ("generate", "--max-new-tokens", ["0", "-1", "x", "1.5", ""]),
    ("generate", "--prefill-chunk", ["0", "-5"]),
    ("profile", "--max-new-tokens", ["0"]),
    ("profile", "--sample-interval", ["0", "-1", "nan", "inf", "1e400", "x"]),
    ("bench", "--context", ["", "0", "-1", "1,,2", "x", "1.5", "9" * 5000]),
    ("bench", "--new-tokens", ["0"]),
    ("bench", "--repeats", ["0", "-2"]),
    ("bench", "--prefill-chunk", ["-1"]),
    ("bench", "--kv-device-fraction", ["0", "nan", "inf", "1.5", "-0.5"]),
    ("bench", "--time-limit", ["0", "nan", "-1"]),
    ("bench", "--methods", ["", ",", "x"]),
    ("bench", "--prefetch-variants", ["x"]),
    ("bench", "--quant-variants", ["x"]),
    ("bench", "--seed", ["-1", str(2**64), "x"]),
    ("bench", "--layers", ["2"]),  # without --model-shape
    ("bench", "--model-shape", ["no-such-shape"]),
]


@pytest.mark.parametrize("command,flag,text", [(c, f, t) for c, f, texts in BAD_COMMAND_FLAGS for t in texts])
def test_bad_command_flags(command: str, flag: str, text: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """The subcommands' own flags: a bad value exits 2 with one line naming the flag, before the model loads."""
    argv = [command, "--prompt", "hi", "--out", str(tmp_path / "out")] if command == "profile" else [command]
    if command == "generate":
        argv += ["--prompt", "hi"]
    if flag != "--model-shape":
        argv += ["--model", str(tmp_path / "no-model")]
    code = main([*argv, f"{flag}={text}"])
    out, err = capsys.readouterr()
    line = error_line(command, err)
    assert (code, out) == (2, ""), err
    assert names_flag(line, command, flag), line
    assert list(tmp_path.iterdir()) == []


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


# The URL checks of tiers/prefix_valkey.py (parse_url) and the timeout check of tiers/prefix.py (check_timeout),
# which the config runs.


def test_prefix_cache_database_of_other_digits() -> None:
    """"²".isdigit() is True, and int("²") raised ValueError without the option's name."""
    with pytest.raises(ValueError) as e:
        OffloadConfig(prefix_cache="redis://h/\u00b2")  # "²".isdigit() is True; int("²") fails
    assert str(e.value).startswith("prefix_cache: ")


def test_prefix_cache_port_zero() -> None:
    """Port 0 was taken as no port, so redis://h:0 connected to 6379."""
    with pytest.raises(ValueError, match="^prefix_cache: "):
        OffloadConfig(prefix_cache="redis://h:0")


def test_prefix_cache_timeout_too_large_for_float() -> None:
    """math.isfinite() of an int too large for a float raised OverflowError."""
    with pytest.raises(ValueError, match="^prefix_cache_timeout: "):
        OffloadConfig(prefix_cache_timeout=10**400)
