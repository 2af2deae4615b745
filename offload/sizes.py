"""Byte sizes: parse "512MiB" / "2GB" / 1048576, and format bytes for people."""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
# The largest file offset (and tensor element count) there is: no memory or disk budget can be larger.
MAX_SIZE = 2**63 - 1


def parse_size(value: int | float | str, name: str) -> int:
    """Returns `value` in bytes; raises ValueError naming `name` when it is not a size.

    Accepts an int from 0 to MAX_SIZE (8 EiB), or a string such as "4096", "512MiB", "1.5GB" (SI and binary
    units; a fraction of a byte is dropped).
    """
    if isinstance(value, float) and value.is_integer():  # False for nan and inf
        size: int | None = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        size = None
        m = _SIZE_RE.match(value) if isinstance(value, str) else None
        if m and m.group(2).lower() in _UNITS:
            number, unit = m.group(1), _UNITS[m.group(2).lower()]
            # Exact, unlike float: a long string of digits neither overflows nor loses its last bytes.
            too_long = len(number.partition(".")[0].lstrip("0")) > len(str(MAX_SIZE))
            size = MAX_SIZE + 1 if too_long else int(Fraction(Decimal(number)) * unit)
    if size is None:
        raise ValueError(f"{name}: expected a size in bytes such as 536870912, '512MiB' or '2GB', got {value!r}")
    if size < 0:
        raise ValueError(f"{name}: a size must be >= 0 bytes, got {value!r}")
    if size > MAX_SIZE:
        raise ValueError(f"{name}: a size must be at most {MAX_SIZE} bytes (8EiB), got {value!r}")
    return size


def format_size(n: int | float) -> str:
    """1536 -> '1.5KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")
