"""Human durations: ``90s``, ``15m``, ``12h``, ``30d``, ``2w`` (and combinations like ``1d12h``)."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["format_duration", "parse_duration"]

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART: Final = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> int:
    """Parse a duration into whole seconds.

    Raises:
        ValueError: if the text is not one or more ``<number><unit>`` parts (bare numbers are
            seconds).
    """
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    pos, total = 0, 0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r}; use e.g. 90s, 15m, 12h, 30d, 2w")
    return total


def format_duration(seconds: int) -> str:
    """An exact rendering in days, hours, minutes and seconds, e.g. ``2592000`` → ``30d``."""
    if seconds == 0:
        return "0s"
    out = []
    for unit in ("d", "h", "m", "s"):
        n, seconds = divmod(seconds, _UNITS[unit])
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)
