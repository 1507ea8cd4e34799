"""The conntrack entry model: tuples, entries, expectations, status bits.

Plain frozen/slotted dataclasses with addresses as raw bytes (4 or 16 bytes, network order):
they are what the ctnetlink codec produces and consumes, what the caches hand out, and what
the CLI renders. Nothing here touches a socket or the clock.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, replace
from enum import IntEnum, IntFlag
from typing import Any

# Address families as ctnetlink carries them (Linux's AF_INET / AF_INET6).
AF_INET = 2
AF_INET6 = 10

# IP protocol numbers ctsync knows by name.
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_GRE = 47
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

PROTO_NAMES: dict[int, str] = {
    IPPROTO_ICMP: "icmp",
    IPPROTO_TCP: "tcp",
    IPPROTO_UDP: "udp",
    IPPROTO_DCCP: "dccp",
    IPPROTO_GRE: "gre",
    IPPROTO_ICMPV6: "icmpv6",
    IPPROTO_SCTP: "sctp",
    IPPROTO_UDPLITE: "udplite",
}
PROTO_NUMBERS: dict[str, int] = {name: num for num, name in PROTO_NAMES.items()}
PROTO_NUMBERS["icmp6"] = IPPROTO_ICMPV6  # VyOS spells it this way

# Protocols whose tuple carries 16-bit source/destination "ports" (GRE: keys).
PORT_PROTOCOLS = frozenset(
    {IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, IPPROTO_SCTP, IPPROTO_DCCP, IPPROTO_GRE}
)
ICMP_PROTOCOLS = frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6})
# Protocols whose "ports" are real transport ports (printed ip:port; GRE keys are not).
L4_PORT_PROTOCOLS = PORT_PROTOCOLS - {IPPROTO_GRE}


class Status(IntFlag):
    """IPS_* bits of enum ip_conntrack_status (uapi nf_conntrack_common.h)."""

    EXPECTED = 1 << 0
    SEEN_REPLY = 1 << 1
    ASSURED = 1 << 2
    CONFIRMED = 1 << 3
    SRC_NAT = 1 << 4
    DST_NAT = 1 << 5
    SEQ_ADJUST = 1 << 6
    SRC_NAT_DONE = 1 << 7
    DST_NAT_DONE = 1 << 8
    DYING = 1 << 9
    FIXED_TIMEOUT = 1 << 10
    TEMPLATE = 1 << 11
    UNTRACKED = 1 << 12
    HELPER = 1 << 13
    OFFLOAD = 1 << 14
    HW_OFFLOAD = 1 << 15


NAT_MASK = Status.SRC_NAT | Status.DST_NAT


class TcpState(IntEnum):
    """enum tcp_conntrack; names as conntrack(8) prints them."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


class SctpState(IntEnum):
    """enum sctp_conntrack."""

    NONE = 0
    CLOSED = 1
    COOKIE_WAIT = 2
    COOKIE_ECHOED = 3
    ESTABLISHED = 4
    SHUTDOWN_SENT = 5
    SHUTDOWN_RECD = 6
    SHUTDOWN_ACK_SENT = 7
    HEARTBEAT_SENT = 8
    HEARTBEAT_ACKED = 9  # removed from newer kernels; kept so old values still decode


class DccpState(IntEnum):
    """enum ct_dccp_states."""

    NONE = 0
    REQUEST = 1
    RESPOND = 2
    PARTOPEN = 3
    OPEN = 4
    CLOSEREQ = 5
    CLOSING = 6
    TIMEWAIT = 7
    IGNORE = 8
    INVALID = 9


# TCP protoinfo flags (IP_CT_TCP_FLAG_*).
TCP_FLAG_WINDOW_SCALE = 0x01
TCP_FLAG_SACK_PERM = 0x02
TCP_FLAG_CLOSE_INIT = 0x04
TCP_FLAG_BE_LIBERAL = 0x08
TCP_FLAG_DATA_UNACKNOWLEDGED = 0x10
TCP_FLAG_MAXACK_SET = 0x20


@functools.lru_cache(maxsize=1 << 16)
def address_text(raw: bytes) -> str:
    """A packed address as text, remembered: a table repeats the same few addresses, and
    formatting one with ipaddress costs ~1.5 us (four per entry when 100k are listed)."""
    return str(ipaddress.ip_address(raw))


@dataclass(frozen=True, slots=True)
class CtTuple:
    """One direction of a connection, as the kernel keys it.

    ``sport``/``dport`` hold ports for TCP, UDP, UDPLite, SCTP, DCCP and GRE keys; ICMP and
    ICMPv6 use ``icmp_id``/``icmp_type``/``icmp_code`` instead. ``zone`` is the directional
    zone (CTA_TUPLE_ZONE), rarely set.
    """

    family: int
    proto: int
    src: bytes
    dst: bytes
    sport: int = 0
    dport: int = 0
    icmp_id: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    zone: int | None = None

    @property
    def src_text(self) -> str:
        return address_text(self.src)

    @property
    def dst_text(self) -> str:
        return address_text(self.dst)

    def inverted(self) -> CtTuple:
        """The tuple of the other direction without NAT (nf_ct_invert_tuple).

        A directional zone belongs to one direction only: the inverse has none."""
        # The constructor, not dataclasses.replace: 10x cheaper, and every decoded entry
        # without NAT gets its reply tuple this way (listing 100k entries).
        if self.proto in ICMP_PROTOCOLS:
            icmp_type = invert_icmp_type(self.proto, self.icmp_type)
            return CtTuple(self.family, self.proto, self.dst, self.src, self.sport, self.dport,
                           self.icmp_id, icmp_type, self.icmp_code)  # fmt: skip
        return CtTuple(self.family, self.proto, self.dst, self.src, self.dport, self.sport,
                       self.icmp_id, self.icmp_type, self.icmp_code)  # fmt: skip


# ICMP request -> reply types, both ways (nf_conntrack_proto_icmp{,v6}.c invmap).
_ICMP_INVERSE = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17}
_ICMPV6_INVERSE = {128: 129, 129: 128, 139: 140, 140: 139}


def invert_icmp_type(proto: int, icmp_type: int) -> int:
    table = _ICMP_INVERSE if proto == IPPROTO_ICMP else _ICMPV6_INVERSE
    return table.get(icmp_type, icmp_type)


@dataclass(frozen=True, slots=True)
class TcpInfo:
    state: int
    wscale_orig: int | None = None
    wscale_reply: int | None = None
    flags_orig: int | None = None
    mask_orig: int | None = None
    flags_reply: int | None = None
    mask_reply: int | None = None


@dataclass(frozen=True, slots=True)
class SctpInfo:
    state: int
    vtag_orig: int | None = None
    vtag_reply: int | None = None


@dataclass(frozen=True, slots=True)
class DccpInfo:
    state: int
    role: int | None = None
    handshake_seq: int | None = None


ProtoInfo = TcpInfo | SctpInfo | DccpInfo


@dataclass(frozen=True, slots=True)
class Counters:
    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class SeqAdj:
    correction_pos: int
    offset_before: int
    offset_after: int


@dataclass(frozen=True, slots=True)
class NatRange:
    """CTA_NAT_SRC/CTA_NAT_DST: the address (and port) range a NAT binding maps to."""

    min_ip: bytes
    max_ip: bytes
    min_port: int | None = None
    max_port: int | None = None


@dataclass(frozen=True, slots=True)
class Synproxy:
    isn: int
    its: int
    tsoff: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A conntrack entry with every attribute ctnetlink reports or accepts.

    ``None`` means "attribute absent": an UPDATE event carries only some attributes, and
    the cache merges it field by field (:meth:`merged`). ``labels`` is the raw label bitmap
    as the kernel sends it (bit n of the little-endian words = label n).
    """

    orig: CtTuple
    reply: CtTuple | None = None
    status: int | None = None
    timeout: int | None = None
    mark: int | None = None
    mark_mask: int | None = None
    zone: int | None = None
    id: int | None = None
    use: int | None = None
    labels: bytes | None = None
    labels_mask: bytes | None = None
    protoinfo: ProtoInfo | None = None
    helper: str | None = None
    seq_adj_orig: SeqAdj | None = None
    seq_adj_reply: SeqAdj | None = None
    counters_orig: Counters | None = None
    counters_reply: Counters | None = None
    timestamp_start: int | None = None
    timestamp_stop: int | None = None
    timestamp_event: int | None = None
    secctx: str | None = None
    synproxy: Synproxy | None = None
    master: CtTuple | None = None
    nat_src: NatRange | None = None
    nat_dst: NatRange | None = None

    @property
    def family(self) -> int:
        return self.orig.family

    @property
    def proto(self) -> int:
        return self.orig.proto

    def merged(self, update: Entry) -> Entry:
        """This entry with every attribute present in ``update`` taken from it."""
        changes = {
            name: value for name in _ENTRY_FIELDS if (value := getattr(update, name)) is not None
        }
        return replace(self, **changes) if changes else self

    def label_bits(self) -> list[int]:
        return labels_to_bits(self.labels)


_ENTRY_FIELDS = tuple(f for f in Entry.__dataclass_fields__ if f != "orig")


def labels_to_bits(labels: bytes | None) -> list[int]:
    """Label numbers set in a raw label bitmap (little-endian 32-bit words on x86)."""
    if not labels:
        return []
    value = int.from_bytes(labels, "little")
    return [bit for bit in range(len(labels) * 8) if value >> bit & 1]


def bits_to_labels(bits: list[int] | set[int], size: int = 16) -> bytes:
    value = 0
    for bit in bits:
        if not 0 <= bit < size * 8:
            raise ValueError(f"label {bit} out of range 0..{size * 8 - 1}")
        value |= 1 << bit
    return value.to_bytes(size, "little")


@dataclass(frozen=True, slots=True)
class ExpectNat:
    direction: int
    tuple: CtTuple


@dataclass(frozen=True, slots=True)
class Expectation:
    """A conntrack expectation (IPCTNL_MSG_EXP_*), e.g. an FTP data connection."""

    master: CtTuple
    tuple: CtTuple
    mask: CtTuple
    timeout: int | None = None
    id: int | None = None
    helper: str | None = None
    zone: int | None = None
    flags: int | None = None
    klass: int | None = None
    nat: ExpectNat | None = None
    function: str | None = None


_STATUS_BITS: tuple[tuple[int, str], ...] = tuple((int(f), f.name or "") for f in Status)
_status_names_cache: dict[int, tuple[str, ...]] = {}


def status_names(status: int) -> list[str]:
    """The IPS_* names of the bits set in ``status`` (memoised: few distinct values)."""
    names = _status_names_cache.get(status)
    if names is None:
        names = tuple(name for bit, name in _STATUS_BITS if status & bit)
        if len(_status_names_cache) < 4096:
            _status_names_cache[status] = names
    return list(names)


def state_name(entry: Entry) -> str:
    """The protocol state as conntrack(8) names it, or '' when the protocol has none."""
    info = entry.protoinfo
    try:
        if isinstance(info, TcpInfo):
            return TcpState(info.state).name
        if isinstance(info, SctpInfo):
            return SctpState(info.state).name
        if isinstance(info, DccpInfo):
            return DccpState(info.state).name
    except ValueError:
        return str(info.state) if info else ""
    return ""


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


def family_name(family: int) -> str:
    return "ipv4" if family == AF_INET else "ipv6" if family == AF_INET6 else str(family)


def tuple_to_json(t: CtTuple) -> dict[str, Any]:
    out: dict[str, Any] = {"src": t.src_text, "dst": t.dst_text}
    if t.proto in ICMP_PROTOCOLS:
        out.update(icmp_id=t.icmp_id, icmp_type=t.icmp_type, icmp_code=t.icmp_code)
    elif t.proto in PORT_PROTOCOLS:
        out.update(sport=t.sport, dport=t.dport)
    if t.zone is not None:
        out["zone"] = t.zone
    return out


def entry_to_json(entry: Entry) -> dict[str, Any]:
    """Every decoded field as JSON-ready values with snake_case keys."""
    out: dict[str, Any] = {
        "family": family_name(entry.family),
        "protocol": proto_name(entry.proto),
        "protocol_number": entry.proto,
        "original": tuple_to_json(entry.orig),
    }
    if entry.reply is not None:
        out["reply"] = tuple_to_json(entry.reply)
    if entry.status is not None:
        out["status"] = entry.status
        out["status_flags"] = status_names(entry.status)
    for name in ("timeout", "mark", "zone", "id", "use", "helper", "secctx"):
        value = getattr(entry, name)
        if value is not None:
            out[name] = value
    if entry.labels is not None:
        out["labels"] = entry.label_bits()
    info = entry.protoinfo
    if info is not None:
        block: dict[str, Any] = {"state": state_name(entry), "state_number": info.state}
        for key, value in _dataclass_items(info):
            if key != "state" and value is not None:
                block[key] = value
        out[type(info).__name__.removesuffix("Info").lower()] = block
    for name in ("seq_adj_orig", "seq_adj_reply", "counters_orig", "counters_reply", "synproxy"):
        value = getattr(entry, name)
        if value is not None:
            out[name] = dict(_dataclass_items(value))
    for name in ("timestamp_start", "timestamp_stop", "timestamp_event"):
        value = getattr(entry, name)
        if value is not None:
            out[name] = value
    if entry.master is not None:
        out["master"] = tuple_to_json(entry.master)
    return out


def _dataclass_items(obj: Any) -> list[tuple[str, Any]]:
    return [(name, getattr(obj, name)) for name in obj.__dataclass_fields__]


def addr(text: str) -> bytes:
    """Parse an IPv4 or IPv6 address into raw bytes (for tests and config)."""
    return ipaddress.ip_address(text).packed


def make_tuple(
    src: str, dst: str, proto: int, sport: int = 0, dport: int = 0, **kw: Any
) -> CtTuple:
    """Convenience constructor from text addresses (tests, CLI filters)."""
    family = AF_INET6 if ":" in src else AF_INET
    return CtTuple(family, proto, addr(src), addr(dst), sport, dport, **kw)
