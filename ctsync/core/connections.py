"""The connection list behind ``ctsync connections``: rates, sorting, JSON. Pure.

A :class:`Connection` is a kernel entry plus what the listing derives from it: RouterOS flag
letters, RouterOS durations, and (with an interval) per-connection rates computed from two
dumps. The CLI fetches the dumps and the clock readings and renders; everything that can be
wrong in between is here, testable without a kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ctsync.core.entry import (
    AF_INET6,
    ICMP_PROTOCOLS,
    L4_PORT_PROTOCOLS,
    CtTuple,
    Entry,
    TcpInfo,
    entry_to_json,
    proto_name,
    state_name,
)
from ctsync.core.routeros import FLAGS, flag_letters, flag_names, format_duration

SCHEMA = "ctsync.connections/v1"


@dataclass(frozen=True, slots=True)
class Rate:
    """Per-second rates of one connection over the sampling interval."""

    orig_bytes: float
    orig_packets: float
    reply_bytes: float
    reply_packets: float

    @property
    def bytes(self) -> float:
        return self.orig_bytes + self.reply_bytes

    @property
    def packets(self) -> float:
        return self.orig_packets + self.reply_packets


@dataclass(frozen=True, slots=True)
class Connection:
    entry: Entry
    rate: Rate | None = None


def connection_key(entry: Entry) -> tuple[CtTuple, int]:
    """What identifies a connection across two dumps: its original tuple and zone."""
    return entry.orig, entry.zone or 0


def compute_rates(
    before: Iterable[Entry], after: Sequence[Entry], seconds: float
) -> list[Connection]:
    """The entries of the second dump with their rates between the two dumps.

    Entries are matched by original tuple and zone; when both dumps carry an id and the ids
    differ, the tuple was reused by a new connection, which is treated as new. A new
    connection started after the first dump, so its whole counters fall in the interval.
    Entries without counters (accounting off when they were created) get no rate.
    """
    if seconds <= 0:
        raise ValueError(f"interval must be positive, got {seconds}")
    previous = {connection_key(e): e for e in before}
    out = []
    for entry in after:
        if entry.counters_orig is None or entry.counters_reply is None:
            out.append(Connection(entry))
            continue
        old = previous.get(connection_key(entry))
        if old is not None and old.id is not None and entry.id is not None and old.id != entry.id:
            old = None
        ob = op = rb = rp = 0
        if old is not None and old.counters_orig is not None and old.counters_reply is not None:
            ob, op = old.counters_orig.bytes, old.counters_orig.packets
            rb, rp = old.counters_reply.bytes, old.counters_reply.packets
        rate = Rate(
            orig_bytes=max(entry.counters_orig.bytes - ob, 0) / seconds,
            orig_packets=max(entry.counters_orig.packets - op, 0) / seconds,
            reply_bytes=max(entry.counters_reply.bytes - rb, 0) / seconds,
            reply_packets=max(entry.counters_reply.packets - rp, 0) / seconds,
        )
        out.append(Connection(entry, rate))
    return out


# --- derived fields ------------------------------------------------------------------------


def endpoint(t: CtTuple, source: bool) -> str:
    """``192.0.2.1:443``, ``[2001:db8::1]:443``, or the bare address for portless protocols."""
    address = t.src_text if source else t.dst_text
    if t.proto not in L4_PORT_PROTOCOLS:
        return address
    port = t.sport if source else t.dport
    return f"[{address}]:{port}" if t.family == AF_INET6 else f"{address}:{port}"


def tcp_state(entry: Entry) -> str:
    """The TCP state as RouterOS prints it (``established``, ``time-wait``), '' for non-TCP."""
    if not isinstance(entry.protoinfo, TcpInfo):
        return ""
    return state_name(entry).lower().replace("_", "-")


def _bytes(entry: Entry) -> int:
    return sum(c.bytes for c in (entry.counters_orig, entry.counters_reply) if c is not None)


def _packets(entry: Entry) -> int:
    return sum(c.packets for c in (entry.counters_orig, entry.counters_reply) if c is not None)


def has_counters(entry: Entry) -> bool:
    return entry.counters_orig is not None or entry.counters_reply is not None


# --- sorting --------------------------------------------------------------------------------

SortKey = Callable[[Connection], Any]


def _addr_key(source: bool) -> SortKey:
    def key(c: Connection) -> Any:
        t = c.entry.orig
        if source:
            return (t.family, t.src, t.sport if t.proto not in ICMP_PROTOCOLS else 0)
        return (t.family, t.dst, t.dport if t.proto not in ICMP_PROTOCOLS else 0)

    return key


def _rate(getter: Callable[[Rate], float]) -> SortKey:
    return lambda c: getter(c.rate) if c.rate is not None else -1.0


def _counter(direction: str, field: str) -> SortKey:
    def key(c: Connection) -> int:
        counters = getattr(c.entry, f"counters_{direction}")
        return -1 if counters is None else int(getattr(counters, field))

    return key


# name -> (key, biggest first?). Volumes and rates list the top talkers first; everything
# else ascends (timeout: the connections that expire soonest first).
SORT_KEYS: dict[str, tuple[SortKey, bool]] = {
    "id": (lambda c: c.entry.id or 0, False),
    "protocol": (lambda c: proto_name(c.entry.proto), False),
    "src": (_addr_key(True), False),
    "dst": (_addr_key(False), False),
    "sport": (lambda c: c.entry.orig.sport, False),
    "dport": (lambda c: c.entry.orig.dport, False),
    "state": (lambda c: tcp_state(c.entry), False),
    "timeout": (lambda c: c.entry.timeout if c.entry.timeout is not None else -1, False),
    "mark": (lambda c: c.entry.mark or 0, False),
    "zone": (lambda c: c.entry.zone or 0, False),
    "bytes": (lambda c: _bytes(c.entry), True),
    "packets": (lambda c: _packets(c.entry), True),
    "orig-bytes": (_counter("orig", "bytes"), True),
    "repl-bytes": (_counter("reply", "bytes"), True),
    "orig-packets": (_counter("orig", "packets"), True),
    "repl-packets": (_counter("reply", "packets"), True),
    "rate": (_rate(lambda r: r.bytes), True),
    "orig-rate": (_rate(lambda r: r.orig_bytes), True),
    "repl-rate": (_rate(lambda r: r.reply_bytes), True),
    "packet-rate": (_rate(lambda r: r.packets), True),
}
RATE_SORT_KEYS = frozenset({"rate", "orig-rate", "repl-rate", "packet-rate"})


def sort_connections(
    connections: Iterable[Connection], key: str, *, reverse: bool = False
) -> list[Connection]:
    """Sorted by a :data:`SORT_KEYS` name; ``reverse`` flips the key's natural order.

    Ties keep a deterministic order: by source, then destination.
    """
    try:
        func, descending = SORT_KEYS[key]
    except KeyError:
        raise ValueError(f"unknown sort key {key!r} (use one of: {', '.join(SORT_KEYS)})") from None
    src_key, dst_key = _addr_key(True), _addr_key(False)
    ordered = sorted(connections, key=lambda c: (src_key(c), dst_key(c)))
    return sorted(ordered, key=func, reverse=descending != reverse)


# --- JSON -----------------------------------------------------------------------------------


def connection_to_json(conn: Connection) -> dict[str, Any]:
    """Every decoded field (:func:`entry_to_json`) plus the listing's derived ones.

    Numbers stay numbers (``timeout`` in seconds, ``connection_mark`` an integer); the
    formatted duration is an extra ``timeout_text``. Each RouterOS flag is a boolean under
    its property name (``seen_reply``, ``srcnat``, ...), and ``flags`` holds the letters.
    """
    entry = conn.entry
    out = entry_to_json(entry)
    out["flags"] = flag_letters(entry)
    names = set(flag_names(entry))
    for flag in FLAGS:
        out[flag.name.replace("-", "_")] = flag.name in names
    out["src_address"] = endpoint(entry.orig, True)
    out["dst_address"] = endpoint(entry.orig, False)
    if entry.reply is not None:
        out["reply_src_address"] = endpoint(entry.reply, True)
        out["reply_dst_address"] = endpoint(entry.reply, False)
    out["connection_mark"] = entry.mark or 0
    if entry.timeout is not None:
        out["timeout_text"] = format_duration(entry.timeout)
    state = tcp_state(entry)
    if state:
        out["tcp_state"] = state
    if entry.counters_orig is not None:
        out["orig_bytes"] = entry.counters_orig.bytes
        out["orig_packets"] = entry.counters_orig.packets
    if entry.counters_reply is not None:
        out["repl_bytes"] = entry.counters_reply.bytes
        out["repl_packets"] = entry.counters_reply.packets
    if conn.rate is not None:
        out["orig_rate"] = round(conn.rate.orig_bytes, 3)
        out["orig_packet_rate"] = round(conn.rate.orig_packets, 3)
        out["repl_rate"] = round(conn.rate.reply_bytes, 3)
        out["repl_packet_rate"] = round(conn.rate.reply_packets, 3)
    return out
