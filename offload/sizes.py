"""Byte sizes: parse "512MiB" / "2GB" / 1048576, and format bytes for people."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, name: str) -> int:
    """Returns `value` in bytes; raises ValueError naming `name` when it is not a size.

    Accepts a non-negative int, or a string such as "4096", "512MiB", "1.5GB" (SI and binary units).
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a size in bytes such as 536870912, '512MiB' or '2GB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name}: a size must be >= 0 bytes, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"{name}: expected a size in bytes such as 536870912, '512MiB' or '2GB', got {value!r}")


def format_size(n: int | float) -> str:
    """1536 -> '1.5KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")
