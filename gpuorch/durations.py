"""Durations as people write them: `90`, `90s`, `90m`, `2h`, `1h30m`, `1d`, `HH:MM:SS`, `MM:SS`."""

from __future__ import annotations

import re

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_UNIT_TERMS = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_CLOCK = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2})$")


def parse_duration(text: str) -> int:
    """Whole seconds of `text`; ValueError naming the text and the accepted forms otherwise."""
    value = text.strip().lower()
    if value.isdigit():
        return int(value)
    clock = _CLOCK.match(value)
    if clock:
        hours, minutes, seconds = (int(part or 0) for part in clock.groups())
        if minutes < 60 and seconds < 60:
            return hours * 3600 + minutes * 60 + seconds
    else:
        terms = _UNIT_TERMS.match(value)
        if value and terms:
            return sum(int(n) * unit for n, unit in zip(terms.groups(), _UNITS.values(), strict=True) if n)
    raise ValueError(f"{text!r} is not a duration; use seconds (5400), units (90m, 2h, 1h30m, 45s, 1d) or HH:MM:SS (01:30:00)")
