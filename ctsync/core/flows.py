"""Flow discovery: distinct flows from conntrack entries, prefix covers, nftables drafts.

``ctsync flows`` watches the conntrack table for a while and reports what the firewall
really carries, so that rules can be written from facts. This module is the pure part:

- :class:`FlowCollector` folds connections (entries from a dump or events, identified by
  their record key) into :class:`FlowKey` counters: original direction (before NAT), client
  ports above ``collapse_above`` collapsed into one range, ICMP by type/code, the DNAT target
  kept apart (it is what the forward hook sees), SNAT noted;
- :func:`summarize` sorts the flows, classifies each by the hook that filters it (input,
  forward, output; from the local addresses given) and groups them by destination service,
  with the sources aggregated into prefixes (:func:`cover_prefixes`: exact, or at most N
  prefixes with the fewest addresses added);
- :func:`render_text`, :func:`summary_to_json` and :func:`render_nft` write it out; the
  nftables draft allows exactly the observed services and drops the rest.

No I/O, no clock: the caller passes how long it watched (:class:`ObservationInfo`).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ctsync.core.entry import (
    AF_INET,
    ICMP_PROTOCOLS,
    IPPROTO_DCCP,
    IPPROTO_ICMP,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    L4_PORT_PROTOCOLS,
    Entry,
    Status,
    family_name,
    proto_name,
)
from ctsync.core.select import in_network

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Source ports above this are "unprivileged" client ports, collapsed to one range.
DEFAULT_COLLAPSE_ABOVE: Final = 1024
PORT_MAX: Final = 65535

HOOKS: Final = ("input", "forward", "output", "local")
"""Where a flow is filtered: to this host, through it, from it, or host to itself."""

_SEEN_REPLY: Final = int(Status.SEEN_REPLY)
_ASSURED: Final = int(Status.ASSURED)


# --------------------------------------------------------------------------- flow keys


@dataclass(frozen=True, slots=True)
class PortRange:
    """A port or an inclusive range of ports (collapsed client ports)."""

    low: int
    high: int

    @property
    def text(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True, slots=True)
class FlowKey:
    """One distinct flow, in the original direction (as the client sent it, before NAT).

    ``sport``/``dport`` are set for protocols with transport ports, ``icmp_type``/
    ``icmp_code`` for ICMP and ICMPv6; other protocols have neither. ``dnat_dst``/
    ``dnat_dport`` hold where DNAT sent the flow (None: not DNATed): the forward and input
    hooks see that destination, so two targets of one address are two flows.
    """

    family: int
    proto: int
    src: bytes
    dst: bytes
    sport: PortRange | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    zone: int = 0
    dnat_dst: bytes | None = None
    dnat_dport: int | None = None

    @property
    def filter_dst(self) -> bytes:
        """The destination address the filter hooks see (after DNAT)."""
        return self.dst if self.dnat_dst is None else self.dnat_dst

    @property
    def filter_dport(self) -> int | None:
        return self.dport if self.dnat_dst is None else self.dnat_dport


@dataclass(frozen=True, slots=True)
class Flow:
    """A flow with what was seen of it: connections, how many got replies, SNAT."""

    key: FlowKey
    connections: int
    replied: int  # connections that saw a reply (IPS_SEEN_REPLY)
    assured: int  # connections the kernel marked ASSURED
    snat: tuple[bytes, ...] = ()  # addresses the source was translated to

    @property
    def both_directions(self) -> bool:
        """Confirmed in both directions: at least one connection saw a reply."""
        return self.replied > 0


def collapse_port(port: int, above: int | None) -> PortRange:
    """``port`` as a range: client ports above ``above`` become one ``above+1-65535``."""
    if above is not None and port > above:
        return PortRange(above + 1, PORT_MAX)
    return PortRange(port, port)


def flow_key(entry: Entry, collapse_above: int | None = DEFAULT_COLLAPSE_ABOVE) -> FlowKey:
    """The flow an entry belongs to (see :class:`FlowKey`)."""
    orig = entry.orig
    reply = entry.reply
    zone = entry.zone or 0
    proto = orig.proto
    dnat_dst: bytes | None = None
    dnat_dport: int | None = None
    if proto in ICMP_PROTOCOLS:
        if reply is not None and reply.src != orig.dst:
            dnat_dst = reply.src
        return FlowKey(
            orig.family,
            proto,
            orig.src,
            orig.dst,
            icmp_type=orig.icmp_type,
            icmp_code=orig.icmp_code,
            zone=zone,
            dnat_dst=dnat_dst,
        )
    if proto in L4_PORT_PROTOCOLS:
        if reply is not None and (reply.src != orig.dst or reply.sport != orig.dport):
            dnat_dst, dnat_dport = reply.src, reply.sport
        return FlowKey(
            orig.family,
            proto,
            orig.src,
            orig.dst,
            sport=collapse_port(orig.sport, collapse_above),
            dport=orig.dport,
            zone=zone,
            dnat_dst=dnat_dst,
            dnat_dport=dnat_dport,
        )
    if reply is not None and reply.src != orig.dst:
        dnat_dst = reply.src
    return FlowKey(orig.family, proto, orig.src, orig.dst, zone=zone, dnat_dst=dnat_dst)


def snat_address(entry: Entry) -> bytes | None:
    """The address SNAT/masquerade gave the source, or None (no reply tuple, or no SNAT)."""
    reply = entry.reply
    if reply is None or reply.dst == entry.orig.src:
        return None
    return reply.dst


# --------------------------------------------------------------------------- filter


def _in_any(family: int, address: bytes, networks: Sequence[IPNetwork]) -> bool:
    return any(in_network(family, address, net) for net in networks)


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Which connections to observe; every given criterion must hold, an empty one is "any".

    Addresses apply to the original direction, as conntrack(8)'s filters do; a connection
    with an address in ``exclude`` (source or destination) is left out. Checked once per
    connection, at its first sight.
    """

    families: frozenset[int] = frozenset()
    protos: frozenset[int] = frozenset()
    src: tuple[IPNetwork, ...] = ()
    dst: tuple[IPNetwork, ...] = ()
    dports: frozenset[int] = frozenset()
    zone: int | None = None
    mark: int | None = None
    mark_mask: int = 0xFFFFFFFF
    exclude: tuple[IPNetwork, ...] = ()

    def matches(self, entry: Entry) -> bool:
        orig = entry.orig
        if self.families and orig.family not in self.families:
            return False
        if self.protos and orig.proto not in self.protos:
            return False
        if self.dports and (orig.proto not in L4_PORT_PROTOCOLS or orig.dport not in self.dports):
            return False
        if self.zone is not None and (entry.zone or 0) != self.zone:
            return False
        if self.mark is not None and ((entry.mark or 0) & self.mark_mask) != self.mark:
            return False
        if self.src and not _in_any(orig.family, orig.src, self.src):
            return False
        if self.dst and not _in_any(orig.family, orig.dst, self.dst):
            return False
        return not (
            self.exclude
            and (
                _in_any(orig.family, orig.src, self.exclude)
                or _in_any(orig.family, orig.dst, self.exclude)
            )
        )


# --------------------------------------------------------------------------- collector


@dataclass(slots=True)
class _FlowStats:
    connections: int = 0
    replied: int = 0
    assured: int = 0
    snat: set[bytes] = field(default_factory=set)


@dataclass(slots=True)
class _Conn:
    stats: _FlowStats
    replied: bool = False
    assured: bool = False


class FlowCollector:
    """Counts connections per flow from entries seen in a dump or in events.

    A connection is identified by an opaque id (the record key: original tuple and zone);
    it counts once while it lives, and again if the same tuple is used by a new connection
    after a destroy. Whether it saw a reply or became assured is taken from every status
    it reports, so a connection first seen unreplied is confirmed by a later update.
    """

    def __init__(
        self,
        *,
        accept: Callable[[Entry], bool] | None = None,
        collapse_above: int | None = DEFAULT_COLLAPSE_ABOVE,
    ) -> None:
        self.accept = accept
        self.collapse_above = collapse_above
        self._live: dict[bytes, _Conn | None] = {}  # None: the filter left it out
        self._flows: dict[FlowKey, _FlowStats] = {}
        self.connections = 0
        self.ignored = 0

    def known(self, conn: bytes) -> bool:
        """Whether this connection is live here (observed or filtered out)."""
        return conn in self._live

    def observe(self, conn: bytes, entry: Entry) -> None:
        """A full view of a connection (a dumped entry or an event with its tuples)."""
        if conn in self._live:
            state = self._live[conn]
        else:
            if self.accept is not None and not self.accept(entry):
                self._live[conn] = None
                self.ignored += 1
                return
            key = flow_key(entry, self.collapse_above)
            stats = self._flows.get(key)
            if stats is None:
                stats = self._flows[key] = _FlowStats()
            stats.connections += 1
            self.connections += 1
            state = self._live[conn] = _Conn(stats)
            translated = snat_address(entry)
            if translated is not None:
                stats.snat.add(translated)
        if state is not None and entry.status is not None:
            self._apply_status(state, entry.status)

    def update_status(self, conn: bytes, status: int) -> None:
        """A later status of a known connection (an UPDATE or DESTROY event)."""
        state = self._live.get(conn)
        if state is not None:
            self._apply_status(state, status)

    def destroy(self, conn: bytes) -> None:
        """The connection ended: a later one with the same tuple counts anew."""
        self._live.pop(conn, None)

    @staticmethod
    def _apply_status(state: _Conn, status: int) -> None:
        if status & _SEEN_REPLY and not state.replied:
            state.replied = True
            state.stats.replied += 1
        if status & _ASSURED and not state.assured:
            state.assured = True
            state.stats.assured += 1

    def flows(self) -> list[Flow]:
        """The flows seen so far, sorted (:func:`flow_sort_key`)."""
        result = [
            Flow(key, s.connections, s.replied, s.assured, tuple(sorted(s.snat)))
            for key, s in self._flows.items()
        ]
        result.sort(key=flow_sort_key)
        return result


def _addr_order(address: bytes) -> tuple[int, int]:
    return len(address), int.from_bytes(address, "big")


def flow_sort_key(flow: Flow) -> tuple[Any, ...]:
    """Protocol (by name), then source, destination, ports (IPv4 before IPv6)."""
    k = flow.key
    return (
        proto_name(k.proto),
        k.family,
        _addr_order(k.src),
        _addr_order(k.dst),
        k.sport.low if k.sport else -1,
        k.dport if k.dport is not None else -1,
        k.icmp_type if k.icmp_type is not None else -1,
        k.icmp_code if k.icmp_code is not None else -1,
        k.zone,
        _addr_order(k.dnat_dst) if k.dnat_dst is not None else (0, 0),
        k.dnat_dport if k.dnat_dport is not None else -1,
    )


# --------------------------------------------------------------------------- prefix cover


@dataclass(frozen=True, slots=True)
class Cover:
    """Prefixes covering a set of addresses, and how many unobserved addresses they add."""

    prefixes: tuple[IPNetwork, ...]
    extra: int


def cover_prefixes(addresses: Iterable[bytes], max_prefixes: int | None = None) -> Cover:
    """The narrowest prefixes that cover ``addresses`` (raw 4- or 16-byte, one family).

    Without ``max_prefixes``: the exact cover, the fewest prefixes that hold every address
    and nothing else. With it: at most that many prefixes, holding every address and as
    few other addresses as possible (fewest prefixes on a tie); the exact cover when it is
    small enough. The loose cover is a dynamic programme over the binary trie of the
    addresses: a node is either one prefix (its longest common prefix) or the best split of
    its budget between its two subtrees.
    """
    raw = set(addresses)
    values = sorted(int.from_bytes(a, "big") for a in raw)
    if max_prefixes is not None and max_prefixes < 1:
        raise ValueError("max_prefixes must be at least 1")
    if not values:
        return Cover((), 0)
    sizes = {len(a) for a in raw}
    if len(sizes) != 1 or next(iter(sizes)) not in (4, 16):
        raise ValueError("cover_prefixes needs addresses of one family (4 or 16 bytes)")
    width = 8 * next(iter(sizes))
    exact = _collapse(values, width)
    if max_prefixes is None or len(exact) <= max_prefixes:
        return Cover(exact, 0)
    extra, _count, nets = _cover_dp(values, width, max_prefixes)[-1]
    return Cover(tuple(sorted((_network(b, p, width) for b, p in nets), key=_net_order)), extra)


def _network(base: int, prefixlen: int, width: int) -> IPNetwork:
    if width == 32:
        return ipaddress.IPv4Network((base, prefixlen))
    return ipaddress.IPv6Network((base, prefixlen))


def _net_order(net: IPNetwork) -> tuple[int, int]:
    return int(net.network_address), net.prefixlen


def _collapse(values: list[int], width: int) -> tuple[IPNetwork, ...]:
    if width == 32:
        return tuple(ipaddress.collapse_addresses(ipaddress.IPv4Network((v, 32)) for v in values))
    return tuple(ipaddress.collapse_addresses(ipaddress.IPv6Network((v, 128)) for v in values))


# (extra addresses, prefix count, prefixes as (network value, prefix length))
_Option = tuple[int, int, tuple[tuple[int, int], ...]]


def _cover_dp(values: list[int], width: int, k_max: int) -> list[_Option]:
    """best[k-1] = the best cover of ``values`` with at most k prefixes, k = 1..k_max."""
    lo, hi = values[0], values[-1]
    diff = (lo ^ hi).bit_length()  # host bits of the longest common prefix
    base = lo >> diff << diff
    whole: _Option = ((1 << diff) - len(values), 1, ((base, width - diff),))
    if len(values) == 1:
        return [whole] * k_max
    limit = min(k_max, len(values))
    split = bisect.bisect_left(values, base | 1 << (diff - 1))
    left = _cover_dp(values[:split], width, limit)
    right = _cover_dp(values[split:], width, limit)
    best: list[_Option] = [whole]
    for k in range(2, limit + 1):
        top = best[-1]
        choice = 0
        for k1 in range(1, k):
            a, b = left[k1 - 1], right[k - k1 - 1]
            if (a[0] + b[0], a[1] + b[1]) < top[:2]:
                top = (a[0] + b[0], a[1] + b[1], ())
                choice = k1
        if choice:
            a, b = left[choice - 1], right[k - choice - 1]
            top = (top[0], top[1], a[2] + b[2])
        best.append(top)
    best.extend([best[-1]] * (k_max - limit))
    return best


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True, slots=True)
class ObservationInfo:
    """How the flows were observed (from the I/O side; shown in every output)."""

    seconds: float = 0.0
    include_table: bool = True
    table_entries: int = 0
    events: int = 0
    overruns: int = 0
    ignored: int = 0
    interrupted: bool = False
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """A destination service as the filter hook sees it (after DNAT)."""

    hook: str
    family: int
    proto: int
    dst: bytes
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    zone: int = 0
    via_dst: bytes | None = None  # the original destination, when reached through DNAT
    via_dport: int | None = None


@dataclass(frozen=True, slots=True)
class Service:
    """Every flow to one service: its sources (and their cover), source ports, counts."""

    key: ServiceKey
    sources: tuple[bytes, ...]
    cover: Cover
    sports: tuple[PortRange, ...]
    flows: int
    connections: int
    replied: int
    assured: int


@dataclass(frozen=True, slots=True)
class Summary:
    flows: tuple[Flow, ...]
    hooks: tuple[str, ...]  # per flow, the hook that filters it
    services: tuple[Service, ...]
    info: ObservationInfo
    max_prefixes: int | None = None
    collapse_above: int | None = DEFAULT_COLLAPSE_ABOVE


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _is_local(address: bytes, local: frozenset[bytes]) -> bool:
    if address in local:
        return True
    ip = ipaddress.ip_address(address)
    return any(ip.version == n.version and ip in n for n in _LOOPBACK)


def _is_multicast(address: bytes) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_multicast or (ip.version == 4 and address == b"\xff\xff\xff\xff")


def hook_of(key: FlowKey, local: frozenset[bytes] = frozenset()) -> str:
    """Which hook filters a flow, given this host's addresses (loopback is always local).

    A multicast or broadcast destination is received by this host (input) unless this
    host sent it (output).
    """
    src_local = _is_local(key.src, local)
    dst = key.filter_dst
    dst_local = _is_local(dst, local) or (not src_local and _is_multicast(dst))
    if src_local and dst_local:
        return "local"
    if dst_local:
        return "input"
    if src_local:
        return "output"
    return "forward"


def service_key(key: FlowKey, hook: str) -> ServiceKey:
    via_dst = key.dst if key.dnat_dst is not None else None
    via_dport = key.dport if key.dnat_dst is not None else None
    return ServiceKey(
        hook,
        key.family,
        key.proto,
        key.filter_dst,
        key.filter_dport,
        key.icmp_type,
        key.icmp_code,
        key.zone,
        via_dst,
        via_dport,
    )


def _service_sort_key(service: Service) -> tuple[Any, ...]:
    k = service.key
    return (
        HOOKS.index(k.hook),
        proto_name(k.proto),
        k.family,
        _addr_order(k.dst),
        k.dport if k.dport is not None else -1,
        k.icmp_type if k.icmp_type is not None else -1,
        k.icmp_code if k.icmp_code is not None else -1,
        k.zone,
        _addr_order(k.via_dst) if k.via_dst is not None else (0, 0),
        k.via_dport if k.via_dport is not None else -1,
    )


def summarize(
    flows: Iterable[Flow],
    info: ObservationInfo | None = None,
    *,
    local: frozenset[bytes] = frozenset(),
    max_prefixes: int | None = None,
    replied_only: bool = False,
    collapse_above: int | None = DEFAULT_COLLAPSE_ABOVE,
) -> Summary:
    """Sorted flows and the services they use, with each service's sources covered.

    ``replied_only`` leaves out flows no connection of which saw a reply (scans, blocked
    or dead destinations). ``collapse_above`` is only recorded (the collector collapsed).
    """
    kept = sorted((f for f in flows if f.both_directions or not replied_only), key=flow_sort_key)
    hooks = tuple(hook_of(f.key, local) for f in kept)
    groups: dict[ServiceKey, list[Flow]] = {}
    for flow, hook in zip(kept, hooks, strict=True):
        groups.setdefault(service_key(flow.key, hook), []).append(flow)
    services = []
    for skey, members in groups.items():
        sources = tuple(sorted({f.key.src for f in members}, key=_addr_order))
        sports = {f.key.sport for f in members if f.key.sport is not None}
        services.append(
            Service(
                skey,
                sources,
                cover_prefixes(sources, max_prefixes),
                tuple(sorted(sports, key=lambda p: (p.low, p.high))),
                len(members),
                sum(f.connections for f in members),
                sum(f.replied for f in members),
                sum(f.assured for f in members),
            )
        )
    services.sort(key=_service_sort_key)
    return Summary(
        tuple(kept),
        hooks,
        tuple(services),
        info or ObservationInfo(),
        max_prefixes,
        collapse_above,
    )


# --------------------------------------------------------------------------- names

# nft's names of ICMP types (numbers always work; names read better).
ICMP_TYPE_NAMES: Final[dict[int, str]] = {
    0: "echo-reply",
    3: "destination-unreachable",
    4: "source-quench",
    5: "redirect",
    8: "echo-request",
    9: "router-advertisement",
    10: "router-solicitation",
    11: "time-exceeded",
    12: "parameter-problem",
    13: "timestamp-request",
    14: "timestamp-reply",
    15: "info-request",
    16: "info-reply",
    17: "address-mask-request",
    18: "address-mask-reply",
}
ICMPV6_TYPE_NAMES: Final[dict[int, str]] = {
    1: "destination-unreachable",
    2: "packet-too-big",
    3: "time-exceeded",
    4: "parameter-problem",
    128: "echo-request",
    129: "echo-reply",
    130: "mld-listener-query",
    131: "mld-listener-report",
    132: "mld-listener-done",
    133: "nd-router-solicit",
    134: "nd-router-advert",
    135: "nd-neighbor-solicit",
    136: "nd-neighbor-advert",
    137: "nd-redirect",
}


def icmp_type_name(proto: int, icmp_type: int) -> str | None:
    names = ICMP_TYPE_NAMES if proto == IPPROTO_ICMP else ICMPV6_TYPE_NAMES
    return names.get(icmp_type)


def _addr_text(address: bytes) -> str:
    return str(ipaddress.ip_address(address))


def _icmp_text(proto: int, icmp_type: int | None, icmp_code: int | None) -> str:
    t, c = icmp_type or 0, icmp_code or 0
    name = icmp_type_name(proto, t)
    return f"{name} {t}/{c}" if name else f"type {t}/{c}"


def _service_text(proto: int, dport: int | None, t: int | None, c: int | None) -> str:
    if proto in ICMP_PROTOCOLS:
        return _icmp_text(proto, t, c)
    return "-" if dport is None else str(dport)


def _dest_with_port(address: bytes, port: int | None) -> str:
    text = _addr_text(address)
    if port is None:
        return text
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def nat_note(flow: Flow) -> str:
    """``dnat 198.51.100.2:8080, snat 198.51.100.1`` (empty when not NATed)."""
    parts = []
    k = flow.key
    if k.dnat_dst is not None:
        parts.append("dnat " + _dest_with_port(k.dnat_dst, k.dnat_dport))
    if flow.snat:
        parts.append("snat " + " ".join(_addr_text(a) for a in flow.snat))
    return ", ".join(parts)


def both_mark(connections: int, replied: int) -> str:
    """``yes`` (every connection saw a reply), ``no`` (none did) or ``2/3``."""
    if replied >= connections:
        return "yes"
    return "no" if replied == 0 else f"{replied}/{connections}"


# --------------------------------------------------------------------------- text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _observed_line(summary: Summary) -> str:
    info = summary.info
    conns = sum(f.connections for f in summary.flows)
    how = "table and events" if info.include_table else "events only"
    stop = ", interrupted" if info.interrupted else ""
    return (
        f"{len(summary.flows)} flows, {conns} connections, {len(summary.services)} services"
        f" observed in {info.seconds:.1f}s ({how}{stop})"
    )


def render_text(summary: Summary) -> str:
    """The flows table, then the services table with their source prefixes."""
    lines = ["# " + _observed_line(summary)]
    for warning in summary.info.warnings:
        lines.append(f"# warning: {warning}")
    show_zone = any(f.key.zone for f in summary.flows)
    if not summary.flows:
        lines.append("no flows observed")
        return "\n".join(lines)
    header = ["PROTO", "SOURCE", "SPORT", "DESTINATION", "DPORT/TYPE", "CONNS", "BOTH"]
    if show_zone:
        header.append("ZONE")
    header.append("NAT")
    rows = []
    for flow in summary.flows:
        k = flow.key
        row = [
            proto_name(k.proto),
            _addr_text(k.src),
            k.sport.text if k.sport else "-",
            _addr_text(k.dst),
            _service_text(k.proto, k.dport, k.icmp_type, k.icmp_code),
            str(flow.connections),
            both_mark(flow.connections, flow.replied),
        ]
        if show_zone:
            row.append(str(k.zone))
        row.append(nat_note(flow) or "-")
        rows.append(row)
    lines += _table(header, rows)
    lines.append("")
    cover = "exact" if summary.max_prefixes is None else f"at most {summary.max_prefixes}"
    lines.append(f"# services (destination after DNAT); sources as prefixes ({cover} per service)")
    header = ["HOOK", "PROTO", "DESTINATION", "DPORT/TYPE", "SOURCES", "CONNS", "BOTH"]
    if show_zone:
        header.append("ZONE")
    header.append("NOTE")
    rows = []
    for service in summary.services:
        sk = service.key
        notes = []
        if sk.via_dst is not None:
            notes.append("dnat from " + _dest_with_port(sk.via_dst, sk.via_dport))
        if service.cover.extra:
            notes.append(f"+{service.cover.extra} addresses not seen")
        row = [
            sk.hook,
            proto_name(sk.proto),
            _addr_text(sk.dst),
            _service_text(sk.proto, sk.dport, sk.icmp_type, sk.icmp_code),
            " ".join(_net_text(n) for n in service.cover.prefixes),
            str(service.connections),
            both_mark(service.connections, service.replied),
        ]
        if show_zone:
            row.append(str(sk.zone))
        row.append(", ".join(notes) or "-")
        rows.append(row)
    lines += _table(header, rows)
    lines.append("# BOTH: connections confirmed in both directions (seen reply); no = none")
    return "\n".join(lines)


def _net_text(net: IPNetwork) -> str:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


# --------------------------------------------------------------------------- JSON


def _port_json(port: PortRange | None) -> int | str | None:
    if port is None:
        return None
    return port.low if port.low == port.high else port.text


def flow_to_json(flow: Flow, hook: str) -> dict[str, Any]:
    k = flow.key
    out: dict[str, Any] = {
        "hook": hook,
        "family": family_name(k.family),
        "protocol": proto_name(k.proto),
        "protocol_number": k.proto,
        "src": _addr_text(k.src),
        "dst": _addr_text(k.dst),
    }
    if k.proto in ICMP_PROTOCOLS:
        out["icmp_type"] = k.icmp_type
        out["icmp_code"] = k.icmp_code
        out["icmp_name"] = icmp_type_name(k.proto, k.icmp_type or 0)
    elif k.sport is not None:
        out["sport"] = _port_json(k.sport)
        out["sport_range"] = [k.sport.low, k.sport.high]
        out["dport"] = k.dport
    out["zone"] = k.zone
    out["connections"] = flow.connections
    out["replied"] = flow.replied
    out["assured"] = flow.assured
    out["both_directions"] = flow.both_directions
    nat: dict[str, Any] = {}
    if k.dnat_dst is not None:
        nat["dnat"] = {"dst": _addr_text(k.dnat_dst), "dport": k.dnat_dport}
    if flow.snat:
        nat["snat"] = [_addr_text(a) for a in flow.snat]
    out["nat"] = nat or None
    return out


def service_to_json(service: Service) -> dict[str, Any]:
    k = service.key
    out: dict[str, Any] = {
        "hook": k.hook,
        "family": family_name(k.family),
        "protocol": proto_name(k.proto),
        "protocol_number": k.proto,
        "dst": _addr_text(k.dst),
    }
    if k.proto in ICMP_PROTOCOLS:
        out["icmp_type"] = k.icmp_type
        out["icmp_code"] = k.icmp_code
        out["icmp_name"] = icmp_type_name(k.proto, k.icmp_type or 0)
    elif k.dport is not None:
        out["dport"] = k.dport
        out["sports"] = [_port_json(p) for p in service.sports]
    out["zone"] = k.zone
    out["dnat_from"] = (
        None if k.via_dst is None else {"dst": _addr_text(k.via_dst), "dport": k.via_dport}
    )
    out["sources"] = [_addr_text(a) for a in service.sources]
    out["prefixes"] = [str(n) for n in service.cover.prefixes]
    out["extra_addresses"] = service.cover.extra
    out["flows"] = service.flows
    out["connections"] = service.connections
    out["replied"] = service.replied
    out["assured"] = service.assured
    return out


def summary_to_json(summary: Summary) -> dict[str, Any]:
    info = summary.info
    return {
        "observed": {
            "seconds": round(info.seconds, 3),
            "include_table": info.include_table,
            "table_entries": info.table_entries,
            "events": info.events,
            "overruns": info.overruns,
            "ignored_connections": info.ignored,
            "interrupted": info.interrupted,
            "warnings": list(info.warnings),
            "collapse_above": summary.collapse_above,
            "max_prefixes": summary.max_prefixes,
        },
        "flows": [flow_to_json(f, h) for f, h in zip(summary.flows, summary.hooks, strict=True)],
        "services": [service_to_json(s) for s in summary.services],
    }


# --------------------------------------------------------------------------- nftables

# nft keywords of protocols whose ports a rule can match.
_NFT_PORT_PROTOS: Final[dict[int, str]] = {
    IPPROTO_TCP: "tcp",
    IPPROTO_UDP: "udp",
    IPPROTO_SCTP: "sctp",
    IPPROTO_DCCP: "dccp",
    IPPROTO_UDPLITE: "udplite",
}
_ND_TYPES = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert"
NFT_POLICIES: Final = ("drop", "accept")


def _nft_set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def nft_rule(service: Service, collapse_above: int | None = DEFAULT_COLLAPSE_ABOVE) -> str:
    """One ``ct state new accept`` rule that allows exactly this service's flows.

    Client source ports (above ``collapse_above``, 1024 when not collapsing) are not
    matched: only when a service also saw privileged source ports are the source ports
    listed, the client ones as one range. A DNATed service also
    matches its original destination (``ct original ...``), so the target is not open to
    direct connections that were never seen.
    """
    k = service.key
    ip = "ip" if k.family == AF_INET else "ip6"
    parts = [
        f"{ip} saddr " + _nft_set([_net_text(n) for n in service.cover.prefixes]),
        f"{ip} daddr {_addr_text(k.dst)}",
    ]
    if k.proto in ICMP_PROTOCOLS:
        kw = "icmp" if k.proto == IPPROTO_ICMP else "icmpv6"
        t = k.icmp_type or 0
        parts.append(f"{kw} type {icmp_type_name(k.proto, t) or t}")
        if k.icmp_code:
            parts.append(f"{kw} code {k.icmp_code}")
    elif k.proto in _NFT_PORT_PROTOS and k.dport is not None:
        kw = _NFT_PORT_PROTOS[k.proto]
        # Client ports change with every connection: match them as one range, even when
        # the summary kept them apart (--no-collapse).
        above = DEFAULT_COLLAPSE_ABOVE if collapse_above is None else collapse_above
        high = collapse_port(PORT_MAX, above)
        sports = sorted({high if p.low > above else p for p in service.sports}, key=lambda p: p.low)
        if any(p != high for p in sports):
            parts.append(f"{kw} sport " + _nft_set([p.text for p in sports]))
        parts.append(f"{kw} dport {k.dport}")
    else:
        parts.append(f"meta l4proto {k.proto}")
        if k.dport is not None:
            parts.append(f"th dport {k.dport}")
    if k.via_dst is not None:
        parts.append(f"ct original {ip} daddr {_addr_text(k.via_dst)}")
        if k.via_dport is not None:
            parts.append(f"ct original proto-dst {k.via_dport}")
    if k.zone:
        parts.append(f"ct zone {k.zone}")
    comment = (
        f"{_plural(service.connections, 'connection')}"
        f" from {_plural(len(service.sources), 'source')}"
    )
    if service.replied == 0:
        comment += ", no reply seen"
    elif service.replied < service.connections:
        comment += f", {service.replied} replied"
    if service.cover.extra:
        comment += f", prefixes add {service.cover.extra} addresses"
    parts.append(f'ct state new accept comment "{comment}"')
    return " ".join(parts)


def render_nft(summary: Summary, *, table: str = "ctsync_flows", policy: str = "drop") -> str:
    """A draft ``nft -f`` file: one chain per hook that saw flows, one rule per service.

    Loading it replaces the table (declare, delete, define: idempotent). Each chain
    accepts established/related packets, drops invalid ones, then allows new connections
    of the observed services only; with ``policy accept`` a last rule counts the new
    connections the draft would drop. Flows of the host to itself (``local``) need no
    rule: loopback is accepted.
    """
    if policy not in NFT_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(NFT_POLICIES)}")
    if not table.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"bad nft table name {table!r}")
    info = summary.info
    by_hook: dict[str, list[Service]] = {}
    for service in summary.services:
        if service.key.hook != "local":
            by_hook.setdefault(service.key.hook, []).append(service)
    conns = sum(f.connections for f in summary.flows)
    lines = [
        "#!/usr/sbin/nft -f",
        f"# Draft written by `ctsync flows`: {len(summary.flows)} flows ({conns} connections)"
        f" observed in {info.seconds:.1f}s.",
        "# It allows new connections of the observed services only. Review it, check it with",
        "# `nft -c -f FILE`, then load it with `nft -f FILE`.",
    ]
    for warning in info.warnings:
        lines.append(f"# warning: {warning}")
    lines += [f"table inet {table}", f"delete table inet {table}", "", f"table inet {table} {{"]
    has_v6 = any(s.key.family != AF_INET for s in summary.services)
    if not by_hook:
        lines.append("    # no flows observed outside loopback: no chain, nothing is filtered")
    first = True
    for hook in HOOKS:
        services = by_hook.get(hook)
        if not services:
            continue
        if not first:
            lines.append("")
        first = False
        lines.append(f"    chain {hook} {{")
        lines.append(f"        type filter hook {hook} priority filter; policy {policy};")
        if hook == "input":
            lines.append('        iifname "lo" accept')
        elif hook == "output":
            lines.append('        oifname "lo" accept')
        lines.append("        ct state established,related accept")
        lines.append("        ct state invalid drop")
        if hook != "forward" and has_v6:
            lines.append(
                f"        icmpv6 type {{ {_ND_TYPES} }} accept"
                ' comment "neighbour discovery (not tracked)"'
            )
        for service in services:
            lines.append("        " + nft_rule(service, summary.collapse_above))
        if policy == "accept":
            lines.append(
                '        ct state new counter comment "not observed: a drop policy drops these"'
            )
            lines.append("        # policy accept: switch to drop once the counter stays at 0")
        else:
            lines.append("        # policy drop: every other new connection is dropped")
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"
