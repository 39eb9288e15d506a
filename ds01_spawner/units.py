"""Durations and sizes as people write them in the policy ('30m', '16G'), and back.

Pure functions: the policy's parsers and every page that shows a limit use
these, so a value reads the same everywhere.
"""

from __future__ import annotations

import re
from typing import Any

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)", re.I)
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
OFF_WORDS = {"none", "off", "never", "unlimited"}


def parse_duration(value: Any) -> float | None:
    """'30m', '1.5h', '2d', '1h30m', '45s' -> seconds; 'none'/null -> no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in OFF_WORDS):
        return None
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration; write it with a unit: 30m, 1.5h, 2d")
    text = value.strip().replace(" ", "")
    if len(text) > 40:  # findall backtracks on a long run of digits; no duration is that long
        raise ValueError(f"{value[:40]!r}... is not a duration; write it like 30m, 1.5h, 2d")
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts).lower() != text.lower():
        raise ValueError(f"{value!r} is not a duration; write it with a unit: 30m, 1.5h, 2d")
    seconds = sum(float(n) * _UNITS[u.lower()] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{value!r} is zero; write none for no limit")
    return seconds


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.I)


def parse_size(value: Any) -> int | None:
    """'512M', '16G', '2GiB', or bytes -> bytes (binary units, as Docker reads them)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in OFF_WORDS):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; write e.g. 512M or 16G")
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a size; write e.g. 512M or 16G")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    seconds = max(0, round(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and (seconds * 10) % size == 0:  # 1.5h, not 1.52h
            return f"{seconds / size:.1f}".removesuffix(".0") + unit
    return f"{seconds}s"


def format_remaining(seconds: float | None) -> str:
    """A time span for people, to the two largest units: "6d 23h", "3h 59m", "45s"."""
    if seconds is None:
        return "none"
    left = max(0, round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
        elif parts:
            parts.append("")  # a zero unit between counts towards the two shown
        if len(parts) == 2:
            break
    return " ".join(p for p in parts if p)


def format_size(size: int | None) -> str:
    if size is None:
        return "none"
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if size >= 1024**power:
            return f"{size / 1024**power:.1f}".rstrip("0").rstrip(".") + unit
    return f"{size}B"
