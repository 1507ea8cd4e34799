"""Pure renderers for ``ctsync show ...``: data in, text out, no I/O.

They are kept apart from the click commands so that golden-text tests pin the exact layout
operators and scripts depend on, without a kernel or a terminal.

``show conntrack table`` reproduces VyOS's ``show conntrack table ipv4|ipv6``
(``src/op_mode/conntrack.py``), which renders ``conntrack --dump --output xml`` through
``tabulate(rows, headers, numalign="left")``. The details follow from that pipeline:

- an address gets ``:port`` only when conntrack's XML carries ``<sport>``/``<dport>``, i.e.
  for TCP, UDP, UDPLite, SCTP and DCCP; ICMP, ICMPv6 and GRE (whose keys VyOS ignores) print
  the bare address;
- IPv6 addresses are printed exactly as VyOS does, ``2001:db8::1:443`` without brackets
  (ambiguous to a human, but identical to the output operators and scripts already parse);
- ``Timeout`` is ``n/a`` for a flowtable-offloaded entry (VyOS T6138) or when the kernel sent
  no timeout; a missing id, mark or zone prints as an empty cell;
- an empty table prints ``Entries not found``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ctsync.core.entry import (
    L4_PORT_PROTOCOLS,
    CtTuple,
    Entry,
    Status,
    entry_to_json,
    proto_name,
    state_name,
)

# Protocols whose addresses are shown (and filtered) with ports: the ones conntrack's XML
# output gives <sport>/<dport> for (libnetfilter_conntrack __snprintf_proto_xml).
SHOWN_PORT_PROTOCOLS = L4_PORT_PROTOCOLS

CONNTRACK_TABLE_HEADERS = (
    "Id",
    "Original src",
    "Original dst",
    "Reply src",
    "Reply dst",
    "Protocol",
    "State",
    "Timeout",
    "Mark",
    "Zone",
)

NO_ENTRIES = "Entries not found"

Cell = str | int


def format_endpoint(address: str, port: int | None) -> str:
    """``ip:port`` when there is a port, the bare address otherwise (VyOS style, no brackets)."""
    return address if port is None else f"{address}:{port}"


def _source(t: CtTuple) -> str:
    return format_endpoint(t.src_text, t.sport if t.proto in SHOWN_PORT_PROTOCOLS else None)


def _destination(t: CtTuple) -> str:
    return format_endpoint(t.dst_text, t.dport if t.proto in SHOWN_PORT_PROTOCOLS else None)


def _optional(value: int | None) -> Cell:
    return "" if value is None else value


def is_offloaded(entry: Entry) -> bool:
    return entry.status is not None and bool(entry.status & (Status.OFFLOAD | Status.HW_OFFLOAD))


def conntrack_row(entry: Entry) -> list[Cell]:
    """One row of ``show conntrack table``, in :data:`CONNTRACK_TABLE_HEADERS` order."""
    reply = entry.reply
    timeout: Cell = "n/a" if is_offloaded(entry) or entry.timeout is None else entry.timeout
    return [
        _optional(entry.id),
        _source(entry.orig),
        _destination(entry.orig),
        _source(reply) if reply is not None else "",
        _destination(reply) if reply is not None else "",
        proto_name(entry.proto),
        state_name(entry),
        timeout,
        _optional(entry.mark),
        _optional(entry.zone),
    ]


def render_conntrack_table(entries: Sequence[Entry]) -> str:
    """VyOS's ``show conntrack table`` layout; rows in the order given (the caller sorts)."""
    from tabulate import tabulate  # imported here: it costs ~40 ms of CLI start-up

    if not entries:
        return NO_ENTRIES
    rows = [conntrack_row(entry) for entry in entries]
    return tabulate(rows, headers=list(CONNTRACK_TABLE_HEADERS), tablefmt="simple", numalign="left")


def render_conntrack_json(entries: Sequence[Entry]) -> str:
    """A JSON array with one object per entry, from :func:`ctsync.core.entry.entry_to_json`.

    Keys are snake_case and appear in a fixed order (the one ``entry_to_json`` builds), values
    are numbers, strings, lists and objects, never pre-formatted columns. An absent attribute
    is an absent key, not ``null``. Indented by 2 so a human can read it too; an empty table
    is ``[]``.
    """
    return json.dumps([entry_to_json(entry) for entry in entries], indent=2)
