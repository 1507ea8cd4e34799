"""conntrack(8)-style entry selection for ``ctsync show ...``: parsing and a pure predicate.

Used by the CLI for the live table and by the agent for its caches.

The flags and their meaning follow ``conntrack -L``: every filter applies to the *original*
direction, all given filters must match (AND), and ``--mark MARK/MASK`` matches when
``entry.mark & MASK == MARK`` (so a MARK with bits outside MASK matches nothing, as in
conntrack). ``reply_src``/``reply_dst`` are conntrack's ``-r``/``-q`` (the reply direction);
``nat`` selects by address translation: ``any`` (conntrack ``-j``), ``src`` (``-n``), ``dst``
(``-g``) or ``none`` (no translation at all). Where the kernel leaves an attribute out of a
dump because it holds the default value, the default is used: no mark is mark 0, no zone is
zone 0.

The parsers raise :class:`ValueError` with a message fit for a usage error; the CLI turns
it into exit status 2.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ctsync.core.entry import (
    AF_INET,
    L4_PORT_PROTOCOLS,
    PROTO_NUMBERS,
    DccpState,
    Entry,
    SctpState,
    Status,
    TcpState,
    state_name,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

U32_MAX = 0xFFFFFFFF
U16_MAX = 0xFFFF

# State names --state accepts: conntrack's TCP names plus the SCTP and DCCP ones ctsync
# knows. LISTEN is conntrack's historical name for SYN_SENT2 (Linux >= 2.6.31).
STATE_NAMES = frozenset(
    {s.name for s in TcpState} | {s.name for s in SctpState} | {s.name for s in DccpState}
)
_STATE_ALIASES = {"LISTEN": "SYN_SENT2"}

# --nat values: which translation an entry must have.
NAT_KINDS = ("any", "src", "dst", "none")
_FILTER_KEYS = (
    "proto",
    "src",
    "dst",
    "sport",
    "dport",
    "zone",
    "state",
    "reply_src",
    "reply_dst",
    "nat",
)


def parse_proto(text: str) -> int:
    """A protocol name (tcp, udp, icmp, icmpv6/icmp6, ...) or number 0-255."""
    value = text.strip().lower()
    if value in PROTO_NUMBERS:
        return PROTO_NUMBERS[value]
    try:
        number = int(value, 10)
    except ValueError:
        known = ", ".join(sorted(PROTO_NUMBERS))
        raise ValueError(f"unknown protocol {text!r} (use a number or one of: {known})") from None
    if not 0 <= number <= 255:
        raise ValueError(f"protocol number {number} out of range 0-255")
    return number


def parse_network(text: str) -> IPNetwork:
    """``ADDR`` or ``ADDR/PREFIX``; host bits are allowed (``192.0.2.7/24`` = 192.0.2.0/24)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4/IPv6 address or ADDR/PREFIX") from None


def parse_port(text: str) -> int:
    try:
        port = int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    if not 0 <= port <= U16_MAX:
        raise ValueError(f"port {port} out of range 0-65535")
    return port


def _parse_u32(text: str, what: str) -> int:
    try:
        value = int(text.strip(), 0)  # decimal, 0x hex, 0o octal (conntrack uses strtoul base 0)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None
    if not 0 <= value <= U32_MAX:
        raise ValueError(f"{what} {text!r} out of range 0-{U32_MAX:#x}")
    return value


def parse_mark(text: str) -> tuple[int, int]:
    """``MARK`` or ``MARK/MASK`` (decimal or 0x-hex) as ``(mark, mask)``."""
    mark_text, sep, mask_text = text.partition("/")
    mark = _parse_u32(mark_text, "mark")
    mask = _parse_u32(mask_text, "mask") if sep else U32_MAX
    return mark, mask


def parse_zone(text: str) -> int:
    try:
        zone = int(text.strip(), 0)
    except ValueError:
        raise ValueError(f"zone {text!r} is not a number") from None
    if not 0 <= zone <= U16_MAX:
        raise ValueError(f"zone {zone} out of range 0-65535")
    return zone


def parse_state(text: str) -> str:
    """A TCP (or SCTP/DCCP) state name, case-insensitive, as :func:`state_name` spells it."""
    name = text.strip().upper().replace("-", "_")
    name = _STATE_ALIASES.get(name, name)
    if name not in STATE_NAMES:
        known = ", ".join(TcpState.__members__)
        raise ValueError(f"unknown state {text!r} (TCP states: {known})")
    return name


def parse_nat(text: str) -> str:
    """One of :data:`NAT_KINDS` (``any``, ``src``, ``dst``, ``none``)."""
    value = text.strip().lower()
    if value not in NAT_KINDS:
        raise ValueError(f"unknown NAT kind {text!r} (use one of: {', '.join(NAT_KINDS)})")
    return value


def nat_status(entry: Entry) -> int:
    """IPS_SRC_NAT/IPS_DST_NAT of an entry; without a status, from the tuples (the kernel
    sets these bits exactly when NAT changed the reply tuple)."""
    if entry.status is not None:
        return entry.status & int(Status.SRC_NAT | Status.DST_NAT)
    reply = entry.reply
    if reply is None:
        return 0
    orig = entry.orig
    bits = 0
    if reply.dst != orig.src or reply.dport != orig.sport:
        bits |= int(Status.SRC_NAT)
    if reply.src != orig.dst or reply.sport != orig.dport:
        bits |= int(Status.DST_NAT)
    return bits


def _nat_matches(kind: str, entry: Entry) -> bool:
    bits = nat_status(entry)
    if kind == "any":
        return bits != 0
    if kind == "none":
        return bits == 0
    if kind == "src":
        return bool(bits & Status.SRC_NAT)
    return bool(bits & Status.DST_NAT)


@dataclass(frozen=True, slots=True)
class EntryFilter:
    """The conjunction of conntrack(8)-style filters; ``None`` means "any"."""

    proto: int | None = None
    src: IPNetwork | None = None
    dst: IPNetwork | None = None
    sport: int | None = None
    dport: int | None = None
    mark: int | None = None
    mark_mask: int = U32_MAX
    zone: int | None = None
    state: str | None = None
    reply_src: IPNetwork | None = None
    reply_dst: IPNetwork | None = None
    nat: str | None = None

    def matches(self, entry: Entry) -> bool:
        orig = entry.orig
        if self.proto is not None and orig.proto != self.proto:
            return False
        if (self.sport is not None or self.dport is not None) and (
            orig.proto not in L4_PORT_PROTOCOLS
        ):
            return False
        if self.sport is not None and orig.sport != self.sport:
            return False
        if self.dport is not None and orig.dport != self.dport:
            return False
        if self.src is not None and not in_network(orig.family, orig.src, self.src):
            return False
        if self.dst is not None and not in_network(orig.family, orig.dst, self.dst):
            return False
        if self.mark is not None and ((entry.mark or 0) & self.mark_mask) != self.mark:
            return False
        if self.zone is not None and (entry.zone or 0) != self.zone:
            return False
        if self.reply_src is not None or self.reply_dst is not None:
            reply = entry.reply
            if reply is None:
                return False
            if self.reply_src is not None and not in_network(
                reply.family, reply.src, self.reply_src
            ):
                return False
            if self.reply_dst is not None and not in_network(
                reply.family, reply.dst, self.reply_dst
            ):
                return False
        if self.nat is not None and not _nat_matches(self.nat, entry):
            return False
        return self.state is None or state_name(entry) == self.state

    def __call__(self, entry: Entry) -> bool:
        return self.matches(entry)

    def to_args(self) -> dict[str, str]:
        """The filter as plain strings (for the control socket); see :meth:`from_args`."""
        out: dict[str, str] = {}
        for name in _FILTER_KEYS:
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value)
        if self.mark is not None:
            out["mark"] = f"{self.mark:#x}/{self.mark_mask:#x}"
        return out

    @classmethod
    def from_args(cls, args: dict[str, str]) -> EntryFilter:
        """Parse :meth:`to_args` output (or user input); raises ValueError on bad values."""
        unknown = set(args) - {*_FILTER_KEYS, "mark"}
        if unknown:
            raise ValueError(f"unknown filter(s): {', '.join(sorted(unknown))}")
        mark, mask = parse_mark(args["mark"]) if "mark" in args else (None, U32_MAX)
        return cls(
            proto=parse_proto(args["proto"]) if "proto" in args else None,
            src=parse_network(args["src"]) if "src" in args else None,
            dst=parse_network(args["dst"]) if "dst" in args else None,
            sport=parse_port(args["sport"]) if "sport" in args else None,
            dport=parse_port(args["dport"]) if "dport" in args else None,
            mark=mark,
            mark_mask=mask,
            zone=parse_zone(args["zone"]) if "zone" in args else None,
            state=parse_state(args["state"]) if "state" in args else None,
            reply_src=parse_network(args["reply_src"]) if "reply_src" in args else None,
            reply_dst=parse_network(args["reply_dst"]) if "reply_dst" in args else None,
            nat=parse_nat(args["nat"]) if "nat" in args else None,
        )

    @property
    def is_empty(self) -> bool:
        return self == EntryFilter()


def in_network(family: int, raw: bytes, network: IPNetwork) -> bool:
    """Whether a packed address of ``family`` lies in ``network`` (other family: no)."""
    if (network.version == 4) != (family == AF_INET):
        return False
    netmask = int(network.netmask)
    return int.from_bytes(raw, "big") & netmask == int(network.network_address)
