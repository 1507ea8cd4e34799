"""Tests of the compact cache records (ctsync.core.record).

* ``to_entry(*from_entry(e))`` gives back what a record keeps of ``e``;
* ``parse_ct`` (kernel bytes -> record, fast canonical layouts + generic fallback) agrees
  with ``from_entry`` on the same entry, on synthetic and on real kernel bytes;
* ``merge_value`` applies partial updates field by field;
* robustness: ``parse_ct``, ``decode_key`` and ``to_entry`` raise only CtnetlinkError.

``CTSYNC_FUZZ_EXAMPLES`` / ``CTSYNC_PROPERTY_EXAMPLES`` raise the example counts.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ctsync.core import ctnetlink as nl
from ctsync.core import record as r
from ctsync.core.ctnetlink import CtnetlinkError
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
    PORT_PROTOCOLS,
    CtTuple,
    DccpInfo,
    Entry,
    ProtoInfo,
    SctpInfo,
    SeqAdj,
    Synproxy,
    TcpInfo,
    addr,
    make_tuple,
)
from tests.core import strategies as s
from tests.core.strategies import FUZZ, PROPERTY, KernelMessage


def parse(buf: bytes) -> r.Parsed:
    return r.parse_ct(buf, 0, len(buf))


def record_of(entry: Entry) -> tuple[bytes, bytes]:
    """(key, value) of an entry as parse_ct builds it from the entry's attribute bytes."""
    parts = parse(nl.encode_entry_attrs(entry))
    value = r.build_value(*parts[2:])
    assert r.value_from_parts(parts) == value
    return parts[0], value


def normalized_protoinfo(info: ProtoInfo | None) -> ProtoInfo | None:
    """A record stores every protoinfo sub-field; absent ones come back as 0."""
    if isinstance(info, TcpInfo):
        return TcpInfo(
            info.state,
            info.wscale_orig or 0,
            info.wscale_reply or 0,
            info.flags_orig or 0,
            info.mask_orig or 0,
            info.flags_reply or 0,
            info.mask_reply or 0,
        )
    if isinstance(info, SctpInfo):
        return SctpInfo(info.state, info.vtag_orig or 0, info.vtag_reply or 0)
    if isinstance(info, DccpInfo):
        return DccpInfo(info.state, info.role or 0, info.handshake_seq or 0)
    return None


def record_view(e: Entry) -> Entry:
    """What ``to_entry`` gives back for ``e``: the fields a record keeps, defaults for
    the fixed ones, the inverse as reply when there is none, zone 0 as no zone, and an
    all-zero synproxy (the kernel reports it for every entry) as none."""
    synproxy = e.synproxy if e.synproxy and any(
        (e.synproxy.isn, e.synproxy.its, e.synproxy.tsoff)
    ) else None  # fmt: skip
    return Entry(
        e.orig,
        e.reply if e.reply is not None else e.orig.inverted(),
        e.status or 0,
        e.timeout or 0,
        e.mark or 0,
        zone=e.zone or None,
        id=e.id or 0,
        labels=e.labels,
        protoinfo=normalized_protoinfo(e.protoinfo),
        helper=e.helper,
        seq_adj_orig=e.seq_adj_orig,
        seq_adj_reply=e.seq_adj_reply,
        secctx=e.secctx,
        synproxy=synproxy,
        master=e.master,
    )


def expected_kind(t: CtTuple) -> int:
    """The key kind of an original tuple: compact for the canonical layouts only (a DCCP
    tuple with both ports 0 is encoded without ports, as kernels >= 6.16 send it)."""
    if t.zone is None and not (t.proto == IPPROTO_DCCP and t.sport == t.dport == 0):
        if t.family == AF_INET and t.proto == IPPROTO_ICMP:
            return r.KEY_V4_ICMP
        if t.family == AF_INET6 and t.proto == IPPROTO_ICMPV6:
            return r.KEY_V6_ICMP
        if t.proto in PORT_PROTOCOLS:
            return r.KEY_V4_PORTS if t.family == AF_INET else r.KEY_V6_PORTS
    return r.KEY_RAW


V4_TCP = make_tuple("192.0.2.10", "203.0.113.10", IPPROTO_TCP, 40000, 80)
V4_TCP_DNAT_REPLY = make_tuple("198.51.100.2", "192.0.2.10", IPPROTO_TCP, 8080, 40000)
V6_TCP = make_tuple("2001:db8::1", "2001:db8:1::1", IPPROTO_TCP, 40000, 443)
DNAT = 0x2A  # SEEN_REPLY | CONFIRMED | DST_NAT


# --- from_entry / to_entry --------------------------------------------------------------


@PROPERTY
@given(s.entries(record_only=True))
def test_record_roundtrip(entry: Entry) -> None:
    key, value = r.from_entry(entry)
    assert r.to_entry(key, value) == record_view(entry)


@PROPERTY
@given(s.entries())
def test_record_roundtrip_drops_what_a_record_does_not_keep(entry: Entry) -> None:
    """use, counters, timestamps, mark/labels masks and NAT ranges are not kept."""
    assert r.to_entry(*r.from_entry(entry)) == record_view(entry)


@PROPERTY
@given(s.entries(record_only=True))
def test_record_key_and_accessors(entry: Entry) -> None:
    key, value = r.from_entry(entry)
    assert key == r.key_from_tuple(entry.orig, entry.zone)
    assert r.key_kind(key) == expected_kind(entry.orig)
    assert bool(key[0] & r.KEY_ZONE) == bool(entry.zone)
    assert r.decode_key(key) == (entry.orig, entry.zone or None)
    assert r.key_proto(key) == entry.proto
    assert r.key_addresses(key) == (entry.orig.src, entry.orig.dst)
    back = r.to_entry(key, value)
    assert back.reply is not None
    assert r.reply_src(key, value) == back.reply.src
    info = entry.protoinfo
    assert r.tcp_state(value) == (info.state if isinstance(info, TcpInfo) else None)
    assert r.value_fields(value)[1:] == (
        entry.status or 0,
        entry.timeout or 0,
        entry.mark or 0,
        entry.id or 0,
    )


def test_record_key_kinds() -> None:
    cases = [
        (V4_TCP, r.KEY_V4_PORTS, 14),
        (V6_TCP, r.KEY_V6_PORTS, 38),
        (make_tuple("192.0.2.1", "192.0.2.2", IPPROTO_GRE, 0x10, 0x20), r.KEY_V4_PORTS, 14),
        (make_tuple("192.0.2.1", "192.0.2.2", IPPROTO_ICMP, icmp_type=8), r.KEY_V4_ICMP, 13),
        (make_tuple("2001:db8::1", "2001:db8::2", IPPROTO_ICMPV6), r.KEY_V6_ICMP, 37),
        (make_tuple("192.0.2.1", "192.0.2.2", 4), r.KEY_RAW, 33),  # IPIP: 32-byte payload
        (make_tuple("192.0.2.1", "192.0.2.2", IPPROTO_ICMPV6), r.KEY_RAW, 57),  # odd family
        (replace(V4_TCP, zone=7), r.KEY_RAW, 57),  # directional zone
    ]
    for t, kind, size in cases:
        key = r.key_from_tuple(t)
        assert (key[0], len(key)) == (kind, size), t
        assert r.decode_key(key) == (t, None)
        zoned = r.key_from_tuple(t, 9)
        assert (zoned[0], zoned[-2:], len(zoned)) == (kind | r.KEY_ZONE, b"\x00\x09", size + 2)
        assert r.decode_key(zoned) == (t, 9)
        assert r.key_from_tuple(t, 0) == key  # zone 0 is the default zone


def test_golden_record_layout() -> None:
    entry = Entry(
        make_tuple("192.0.2.1", "198.51.100.2", IPPROTO_TCP, 40000, 80),
        status=0x18E,
        timeout=300,
        mark=0x42,
        id=0xDEADBEEF,
        protoinfo=TcpInfo(3, 7, 7, 0x23, 0x23, 0x22, 0x21),
    )
    key, value = r.from_entry(entry)
    # kind | src | dst | proto | sport | dport
    assert key == bytes.fromhex("01" "c0000201" "c6336402" "06" "9c40" "0050")  # fmt: skip
    # flags (VAL_TCP) | status | timeout | mark | id | TCP state wscale*2 flags/mask*2
    assert value == bytes.fromhex(
        "01" "0000018e" "0000012c" "00000042" "deadbeef" "03" "07" "07" "23" "23" "22" "21"
    )  # fmt: skip
    assert record_of(entry) == (key, value)
    nat = replace(entry, orig=V4_TCP, reply=V4_TCP_DNAT_REPLY, protoinfo=None, status=DNAT)
    key, value = r.from_entry(nat)
    # VAL_REPLY: reply src | dst | sport | dport (the protocol is the key's)
    assert value == bytes.fromhex(
        "08" "0000002a" "0000012c" "00000042" "deadbeef"
        "c6336402" "c000020a" "1f90" "9c40"
    )  # fmt: skip
    icmp = Entry(make_tuple("192.0.2.1", "198.51.100.2", IPPROTO_ICMP, icmp_id=7, icmp_type=8))
    key, value = r.from_entry(icmp)
    assert key == bytes.fromhex("03" "c0000201" "c6336402" "0007" "08" "00")  # fmt: skip
    assert value == bytes(r.FIXED_SIZE)


def test_from_entry_drops_an_all_zero_synproxy() -> None:
    entry = Entry(V4_TCP, synproxy=Synproxy(0, 0, 0))
    assert r.from_entry(entry) == r.from_entry(Entry(V4_TCP))
    assert record_of(entry) == r.from_entry(Entry(V4_TCP))
    kept = Entry(V4_TCP, synproxy=Synproxy(0, 0, 1))
    assert r.to_entry(*r.from_entry(kept)).synproxy == Synproxy(0, 0, 1)


@pytest.mark.parametrize("size", [0, 1, 5, 15, 16, 17])
def test_rare_attributes_of_any_length_stay_aligned(size: int) -> None:
    """Regression: parse_ct once kept unaligned rare TLVs without their padding, so an
    odd-length CTA_LABELS shifted every attribute after it."""
    entry = Entry(V4_TCP, labels=bytes(range(1, size + 1)), helper="ftp", secctx="s0")
    key, value = record_of(entry)
    assert (key, value) == r.from_entry(entry)
    assert r.to_entry(key, value) == record_view(entry)


def test_record_keeps_a_reply_zone_on_a_compact_key() -> None:
    """BUG: the compact reply has no room for a directional reply zone, so from_entry
    silently drops it (see the captured kernel entry with ``zone-reply=9``)."""
    reply = replace(V4_TCP_DNAT_REPLY, zone=9)
    entry = Entry(V4_TCP, reply, status=DNAT)
    assert r.to_entry(*r.from_entry(entry)).reply == reply


@PROPERTY
@given(s.entries(record_only=True, directional_zones=False, reply_zone=True))
def test_record_roundtrip_with_reply_zones(entry: Entry) -> None:
    """Directional zone on the reply only (the kernel emits CTA_TUPLE_ZONE there)."""
    assert r.to_entry(*r.from_entry(entry)) == record_view(entry)


# --- parse_ct agrees with from_entry ----------------------------------------------------


@PROPERTY
@given(s.entries(consistent_nat=True, reply_kinds=("none", "inverse")))
def test_parse_ct_agrees_without_nat(entry: Entry) -> None:
    """Fast layouts and generic fallbacks build the same record as from_entry."""
    key, value = record_of(entry)
    assert (key, value) == r.from_entry(entry)
    assert r.to_entry(key, value) == record_view(entry)


@PROPERTY
@given(s.entries(consistent_nat=True, reply_kinds=("nat",), directional_zones=False))
def test_parse_ct_agrees_with_nat(entry: Entry) -> None:
    """A NATed reply (status has SRC_NAT/DST_NAT) is kept, compact or raw."""
    key, value = record_of(entry)
    assert r.to_entry(key, value) == record_view(entry)
    assert (key, value) == r.from_entry(entry)


@PROPERTY
@given(
    s.entries(
        consistent_nat=True, reply_kinds=("nat",), directional_zones=True, proto=IPPROTO_ICMP
    ).filter(lambda e: e.family == AF_INET)
    | s.entries(consistent_nat=True, reply_kinds=("nat",), proto=4)
)
def test_parse_ct_agrees_with_nat_icmp_and_raw(entry: Entry) -> None:
    """NAT on the layouts without a protocol byte in the key (ICMP) and on raw keys."""
    assert record_of(entry) == r.from_entry(entry)
    assert r.to_entry(*record_of(entry)) == record_view(entry)


@pytest.mark.parametrize(
    ("orig", "reply"),
    [
        pytest.param(V4_TCP, V4_TCP_DNAT_REPLY, id="v4-tcp"),
        pytest.param(
            make_tuple("192.0.2.10", "203.0.113.10", IPPROTO_UDP, 5353, 53),
            make_tuple("198.51.100.53", "192.0.2.10", IPPROTO_UDP, 53, 5353),
            id="v4-udp",
        ),
        pytest.param(
            V6_TCP, make_tuple("2001:db8:2::1", "2001:db8::1", IPPROTO_TCP, 8443, 40000), id="v6"
        ),
    ],
)
def test_parse_ct_nat_reply_minimal(orig: CtTuple, reply: CtTuple) -> None:
    """BUG reproducer: parse_ct's compact reply for port protocols is one byte too long
    (it keeps the key's protocol byte), so to_entry fails or misreads the ports."""
    entry = Entry(orig, reply, status=DNAT, timeout=100)
    key, value = record_of(entry)
    assert value == r.from_entry(entry)[1]
    assert r.to_entry(key, value).reply == reply


def test_parse_ct_ignores_a_changed_reply_without_nat_bits() -> None:
    """Documented: without SRC_NAT/DST_NAT the reply is taken to be the inverse."""
    entry = Entry(V4_TCP, V4_TCP_DNAT_REPLY, status=0x0E, timeout=5)
    key, value = record_of(entry)
    assert not value[0] & r.VAL_REPLY
    assert r.to_entry(key, value).reply == V4_TCP.inverted()
    # from_entry, which has no status rule, keeps it.
    assert r.to_entry(*r.from_entry(entry)).reply == V4_TCP_DNAT_REPLY
    # Without a compact key (here: IPIP, no ports) the reply is always kept, raw.
    raw = Entry(make_tuple("192.0.2.1", "198.51.100.1", 4), status=0x0E)
    raw = replace(raw, reply=make_tuple("198.51.100.9", "192.0.2.1", 4))
    key, value = record_of(raw)
    assert value[0] & r.VAL_RARE
    assert r.to_entry(key, value).reply == raw.reply
    assert (key, value) == r.from_entry(raw)


@PROPERTY
@given(s.entries(record_only=True, consistent_nat=True, reply_kinds=("inverse",)), st.data())
def test_parse_ct_nat_bits_with_the_inverse_reply(entry: Entry, data: st.DataObject) -> None:
    """NAT bits with an un-NATed reply: parse_ct keeps the (redundant) reply, from_entry
    does not; the bytes differ but both stand for the same entry."""
    status = (entry.status or 0) | data.draw(st.sampled_from([0x10, 0x20, 0x30]))
    entry = replace(entry, status=status)
    assert r.to_entry(*record_of(entry)) == record_view(entry)


@PROPERTY
@given(s.entries(directional_zones=False, reply_kinds=("none",)), st.data())
def test_parse_ct_fast_and_generic_protoinfo(entry: Entry, data: st.DataObject) -> None:
    """A full TCP protoinfo (the kernel's 44-byte nest) takes the fast path; partial ones
    the generic decoder; both give the same bytes."""
    if entry.proto == IPPROTO_TCP:
        entry = replace(entry, protoinfo=data.draw(s.tcp_infos(full=data.draw(st.booleans()))))
    assert record_of(entry) == r.from_entry(entry)


@pytest.mark.parametrize(
    ("orig", "kind"),
    [
        pytest.param(V4_TCP, r.KEY_V4_PORTS, id="v4-ports"),
        pytest.param(V6_TCP, r.KEY_V6_PORTS, id="v6-ports"),
        pytest.param(
            make_tuple("192.0.2.1", "192.0.2.2", IPPROTO_ICMP, icmp_id=3, icmp_type=8),
            r.KEY_V4_ICMP,
            id="v4-icmp",
        ),
        pytest.param(
            make_tuple("2001:db8::1", "2001:db8::2", IPPROTO_ICMPV6, icmp_id=3, icmp_type=128),
            r.KEY_V6_ICMP,
            id="v6-icmp",
        ),
        pytest.param(
            make_tuple("192.0.2.1", "192.0.2.2", IPPROTO_GRE, 0x10, 0x20),
            r.KEY_V4_PORTS,
            id="gre-keys-as-ports",
        ),
        pytest.param(replace(V4_TCP, zone=7), r.KEY_RAW, id="directional-zone"),
        pytest.param(make_tuple("192.0.2.1", "192.0.2.2", 4), r.KEY_RAW, id="ipip"),
        pytest.param(make_tuple("2001:db8::1", "2001:db8::2", 50), r.KEY_RAW, id="esp-v6"),
        pytest.param(
            make_tuple("192.0.2.1", "192.0.2.2", IPPROTO_DCCP), r.KEY_RAW, id="dccp-no-ports"
        ),
    ],
)
def test_parse_ct_fast_layouts_and_fallbacks(orig: CtTuple, kind: int) -> None:
    for zone in (None, 0, 5):
        entry = Entry(orig, orig.inverted(), status=8, timeout=1, zone=zone)
        key, value = record_of(entry)
        assert r.key_kind(key) == kind
        assert bool(key[0] & r.KEY_ZONE) == bool(zone)
        assert (key, value) == r.from_entry(entry)
        assert r.to_entry(key, value) == record_view(entry)


def test_parse_ct_fallback_for_non_canonical_tuples() -> None:
    """Layouts the fast path does not know (attribute order, missing NLA_F_NESTED) fall
    back to a raw key that still decodes to the same tuple."""
    payload = nl.encode_tuple_payload(V4_TCP)
    ((_, a1, b1), (_, a2, b2)) = list(nl._walk(payload, 0, len(payload)))
    ip, proto = payload[a1 - 4 : b1], payload[a2 - 4 : b2]
    swapped = nl.attr(nl.CTA_TUPLE_ORIG | nl.NLA_F_NESTED, proto + ip)
    flat = nl.attr(
        nl.CTA_TUPLE_ORIG,
        struct.pack("=HH", len(ip), nl.CTA_TUPLE_IP)
        + ip[4:]
        + struct.pack("=HH", len(proto), nl.CTA_TUPLE_PROTO)
        + proto[4:],
    )
    for attrs in (swapped, flat):
        key = parse(attrs)[0]
        assert key[0] == r.KEY_RAW
        assert r.decode_key(key) == (V4_TCP, None)


@pytest.mark.parametrize(
    ("orig", "reply"),
    [
        pytest.param(replace(V4_TCP, zone=7), V4_TCP.inverted(), id="orig-zone"),
        pytest.param(V4_TCP, replace(V4_TCP.inverted(), zone=9), id="reply-zone"),
    ],
)
def test_parse_ct_directional_zone_minimal(orig: CtTuple, reply: CtTuple) -> None:
    """BUG reproducer: with a zone on one direction only (``ct original zone set 7`` /
    ``ct reply zone set 9``), the kernel puts CTA_TUPLE_ZONE in that direction's tuple
    only, and sets no NAT bit. parse_ct drops the reply, and to_entry rebuilds it as
    ``orig.inverted()``, which copies the original's zone into the reply (orig-zone) or
    has no reply zone (reply-zone); from_entry keeps the reply instead."""
    entry = Entry(orig, reply, status=0x18E, timeout=5)
    key, value = record_of(entry)
    assert r.to_entry(key, value).reply == reply
    assert (key, value) == r.from_entry(entry)


@PROPERTY
@given(s.entries(consistent_nat=True, reply_kinds=("none", "inverse")), s.zones)
def test_parse_ct_orig_directional_zone(entry: Entry, zone: int) -> None:
    """The same, for random entries: the reply of an orig-zoned entry has no zone."""
    orig = replace(entry.orig, zone=zone)
    entry = replace(entry, orig=orig, reply=replace(orig.inverted(), zone=None))
    key, value = record_of(entry)
    assert r.to_entry(key, value) == record_view(entry)


def test_parse_ct_reply_zone_with_nat_minimal() -> None:
    """BUG reproducer: a compact original with a NATed reply that carries CTA_TUPLE_ZONE
    (``ct reply zone set 9`` + DNAT; captured from Linux 6.18) makes parse_ct raise
    "reply tuple of another layout than the original" on valid kernel input."""
    reply = replace(V4_TCP_DNAT_REPLY, zone=9)
    entry = Entry(V4_TCP, reply, status=0x1A8, timeout=5)
    key, value = record_of(entry)
    assert r.to_entry(key, value).reply == reply


# --- real kernel bytes (tests/core/data) ------------------------------------------------

KERNEL_CT = s.kernel_ct_messages()


def _kernel_id(m: KernelMessage) -> str:
    e = nl.decode_entry(m.buf, m.start, m.end)
    name = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp", 33: "dccp", 47: "gre"}
    parts = [m.source.split("_")[1].split(".")[0], str(m.index), name.get(e.proto, str(e.proto))]
    if e.family == AF_INET6:
        parts.append("v6")
    if e.status and e.status & 0x30:
        parts.append("nat")
    if e.orig.zone is not None:
        parts.append("origzone")
    if e.reply and e.reply.zone is not None:
        parts.append("replyzone")
    return "-".join(parts)


@pytest.mark.parametrize("m", KERNEL_CT, ids=_kernel_id)
def test_kernel_parse_ct_matches_the_decoder(m: KernelMessage) -> None:
    """parse_ct on real kernel bytes gives the record of what decode_entry sees."""
    entry = nl.decode_entry(m.buf, m.start, m.end)
    parts = r.parse_ct(m.buf, m.start, m.end)
    key, value = parts[0], r.build_value(*parts[2:])
    assert key == r.key_from_tuple(entry.orig, entry.zone)
    assert r.to_entry(key, value) == record_view(entry)
    present = r.P_STATUS | r.P_TIMEOUT | r.P_ID | (r.P_PROTO if entry.protoinfo else 0)
    present |= r.P_MARK if entry.mark is not None else 0
    assert parts[1] == present


def test_kernel_canonical_layouts_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real kernel tuples and TCP protoinfo match the fast-path layouts: parse_ct must not
    need the generic decoders for them."""
    plain = []
    for m in KERNEL_CT:
        e = nl.decode_entry(m.buf, m.start, m.end)
        zoned = e.orig.zone is not None or (e.reply is not None and e.reply.zone is not None)
        canonical = not zoned and e.proto in (IPPROTO_TCP, IPPROTO_UDP, 1, 58, 47, 132)
        tcp_full = e.proto != IPPROTO_TCP or (
            isinstance(e.protoinfo, TcpInfo) and e.protoinfo.wscale_orig is not None
        )
        if canonical and tcp_full and e.proto != IPPROTO_SCTP:
            plain.append((m, e))
    assert len(plain) >= 8

    def forbidden(*_: object) -> None:
        raise AssertionError("generic decoder used on a canonical kernel layout")

    monkeypatch.setattr(nl, "decode_tuple", forbidden)
    monkeypatch.setattr(nl, "decode_protoinfo", forbidden)
    for m, e in plain:
        key = r.parse_ct(m.buf, m.start, m.end)[0]
        assert r.key_kind(key) == expected_kind(e.orig) != r.KEY_RAW


def test_kernel_event_sequence_merges() -> None:
    """NEW, then UPDATE (mark 0x99) merged into the cached value, as the cache does."""
    new, update, _destroy = s.kernel_messages("kernel_events.bin")
    p_new = r.parse_ct(new.buf, new.start, new.end)
    value = r.build_value(*p_new[2:])
    p_upd = r.parse_ct(update.buf, update.start, update.end)
    assert p_upd[0] == p_new[0]
    value = r.merge_value(value, p_upd)
    got = r.to_entry(p_new[0], value)
    want = nl.decode_entry(update.buf, update.start, update.end)
    assert got == record_view(want)
    assert got.mark == 0x99


# --- merge_value ------------------------------------------------------------------------


@st.composite
def partial_updates(draw: st.DrawFn, old: Entry) -> Entry:
    """An event for ``old``'s connection carrying only some attributes (no reply)."""
    fields: dict[str, object] = {}
    for name in ("status", "timeout", "mark", "id"):
        if draw(st.booleans()):
            fields[name] = draw(s.u32)
    if draw(st.booleans()):
        fields["protoinfo"] = draw(s.protoinfos(old.proto))
    rare = {
        "labels": s.labels16,
        "helper": s.names,
        "seq_adj_orig": s.seq_adjs,
        "seq_adj_reply": s.seq_adjs,
        "secctx": s.names,
        "synproxy": s.nonzero_synproxies,
        "master": s.ct_tuples(old.family),
    }
    for name, strategy in rare.items():
        if draw(st.integers(0, 3)) == 0:
            fields[name] = draw(strategy)
    return Entry(old.orig, zone=old.zone, **fields)  # type: ignore[arg-type]


def merged_view(old: Entry, upd: Entry) -> Entry:
    base = record_view(old)
    changes: dict[str, object] = {}
    for name in (
        "status",
        "timeout",
        "mark",
        "id",
        "labels",
        "helper",
        "seq_adj_orig",
        "seq_adj_reply",
        "secctx",
        "synproxy",
        "master",
    ):
        if (value := getattr(upd, name)) is not None:
            changes[name] = value
    if upd.protoinfo is not None:
        changes["protoinfo"] = normalized_protoinfo(upd.protoinfo)
    return replace(base, **changes)  # type: ignore[arg-type]


def present_bits(upd: Entry) -> int:
    bits = 0
    for name, bit in (
        ("status", r.P_STATUS),
        ("timeout", r.P_TIMEOUT),
        ("mark", r.P_MARK),
        ("id", r.P_ID),
        ("protoinfo", r.P_PROTO),
    ):
        if getattr(upd, name) is not None:
            bits |= bit
    return bits


@PROPERTY
@given(
    s.entries(record_only=True, consistent_nat=True).flatmap(
        lambda old: st.tuples(st.just(old), partial_updates(old))
    )
)
def test_merge_partial_update(pair: tuple[Entry, Entry]) -> None:
    """Absent fields keep their old values, present ones replace them; rare attributes
    replace those of the same type; a stored (NATed) reply persists."""
    old, upd = pair
    key, old_value = r.from_entry(old)
    parts = parse(nl.encode_entry_attrs(upd))
    assert parts[0] == key
    assert parts[1] == present_bits(upd)
    merged = r.merge_value(old_value, parts)
    assert r.to_entry(key, merged) == merged_view(old, upd)


@PROPERTY
@given(s.entries(record_only=True, consistent_nat=True, reply_kinds=("none", "inverse")))
def test_merge_with_the_same_entry_is_identity(entry: Entry) -> None:
    _key, value = r.from_entry(entry)
    parts = parse(nl.encode_entry_attrs(entry))
    assert r.merge_value(value, parts) == value


@PROPERTY
@given(s.entries(record_only=True, consistent_nat=True, reply_kinds=("nat",)), s.u32)
def test_merge_kernel_style_update_of_a_nat_entry(entry: Entry, timeout: int) -> None:
    """Kernel UPDATE events carry both tuples and the status: merging one keeps the
    NATed reply (compact for port/ICMP layouts, raw otherwise)."""
    key, value = r.from_entry(entry)
    event = Entry(entry.orig, entry.reply, status=entry.status, timeout=timeout, zone=entry.zone)
    parts = parse(nl.encode_entry_attrs(event))
    merged = r.merge_value(value, parts)
    assert r.to_entry(key, merged) == replace(record_view(entry), timeout=timeout)


def test_merge_rare_attributes_replace_by_type() -> None:
    old = Entry(V4_TCP, status=8, labels=bytes(16), helper="ftp", seq_adj_orig=SeqAdj(1, 2, 3))
    key, value = r.from_entry(old)
    new_labels = (1 << 100).to_bytes(16, "little")
    for upd, want in (
        (Entry(V4_TCP, labels=new_labels), replace(old, labels=new_labels)),
        (Entry(V4_TCP, helper="sip"), replace(old, helper="sip")),
        (Entry(V4_TCP, secctx="system_u"), replace(old, secctx="system_u")),
        (Entry(V4_TCP, mark=5), replace(old, mark=5)),
    ):
        merged = r.merge_value(value, parse(nl.encode_entry_attrs(upd)))
        assert r.to_entry(key, merged) == record_view(want)


def test_merge_keeps_the_compact_reply() -> None:
    old = Entry(V4_TCP, V4_TCP_DNAT_REPLY, status=DNAT, timeout=100, mark=1)
    key, value = r.from_entry(old)
    for upd in (
        Entry(V4_TCP, timeout=50),  # no status, no reply
        Entry(V4_TCP, status=0x0E),  # status without NAT bits
        Entry(V4_TCP, status=DNAT, labels=bytes(16)),  # NAT bits but no reply; a rare attr
    ):
        merged = r.merge_value(value, parse(nl.encode_entry_attrs(upd)))
        got = r.to_entry(key, merged)
        assert got.reply == V4_TCP_DNAT_REPLY, upd
        assert got == merged_view(old, upd)


@pytest.mark.parametrize(
    ("orig", "reply"),
    [
        pytest.param(
            V6_TCP,
            # src bytes 12..13 are 18 00: read as a TLV header of length 24 at tail
            # offset 12 they end exactly where the rare TLVs start, so the 36-byte v6
            # reply passes for a 12-byte v4 one.
            make_tuple("2001:db8::1800:0", "2001:db8::1", IPPROTO_TCP, 8080, 40000),
            id="v6-ports",
        ),
        pytest.param(
            make_tuple("2001:db8::1", "2001:db8:1::1", IPPROTO_ICMPV6, icmp_id=5, icmp_type=128),
            # The same with an ICMPv6 reply (also 36 bytes: id, type, code).
            make_tuple("2001:db8::1800:0", "2001:db8::1", IPPROTO_ICMPV6, icmp_id=9, icmp_type=129),
            id="v6-icmp",
        ),
    ],
)
def test_merge_finds_the_compact_reply_before_rare_attributes(
    orig: CtTuple, reply: CtTuple
) -> None:
    """BUG reproducer: merge_value guesses the compact reply's size from the tail alone
    (_reply_len_of_tail tries 12 bytes, then 36); for some IPv6 reply addresses the
    12-byte guess parses as a valid TLV chain, and the merged value is corrupt."""
    old = Entry(orig, reply, status=0x3A, timeout=100, labels=bytes(16))
    key, value = r.from_entry(old)
    assert r.to_entry(key, value).reply == reply
    upd = Entry(orig, helper="ftp")
    merged = r.merge_value(value, parse(nl.encode_entry_attrs(upd)))
    assert r.to_entry(key, merged) == merged_view(old, upd)


def test_merge_protoinfo_changes_kind() -> None:
    t = make_tuple("192.0.2.1", "198.51.100.1", IPPROTO_DCCP, 1, 2)
    key, value = r.from_entry(Entry(t, protoinfo=DccpInfo(4, 1, 99), labels=bytes(16)))
    for info in (SctpInfo(3, 1, 2), TcpInfo(3, 1, 2, 3, 4, 5, 6), DccpInfo(5, 0, 7)):
        merged = r.merge_value(value, parse(nl.encode_entry_attrs(Entry(t, protoinfo=info))))
        got = r.to_entry(key, merged)
        assert (got.protoinfo, got.labels) == (info, bytes(16))


# --- robustness: parse it, or raise CtnetlinkError, nothing else ------------------------

_kernel_bodies = st.sampled_from([m.body for m in KERNEL_CT]) if KERNEL_CT else st.nothing()
fuzz_attrs = st.one_of(
    st.binary(max_size=300),
    s.tlv_trees(),
    s.mutated(s.entries().map(nl.encode_entry_attrs)),
    s.mutated(_kernel_bodies),
)
_keys = st.builds(r.key_from_tuple, s.ct_tuples(), st.one_of(st.none(), s.u16))
_records = s.entries(record_only=True).map(r.from_entry)


def _accepts_or_ctnetlink_error(fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(CtnetlinkError):
        fn(*args)


@FUZZ
@given(fuzz_attrs)
def test_fuzz_parse_ct(buf: bytes) -> None:
    try:
        parts = r.parse_ct(buf, 0, len(buf))
    except CtnetlinkError:
        return
    # Whatever parse_ct accepts builds a record that converts back or fails cleanly.
    _accepts_or_ctnetlink_error(r.to_entry, parts[0], r.build_value(*parts[2:]))


@FUZZ
@given(st.one_of(st.binary(max_size=80), s.mutated(_keys)))
@example(b"")
@example(bytes([r.KEY_ZONE]))
@example(bytes([r.KEY_RAW | r.KEY_ZONE, 0, 5]))
def test_fuzz_record_decode_key(key: bytes) -> None:
    _accepts_or_ctnetlink_error(r.decode_key, key)


@FUZZ
@given(
    st.one_of(
        st.tuples(st.binary(max_size=60), st.binary(max_size=80)),
        _records.flatmap(lambda kv: st.tuples(s.mutations(kv[0]), st.just(kv[1]))),
        _records.flatmap(lambda kv: st.tuples(st.just(kv[0]), s.mutations(kv[1]))),
    )
)
@example((bytes([r.KEY_V4_PORTS]) + bytes(13), bytes([0x07]) + bytes(16)))
@example((bytes([r.KEY_V4_PORTS]) + bytes(13), bytes([r.VAL_REPLY]) + bytes(16)))
@example((bytes([r.KEY_RAW]) + nl.encode_tuple_payload(V4_TCP), bytes([r.VAL_REPLY]) + bytes(30)))
def test_fuzz_to_entry(kv: tuple[bytes, bytes]) -> None:
    _accepts_or_ctnetlink_error(r.to_entry, *kv)


@FUZZ
@given(
    _records,
    s.mutated(s.entries(record_only=True, proto=IPPROTO_TCP).map(nl.encode_entry_attrs)),
)
def test_fuzz_merge_then_to_entry(record: tuple[bytes, bytes], update: bytes) -> None:
    """A mutated update that parse_ct accepts merges into a valid value and converts back
    (or fails with CtnetlinkError)."""
    key, value = record
    try:
        parts = r.parse_ct(update, 0, len(update))
        merged = r.merge_value(value, parts)
        r.to_entry(key, merged)
    except CtnetlinkError:
        pass


def test_icmp_protocols_are_what_the_key_layouts_assume() -> None:
    assert {IPPROTO_ICMP, IPPROTO_ICMPV6} == ICMP_PROTOCOLS
    assert IPPROTO_SCTP in PORT_PROTOCOLS and AF_INET6 != AF_INET
    assert addr("192.0.2.1") == bytes([192, 0, 2, 1])
