"""RouterOS conventions ctsync reuses: connection flag letters and durations.

MikroTik's ``/ip firewall connection print`` shows the status of a connection as one letter
per property (``S`` seen-reply, ``A`` assured, ...) and every time span as ``4d23h59m58s``.
Operators who run both RouterOS and Linux firewalls read these at a glance, so ``ctsync
connections`` and ``ctsync tracking`` print them the same way. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ctsync.core.entry import Entry, Status
from ctsync.core.select import nat_status

# --- flags ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flag:
    letter: str
    name: str  # RouterOS property name (also the JSON key, with '_' for '-')
    bits: int  # any of these IPS_* bits sets the flag


# Display order: RouterOS's legend order. F covers both offload kinds (a software flowtable
# is Linux's fasttrack); H additionally tells hardware offload apart, as RouterOS does.
FLAGS: tuple[Flag, ...] = (
    Flag("E", "expected", int(Status.EXPECTED)),
    Flag("S", "seen-reply", int(Status.SEEN_REPLY)),
    Flag("A", "assured", int(Status.ASSURED)),
    Flag("C", "confirmed", int(Status.CONFIRMED)),
    Flag("D", "dying", int(Status.DYING)),
    Flag("F", "fasttrack", int(Status.OFFLOAD | Status.HW_OFFLOAD)),
    Flag("H", "hw-offload", int(Status.HW_OFFLOAD)),
    Flag("s", "srcnat", int(Status.SRC_NAT)),
    Flag("d", "dstnat", int(Status.DST_NAT)),
)

FLAGS_LEGEND = "Flags: " + "; ".join(f"{f.letter} - {f.name.upper()}" for f in FLAGS)


def flag_names(entry: Entry) -> list[str]:
    """RouterOS property names of the flags set on ``entry``, in legend order."""
    status = (entry.status or 0) & ~int(Status.SRC_NAT | Status.DST_NAT) | nat_status(entry)
    return [f.name for f in FLAGS if status & f.bits]


def flag_letters(entry: Entry, *, padded: bool = False) -> str:
    """The flag letters, e.g. ``SAC s`` padded to fixed positions or ``SACs`` compact.

    Padded, every letter keeps its column (a blank where the flag is clear), so a column of
    rows can be scanned for one flag; trailing blanks are kept for alignment.
    """
    names = set(flag_names(entry))
    if padded:
        return "".join(f.letter if f.name in names else " " for f in FLAGS)
    return "".join(f.letter for f in FLAGS if f.name in names)


# --- durations ------------------------------------------------------------------------------

_UNITS: tuple[tuple[str, int], ...] = (
    ("w", 7 * 86400),
    ("d", 86400),
    ("h", 3600),
    ("m", 60),
    ("s", 1),
)
_UNIT_SECONDS = dict(_UNITS)
_PART = re.compile(r"(\d+)([wdhms])")
_CLOCK = re.compile(r"(\d+):(\d{1,2}):(\d{1,2})")


def format_duration(seconds: int) -> str:
    """``432000`` -> ``5d``, ``431998`` -> ``4d23h59m58s``, ``0`` -> ``0s`` (RouterOS v7)."""
    if seconds < 0:
        raise ValueError(f"negative duration {seconds}")
    if seconds == 0:
        return "0s"
    out = []
    for unit, size in _UNITS:
        value, seconds = divmod(seconds, size)
        if value:
            out.append(f"{value}{unit}")
    return "".join(out)


def parse_duration(text: str) -> int:
    """Seconds from a RouterOS duration: ``1d2h3m4s``, ``10s``, ``1w``, ``30`` (plain seconds),
    ``00:05:00`` or ``1d00:05:00``; units in descending order, each at most once."""
    value = text.strip().lower().replace(" ", "")
    if not value:
        raise ValueError("empty duration")
    if value.isdigit():
        return int(value)
    clock = 0
    if ":" in value:
        prefix_end = max(value.rfind(u) for u in "wd") + 1
        match = _CLOCK.fullmatch(value[prefix_end:])
        if match is None:
            raise ValueError(f"{text!r} is not a duration (e.g. 1d2h3m4s, 30s, 00:05:00)")
        hours, minutes, secs = (int(g) for g in match.groups())
        if minutes > 59 or secs > 59:
            raise ValueError(f"{text!r}: minutes and seconds must be 0-59")
        clock = hours * 3600 + minutes * 60 + secs
        value = value[:prefix_end]
        if not value:
            return clock
    pos = 0
    total = 0
    seen: list[str] = []
    for match in _PART.finditer(value):
        if match.start() != pos:
            break
        unit = match.group(2)
        if seen and _order(unit) <= _order(seen[-1]):
            raise ValueError(f"{text!r}: units must be in the order w, d, h, m, s, once each")
        seen.append(unit)
        total += int(match.group(1)) * _UNIT_SECONDS[unit]
        pos = match.end()
    if pos != len(value) or not seen:
        raise ValueError(f"{text!r} is not a duration (e.g. 1d2h3m4s, 30s, 00:05:00)")
    if clock and seen[-1] not in {"w", "d"}:
        raise ValueError(f"{text!r} is not a duration (e.g. 1d2h3m4s, 30s, 00:05:00)")
    return total + clock


def _order(unit: str) -> int:
    return "wdhms".index(unit)


# --- rates and counts -----------------------------------------------------------------------


def format_quantity(value: float, unit: str = "") -> str:
    """``1234567`` -> ``1.2M``; SI prefixes, one decimal under 100 of a prefix (RouterOS)."""
    if value < 0:
        raise ValueError(f"negative quantity {value}")
    for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            scaled = value / size
            text = f"{scaled:.1f}" if scaled < 100 else f"{scaled:.0f}"
            return f"{text}{prefix}{unit}"
    text = f"{value:.0f}" if value == int(value) or value >= 100 else f"{value:.1f}"
    return f"{text}{unit}"
