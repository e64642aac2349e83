"""Parsing of human units on the command line: durations and rates."""

from __future__ import annotations

import re

from appliance.errors import InvalidArgument

_DURATION = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `24h`, `7d` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise InvalidArgument(f"duration {text!r} is not a positive number with an optional s/m/h/d unit")
    return float(match.group(1)) * _DURATION[match.group(2)]


def parse_rate(text: str) -> int:
    """`500M`, `10G`, `1.5g`, `100000` (bits per second; an optional trailing `bps`/`bit/s`) → bits/s."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:bps|bit/s|b/s)?\s*", text.lower())
    if not match:
        raise InvalidArgument(f"rate {text!r} is not a number of bits per second like 500M or 10G")
    return int(float(match.group(1)) * _RATE[match.group(2)])
