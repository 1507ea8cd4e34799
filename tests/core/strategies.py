"""Shared hypothesis strategies for conntrack tuples, entries, expectations and byte fuzzing.

Only documentation addresses are generated (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32). Values respect what the codec encodes for each protocol: ICMP/ICMPv6 tuples
carry ``icmp_*`` fields and zero ports, port protocols carry ports and zero ICMP fields, any
other protocol carries neither.

Budgets: ``FUZZ_EXAMPLES`` (env ``CTSYNC_FUZZ_EXAMPLES``) sets the example count of the
robustness tests; ``PROPERTY_EXAMPLES`` (env ``CTSYNC_PROPERTY_EXAMPLES``) the round trips.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ctsync.core import ctnetlink as nl
from ctsync.core.entry import (
    AF_INET,
    AF_INET6,
    ICMP_PROTOCOLS,
    IPPROTO_DCCP,
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    NAT_MASK,
    PORT_PROTOCOLS,
    Counters,
    CtTuple,
    DccpInfo,
    Entry,
    Expectation,
    ExpectNat,
    NatRange,
    ProtoInfo,
    SctpInfo,
    SeqAdj,
    Synproxy,
    TcpInfo,
)

T = TypeVar("T")

# --- budgets --------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


FUZZ_EXAMPLES = _env_int("CTSYNC_FUZZ_EXAMPLES", 120)
PROPERTY_EXAMPLES = _env_int("CTSYNC_PROPERTY_EXAMPLES", 60)

#: Round-trip properties.
PROPERTY = settings(
    max_examples=PROPERTY_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Robustness ("parse it or raise CtnetlinkError") properties.
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

# --- scalars --------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
ports = st.one_of(st.sampled_from([0, 1, 21, 53, 80, 443, 1023, 1024, 8080, 65535]), u16)
nonzero_ports = st.one_of(st.sampled_from([1, 1023, 5004, 65535]), st.integers(1, 0xFFFF))
zones = st.one_of(st.sampled_from([1, 5, 0xFFFF]), st.integers(1, 0xFFFF))
#: NUL-free text: the codec NUL-terminates strings and cuts at the first NUL.
names = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
    max_size=24,
)
labels16 = st.one_of(
    st.just(bytes(16)),
    st.just((1 << 3).to_bytes(16, "little")),
    st.binary(min_size=16, max_size=16),
)

V4_PREFIXES = (bytes([192, 0, 2]), bytes([198, 51, 100]), bytes([203, 0, 113]))
V6_PREFIX = bytes([0x20, 0x01, 0x0D, 0xB8])

#: Protocols per family. "Other" protocols carry neither ports nor ICMP fields
#: (4 = IPIP, 41 = IPv6-in-IPv4, 50 = ESP, 0 and 255 as edges).
OTHER_PROTOCOLS = (0, 2, 4, 41, 50, 51, 103, 115, 255)
PROTOCOLS_V4 = (
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    IPPROTO_ICMP,
    IPPROTO_SCTP,
    IPPROTO_DCCP,
    IPPROTO_GRE,
    *OTHER_PROTOCOLS,
)
PROTOCOLS_V6 = tuple(IPPROTO_ICMPV6 if p == IPPROTO_ICMP else p for p in PROTOCOLS_V4)
#: ICMP on the "wrong" family: the codec still encodes ICMP fields (odd but valid).
CROSS_ICMP = {AF_INET: IPPROTO_ICMPV6, AF_INET6: IPPROTO_ICMP}

families = st.sampled_from([AF_INET, AF_INET6])


def addresses(family: int) -> st.SearchStrategy[bytes]:
    if family == AF_INET:
        return st.builds(
            lambda prefix, last: prefix + bytes([last]), st.sampled_from(V4_PREFIXES), u8
        )
    return st.builds(lambda rest: V6_PREFIX + rest, st.binary(min_size=12, max_size=12))


def protocols(family: int, *, cross_icmp: bool = True) -> st.SearchStrategy[int]:
    base = PROTOCOLS_V4 if family == AF_INET else PROTOCOLS_V6
    choices = (*base, CROSS_ICMP[family]) if cross_icmp else base
    return st.sampled_from(choices)


icmp_types = st.one_of(st.sampled_from([0, 3, 8, 11, 13, 128, 129, 135, 139]), u8)


@st.composite
def ct_tuples(
    draw: st.DrawFn,
    family: int | None = None,
    proto: int | None = None,
    *,
    zone: bool = True,
    cross_icmp: bool = True,
) -> CtTuple:
    """A valid tuple; ``zone`` allows a directional zone (CTA_TUPLE_ZONE)."""
    fam = draw(families) if family is None else family
    pr = draw(protocols(fam, cross_icmp=cross_icmp)) if proto is None else proto
    src = draw(addresses(fam))
    dst = draw(addresses(fam))
    tzone = draw(st.one_of(st.none(), zones)) if zone else None
    if pr in ICMP_PROTOCOLS:
        icmp_id, icmp_type, icmp_code = draw(u16), draw(icmp_types), draw(u8)
        return CtTuple(fam, pr, src, dst, 0, 0, icmp_id, icmp_type, icmp_code, tzone)
    if pr == IPPROTO_DCCP:
        # Kernels >= 6.16 track DCCP without ports (both 0, encoded without port
        # attributes); older ones with real ports, and port 0 is not a DCCP port.
        if draw(st.booleans()):
            return CtTuple(fam, pr, src, dst, zone=tzone)
        return CtTuple(fam, pr, src, dst, draw(nonzero_ports), draw(nonzero_ports), zone=tzone)
    if pr in PORT_PROTOCOLS:
        return CtTuple(fam, pr, src, dst, draw(ports), draw(ports), zone=tzone)
    return CtTuple(fam, pr, src, dst, zone=tzone)


@st.composite
def nat_replies(draw: st.DrawFn, orig: CtTuple) -> CtTuple:
    """A reply tuple that differs from the inverse of ``orig`` (what SNAT/DNAT produce)."""
    inverse = replace(orig.inverted(), zone=None)
    for _ in range(8):
        reply = replace(
            inverse,
            src=draw(st.one_of(st.just(inverse.src), addresses(orig.family))),
            dst=draw(st.one_of(st.just(inverse.dst), addresses(orig.family))),
        )
        if orig.proto in ICMP_PROTOCOLS:
            reply = replace(reply, icmp_id=draw(st.one_of(st.just(inverse.icmp_id), u16)))
        elif orig.proto == IPPROTO_DCCP and not (orig.sport or orig.dport):
            pass  # port-less DCCP (kernels >= 6.16): only addresses can change
        elif orig.proto in PORT_PROTOCOLS:
            new_ports = nonzero_ports if orig.proto == IPPROTO_DCCP else ports
            reply = replace(
                reply,
                sport=draw(st.one_of(st.just(inverse.sport), new_ports)),
                dport=draw(st.one_of(st.just(inverse.dport), new_ports)),
            )
        if reply != inverse:
            return reply
    # Force a difference in the address (always possible: flip the last bit).
    return replace(inverse, src=inverse.src[:-1] + bytes([inverse.src[-1] ^ 1]))


def opt(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    return st.one_of(st.none(), strategy)


@st.composite
def tcp_infos(draw: st.DrawFn, *, full: bool = False) -> TcpInfo:
    """TCP protoinfo; flags and mask come in pairs (the codec encodes both or neither)."""
    pick: Callable[[st.SearchStrategy[int]], st.SearchStrategy[int | None]] = (
        (lambda s: s) if full else opt
    )
    wo, wr = draw(pick(st.integers(0, 14))), draw(pick(st.integers(0, 14)))
    fo, fr = draw(pick(u8)), draw(pick(u8))
    mo = None if fo is None else draw(u8)
    mr = None if fr is None else draw(u8)
    return TcpInfo(draw(st.integers(0, 9)), wo, wr, fo, mo, fr, mr)


@st.composite
def sctp_infos(draw: st.DrawFn, *, full: bool = False) -> SctpInfo:
    if full:
        return SctpInfo(draw(st.integers(0, 9)), draw(u32), draw(u32))
    return SctpInfo(draw(st.integers(0, 9)), draw(opt(u32)), draw(opt(u32)))


@st.composite
def dccp_infos(draw: st.DrawFn, *, full: bool = False) -> DccpInfo:
    if full:
        return DccpInfo(draw(st.integers(0, 9)), draw(u8), draw(u64))
    return DccpInfo(draw(st.integers(0, 9)), draw(opt(u8)), draw(opt(u64)))


def protoinfos(proto: int, *, full: bool = False) -> st.SearchStrategy[ProtoInfo | None]:
    if proto == IPPROTO_TCP:
        return opt(tcp_infos(full=full))
    if proto == IPPROTO_SCTP:
        return opt(sctp_infos(full=full))
    if proto == IPPROTO_DCCP:
        return opt(dccp_infos(full=full))
    return st.none()


seq_adjs = st.builds(SeqAdj, u32, u32, u32)
counters = st.builds(Counters, u64, u64)
synproxies = st.builds(Synproxy, u32, u32, u32)
nonzero_synproxies = synproxies.filter(lambda s: any((s.isn, s.its, s.tsoff)))


@st.composite
def nat_ranges(draw: st.DrawFn, family: int) -> NatRange:
    ports_given = draw(st.booleans())
    return NatRange(
        draw(addresses(family)),
        draw(addresses(family)),
        draw(ports) if ports_given else None,
        draw(ports) if ports_given else None,
    )


def status_for(reply_is_nat: bool) -> st.SearchStrategy[int]:
    """Status bits; SRC_NAT/DST_NAT set exactly when the reply is NATed (as the kernel)."""
    base = st.integers(0, 0xFFFF).map(lambda s: s & ~int(NAT_MASK))
    if not reply_is_nat:
        return base
    nat_bits = st.sampled_from([0x10, 0x20, 0x30])
    return st.builds(lambda s, n: s | n, base, nat_bits)


@st.composite
def entries(
    draw: st.DrawFn,
    family: int | None = None,
    proto: int | None = None,
    *,
    record_only: bool = False,
    directional_zones: bool = True,
    reply_zone: bool = False,
    consistent_nat: bool = False,
    full_protoinfo: bool = False,
    reply_kinds: tuple[str, ...] = ("none", "inverse", "nat"),
) -> Entry:
    """A valid Entry.

    ``record_only`` leaves out what a record does not keep (use, counters, timestamps,
    mark/labels masks, NAT ranges) and draws a non-zero synproxy. ``directional_zones``
    allows CTA_TUPLE_ZONE on the original tuple; ``reply_zone`` on a reply that is not
    simply the inverse. ``consistent_nat`` sets SRC_NAT/DST_NAT exactly when the reply
    differs from the inverse of the original (the kernel's invariant). ``reply_kinds``
    picks among no reply, the plain inverse, and a NATed reply.
    """
    fam = draw(families) if family is None else family
    orig = draw(ct_tuples(fam, proto, zone=directional_zones))
    kind = draw(st.sampled_from(reply_kinds))
    reply: CtTuple | None
    if kind == "none":
        reply = None
    elif kind == "inverse":
        reply = orig.inverted()
    else:
        reply = draw(nat_replies(orig))
        if reply_zone:
            reply = replace(reply, zone=draw(opt(zones)))
    if consistent_nat:
        is_nat = reply is not None and reply != orig.inverted()
        status: int | None = draw(status_for(is_nat))
    else:
        status = draw(opt(u32))
    fields: dict[str, object] = {
        "reply": reply,
        "status": status,
        "timeout": draw(opt(u32)),
        "mark": draw(opt(u32)),
        "zone": draw(opt(st.one_of(st.just(0), zones))),
        "id": draw(opt(u32)),
        "labels": draw(opt(labels16)),
        "protoinfo": draw(protoinfos(orig.proto, full=full_protoinfo)),
        "helper": draw(opt(names)),
        "seq_adj_orig": draw(opt(seq_adjs)),
        "seq_adj_reply": draw(opt(seq_adjs)),
        "secctx": draw(opt(names)),
        "master": draw(opt(ct_tuples(fam, zone=directional_zones))),
    }
    if record_only:
        fields["synproxy"] = draw(opt(nonzero_synproxies))
    else:
        fields.update(
            synproxy=draw(opt(synproxies)),
            mark_mask=draw(opt(u32)),
            use=draw(opt(u32)),
            labels_mask=draw(opt(labels16)),
            counters_orig=draw(opt(counters)),
            counters_reply=draw(opt(counters)),
            timestamp_start=draw(opt(u64)),
            timestamp_stop=draw(opt(u64)),
            timestamp_event=draw(opt(u64)),
            nat_src=draw(opt(nat_ranges(fam))),
            nat_dst=draw(opt(nat_ranges(fam))),
        )
    return Entry(orig, **fields)  # type: ignore[arg-type]


@st.composite
def expectations(draw: st.DrawFn, family: int | None = None) -> Expectation:
    """A valid Expectation; the mask is a full tuple (it then decodes strictly)."""
    fam = draw(families) if family is None else family
    master = draw(ct_tuples(fam, zone=False))
    tup = draw(ct_tuples(fam, zone=False))
    mask = draw(ct_tuples(fam, tup.proto, zone=False))
    nat = draw(opt(st.builds(ExpectNat, u32, ct_tuples(fam, zone=False))))
    return Expectation(
        master,
        tup,
        mask,
        timeout=draw(opt(u32)),
        id=draw(opt(u32)),
        helper=draw(opt(names)),
        zone=draw(opt(u16)),
        flags=draw(opt(u32)),
        klass=draw(opt(u32)),
        nat=nat,
        function=draw(opt(names)),
    )


# --- fuzzing: random attribute trees and mutations of valid encodings ---------------

#: Attribute types worth hitting (the CTA_* ranges are small).
attr_types = st.one_of(st.integers(0, 28), st.integers(0, 0xFFFF))


def tlv_trees(max_leaves: int = 12) -> st.SearchStrategy[bytes]:
    """Random but well-framed netlink attribute streams, nested at random depth."""
    leaf = st.builds(
        lambda t, p: nl.attr(t & 0x7FFF, p),
        attr_types,
        st.one_of(
            st.binary(max_size=20),
            u8.map(lambda b: bytes([b])),
            st.binary(min_size=4, max_size=4),
            st.binary(min_size=16, max_size=16),
        ),
    )

    def extend(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
        return st.builds(
            lambda t, parts: nl.nest(t & 0x3FFF, *parts),
            st.integers(0, 28),
            st.lists(children, max_size=4),
        )

    tree = st.recursive(leaf, extend, max_leaves=max_leaves)
    return st.lists(tree, max_size=6).map(b"".join)


def attr_header_offsets(buf: bytes, start: int = 0, end: int | None = None) -> list[int]:
    """Offsets of every attribute header in a (nested) attribute stream, best effort."""
    out: list[int] = []
    end = len(buf) if end is None else end
    off = start
    while off + 4 <= end:
        alen, atype = struct.unpack_from("=HH", buf, off)
        if alen < 4 or off + alen > end:
            break
        out.append(off)
        if atype & nl.NLA_F_NESTED:
            out.extend(attr_header_offsets(buf, off + 4, off + alen))
        off += (alen + 3) & ~3
    return out


@st.composite
def mutations(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` after 1-4 random edits: bit flips, truncation, length-field corruption,
    inserted/deleted/duplicated bytes, a type change."""
    buf = bytearray(valid)
    headers = attr_header_offsets(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["flip", "truncate", "length", "insert", "delete", "dup", "type"])
        )
        n = len(buf)
        if op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate" and n:
            del buf[draw(st.integers(0, n - 1)) :]
        elif op in ("length", "type") and headers:
            off = draw(st.sampled_from(headers))
            if off + 4 <= len(buf):
                value = draw(st.one_of(st.integers(0, 8), u16))
                field = off if op == "length" else off + 2
                struct.pack_into("=H", buf, field, value)
        elif op == "insert":
            i = draw(st.integers(0, n))
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del buf[i : i + draw(st.integers(1, 8))]
        elif op == "dup" and n:
            i = draw(st.integers(0, n - 1))
            j = draw(st.integers(i, min(n, i + 32)))
            buf[j:j] = buf[i:j]
    return bytes(buf)


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return valid.flatmap(mutations)


# --- captured kernel bytes (tests/core/data, see capture_kernel.py) -------------------

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class KernelMessage:
    """One netlink message of a capture: header fields and the attribute range."""

    source: str
    index: int
    mtype: int
    flags: int
    buf: bytes
    start: int  # first attribute (after nfgenmsg)
    end: int

    @property
    def body(self) -> bytes:
        return self.buf[self.start : self.end]


def kernel_messages(name: str) -> list[KernelMessage]:
    """Every message of a capture file (committed: a missing one is an error, not a skip)."""
    buf = (DATA / name).read_bytes()
    return [
        KernelMessage(name, i, mtype, flags, buf, s + nl.NFGEN_HDRLEN, e)
        for i, (mtype, flags, _seq, _pid, s, e) in enumerate(nl.iter_messages(buf))
    ]


def kernel_ct_messages() -> list[KernelMessage]:
    """Every CT_NEW / CT_DELETE message of the dump and event captures."""
    msgs = kernel_messages("kernel_ct_dump.bin") + kernel_messages("kernel_events.bin")
    return [m for m in msgs if m.mtype >> 8 == nl.NFNL_SUBSYS_CTNETLINK]


def kernel_exp_messages() -> list[KernelMessage]:
    return [
        m
        for m in kernel_messages("kernel_exp_dump.bin")
        if m.mtype >> 8 == nl.NFNL_SUBSYS_CTNETLINK_EXP
    ]
