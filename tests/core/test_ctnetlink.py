"""Tests of the pure ctnetlink codec (ctsync.core.ctnetlink).

* round trips (hypothesis): entries, tuples, expectations, whole messages, datagrams;
* golden bytes checked by hand against the uapi layouts (little-endian hosts);
* real kernel bytes captured by ``tests/core/data/capture_kernel.py`` (Linux 6.18);
* robustness: on random bytes and on mutations of valid encodings every decoder either
  succeeds or raises :class:`CtnetlinkError`, nothing else.

``CTSYNC_FUZZ_EXAMPLES=20000 pytest tests/core/test_ctnetlink.py -k fuzz`` runs the
robustness properties longer (default: a few hundred examples each).
"""

from __future__ import annotations

import contextlib
import struct
import sys
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ctsync.core import ctnetlink as nl
from ctsync.core.ctnetlink import CtnetlinkError
from ctsync.core.entry import (
    AF_INET,
    AF_INET6,
    IPPROTO_DCCP,
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    CtTuple,
    Entry,
    Expectation,
    ExpectNat,
    NatRange,
    SctpInfo,
    SctpState,
    SeqAdj,
    Status,
    TcpInfo,
    TcpState,
    addr,
    make_tuple,
)
from tests.core import strategies as s
from tests.core.strategies import FUZZ, PROPERTY, KernelMessage

LITTLE_ENDIAN = pytest.mark.skipif(
    sys.byteorder != "little", reason="golden bytes use little-endian netlink headers"
)


def body_of(msg: bytes) -> tuple[int, int]:
    """(start, end) of the ctnetlink attributes of a single-message datagram."""
    ((_, _, _, _, start, end),) = list(nl.iter_messages(msg))
    return start + nl.NFGEN_HDRLEN, end


def decode_msg_entry(msg: bytes) -> Entry:
    start, end = body_of(msg)
    return nl.decode_entry(msg, start, end)


# --- round trips ------------------------------------------------------------------------


@PROPERTY
@given(s.ct_tuples())
def test_tuple_roundtrip(t: CtTuple) -> None:
    payload = nl.encode_tuple_payload(t)
    assert nl.decode_tuple(payload, 0, len(payload)) == t
    assert len(payload) % 4 == 0


@PROPERTY
@given(s.entries())
def test_entry_roundtrip(entry: Entry) -> None:
    attrs = nl.encode_entry_attrs(entry)
    assert nl.decode_entry(attrs, 0, len(attrs)) == entry


@PROPERTY
@given(s.entries(), st.binary(max_size=7), st.binary(max_size=7))
def test_entry_roundtrip_inside_larger_buffers(entry: Entry, head: bytes, tail: bytes) -> None:
    """Offsets are honoured, and bytes, bytearray and memoryview all decode alike."""
    attrs = nl.encode_entry_attrs(entry)
    raw = head + attrs + tail
    start, end = len(head), len(head) + len(attrs)
    for buf in (raw, bytearray(raw), memoryview(raw)):
        assert nl.decode_entry(buf, start, end) == entry


@PROPERTY
@given(
    s.entries(),
    st.sampled_from([nl.CT_NEW, nl.CT_DELETE, nl.CT_GET]),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF_FFFF),
)
def test_ct_message_roundtrip(entry: Entry, mtype: int, flags: int, seq: int) -> None:
    msg = nl.encode_ct_message(mtype, flags, seq, entry)
    ((got_type, got_flags, got_seq, pid, start, end),) = list(nl.iter_messages(msg))
    assert (got_type, got_flags, got_seq, pid) == (mtype, flags, seq, 0)
    assert end == len(msg)
    family, version, res_id = struct.unpack_from("=BBH", msg, start)
    assert (family, version, res_id) == (entry.family, nl.NFNETLINK_V0, 0)
    assert nl.decode_entry(msg, start + nl.NFGEN_HDRLEN, end) == entry


@PROPERTY
@given(s.entries(), st.sampled_from([0, AF_INET, AF_INET6]))
def test_ct_message_family_override(entry: Entry, family: int) -> None:
    msg = nl.encode_ct_message(nl.CT_GET, nl.NLM_F_REQUEST, 1, entry, family=family)
    assert msg[nl.NLMSG_HDRLEN] == family


@PROPERTY
@given(s.expectations(), st.sampled_from([nl.EXP_NEW, nl.EXP_DELETE]), st.integers(0, 2**32 - 1))
def test_expectation_roundtrip(exp: Expectation, mtype: int, seq: int) -> None:
    msg = nl.encode_expectation(mtype, nl.NLM_F_REQUEST, seq, exp)
    ((got_type, _, got_seq, _, start, end),) = list(nl.iter_messages(msg))
    assert (got_type, got_seq) == (mtype, seq)
    assert msg[start] == exp.master.family
    assert nl.decode_expectation(msg, start + nl.NFGEN_HDRLEN, end) == exp


def _datagram_part(item: Entry | Expectation | str, seq: int) -> bytes:
    if isinstance(item, Entry):
        return nl.encode_ct_message(nl.CT_NEW, nl.NLM_F_MULTI, seq, item)
    if isinstance(item, Expectation):
        return nl.encode_expectation(nl.EXP_NEW, nl.NLM_F_MULTI, seq, item)
    if item == "done":
        return struct.pack("=IHHII", 20, nl.NLMSG_DONE, nl.NLM_F_MULTI, seq, 0) + bytes(4)
    # A message whose length is not a multiple of 4: the next one starts aligned.
    return struct.pack("=IHHII", 17, nl.NLMSG_NOOP, 0, seq, 0) + b"\x01" + bytes(3)


@PROPERTY
@given(
    st.lists(
        st.one_of(s.entries(), s.expectations(), st.sampled_from(["done", "odd"])),
        min_size=1,
        max_size=6,
    )
)
def test_multi_message_datagram_splits(items: list[Entry | Expectation | str]) -> None:
    parts = [_datagram_part(item, seq) for seq, item in enumerate(items)]
    datagram = b"".join(parts)
    messages = list(nl.iter_messages(datagram))
    assert len(messages) == len(items)
    offset = 0
    for seq, (item, part, msg) in enumerate(zip(items, parts, messages, strict=True)):
        mtype, _flags, got_seq, _pid, start, end = msg
        assert got_seq == seq
        assert start == offset + nl.NLMSG_HDRLEN
        assert end == offset + struct.unpack_from("=I", part)[0]
        if isinstance(item, Entry):
            assert mtype == nl.CT_NEW
            assert nl.decode_entry(datagram, start + nl.NFGEN_HDRLEN, end) == item
        elif isinstance(item, Expectation):
            assert mtype == nl.EXP_NEW
            assert nl.decode_expectation(datagram, start + nl.NFGEN_HDRLEN, end) == item
        else:
            assert mtype == (nl.NLMSG_DONE if item == "done" else nl.NLMSG_NOOP)
        offset += len(part)


@PROPERTY
@given(st.lists(s.entries(), min_size=1, max_size=4), st.binary(max_size=64))
def test_iter_messages_honours_length(batch: list[Entry], junk: bytes) -> None:
    """recv_into() fills the front of a big buffer: only ``length`` bytes count."""
    datagram = b"".join(nl.encode_ct_message(nl.CT_NEW, 0, i, e) for i, e in enumerate(batch))
    buf = bytearray(datagram + junk)
    got = [
        nl.decode_entry(buf, st_ + 4, en) for *_, st_, en in nl.iter_messages(buf, len(datagram))
    ]
    assert got == batch


def test_iter_messages_allows_up_to_three_trailing_bytes() -> None:
    msg = nl.encode_ct_message(nl.CT_NEW, 0, 1, Entry(make_tuple("192.0.2.1", "192.0.2.2", 6)))
    for extra in range(4):
        assert len(list(nl.iter_messages(msg + bytes(extra)))) == 1
    with pytest.raises(CtnetlinkError):
        list(nl.iter_messages(msg + bytes(4)))  # a header-sized tail is a truncated message
    with pytest.raises(CtnetlinkError):
        list(nl.iter_messages(msg + bytes(15)))


def test_iter_messages_rejects_bad_lengths() -> None:
    good = nl.encode_ct_message(nl.CT_NEW, 0, 1, Entry(make_tuple("192.0.2.1", "192.0.2.2", 6)))
    for mlen in (0, 15, len(good) + 1, 0xFFFF_FFFF):
        bad = struct.pack("=I", mlen) + good[4:]
        with pytest.raises(CtnetlinkError):
            list(nl.iter_messages(bad))
    assert list(nl.iter_messages(b"")) == []


@PROPERTY
@given(s.ct_tuples(zone=False), st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_tuple_key_roundtrip(t: CtTuple, zone: int | None) -> None:
    key = nl.tuple_key(t, zone)
    assert nl.decode_key(key) == (t, zone or None)
    assert key.startswith(nl.encode_tuple_payload(t))


@PROPERTY
@given(s.ct_tuples(), st.one_of(st.none(), s.u16), st.one_of(st.none(), s.u32), s.u32)
def test_encode_delete(t: CtTuple, zone: int | None, ct_id: int | None, seq: int) -> None:
    msg = nl.encode_delete(seq, t, zone, ct_id)
    ((mtype, flags, got_seq, _, start, _),) = list(nl.iter_messages(msg))
    assert (mtype, flags, got_seq, msg[start]) == (
        nl.CT_DELETE,
        nl.NLM_F_REQUEST | nl.NLM_F_ACK,
        seq,
        t.family,
    )
    assert decode_msg_entry(msg) == Entry(t, zone=zone, id=ct_id)


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, AF_INET, AF_INET6]),
    st.one_of(st.none(), s.u32),
    s.u32,
    st.one_of(st.none(), s.u16),
    st.booleans(),
)
def test_encode_dump_request(
    seq: int, family: int, mark: int | None, mask: int, zone: int | None, exp: bool
) -> None:
    msg = nl.encode_dump_request(
        seq, family, mark=mark, mark_mask=mask, zone=zone, expectations=exp
    )
    ((mtype, flags, got_seq, _, start, end),) = list(nl.iter_messages(msg))
    assert mtype == (nl.EXP_GET if exp else nl.CT_GET)
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_DUMP
    assert (got_seq, msg[start]) == (seq, family)
    attrs = {t: bytes(msg[a:b]) for t, a, b in nl._walk(msg, start + 4, end)}
    expected: dict[int, bytes] = {}
    if mark is not None:
        expected[nl.CTA_MARK] = struct.pack(">I", mark)
        expected[nl.CTA_MARK_MASK] = struct.pack(">I", mask)
    if zone is not None:
        expected[nl.CTA_ZONE] = struct.pack(">H", zone)
    assert attrs == expected


@given(st.integers(0, 2**32 - 1), st.one_of(st.none(), s.u32), s.u32, st.booleans())
def test_encode_flush(seq: int, mark: int | None, mask: int, exp: bool) -> None:
    msg = nl.encode_flush(seq, AF_INET, mark=mark, mark_mask=mask, expectations=exp)
    ((mtype, flags, _, _, start, end),) = list(nl.iter_messages(msg))
    assert mtype == (nl.EXP_DELETE if exp else nl.CT_DELETE)
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK
    attrs = [(t, bytes(msg[a:b])) for t, a, b in nl._walk(msg, start + 4, end)]
    if mark is None:
        assert attrs == []
    else:
        assert attrs == [
            (nl.CTA_MARK, struct.pack(">I", mark)),
            (nl.CTA_MARK_MASK, struct.pack(">I", mask)),
        ]


@given(st.integers(-4095, 0), st.integers(0, 2**32 - 1))
def test_decode_error(err: int, seq: int) -> None:
    request = struct.pack("=IHHII", 16, nl.CT_NEW, nl.NLM_F_REQUEST, seq, 1234)
    body = struct.pack("=i", err) + request
    msg = struct.pack("=IHHII", 16 + len(body), nl.NLMSG_ERROR, 0, 0, 0) + body
    ((mtype, _, _, _, start, end),) = list(nl.iter_messages(msg))
    assert mtype == nl.NLMSG_ERROR
    assert nl.decode_error(msg, start, end) == (-err, seq)
    with pytest.raises(CtnetlinkError):
        nl.decode_error(msg, start, end - 1)


# --- codec details ----------------------------------------------------------------------


def test_protocol_specific_tuple_fields() -> None:
    """ICMP tuples carry id/type/code, port protocols ports, other protocols neither."""
    v4, v6 = ("192.0.2.1", "198.51.100.1"), ("2001:db8::1", "2001:db8::2")

    def proto_attrs(t: CtTuple) -> list[int]:
        payload = nl.encode_tuple_payload(t)
        ((_, a, b),) = [x for x in nl._walk(payload, 0, len(payload)) if x[0] == 2]
        return [typ for typ, _, _ in nl._walk(payload, a, b)]

    icmp = make_tuple(*v4, IPPROTO_ICMP, icmp_id=9, icmp_type=8, icmp_code=1)
    icmp6 = make_tuple(*v6, IPPROTO_ICMPV6, icmp_id=9, icmp_type=128)
    assert proto_attrs(icmp) == [1, 4, 5, 6]
    assert proto_attrs(icmp6) == [1, 7, 8, 9]
    for proto in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, IPPROTO_SCTP, IPPROTO_DCCP):
        assert proto_attrs(make_tuple(*v4, proto, 1, 2)) == [1, 2, 3]
    assert proto_attrs(make_tuple(*v4, IPPROTO_GRE, 0x10, 0x20)) == [1, 2, 3]  # GRE keys
    assert proto_attrs(make_tuple(*v4, 4)) == [1]  # IPIP: protocol number only
    # DCCP without ports: how kernels >= 6.16 (generic tracking) send it.
    assert proto_attrs(make_tuple(*v4, IPPROTO_DCCP)) == [1]
    # Ports of a non-port protocol are not encoded, so they do not round-trip.
    odd = make_tuple(*v4, 4, 1, 2)
    payload = nl.encode_tuple_payload(odd)
    assert nl.decode_tuple(payload, 0, len(payload)) == replace(odd, sport=0, dport=0)


def test_encoder_rejects_wrong_address_sizes() -> None:
    with pytest.raises(ValueError, match="IPv4"):
        nl.encode_tuple_payload(CtTuple(AF_INET, 6, bytes(16), bytes(16), 1, 2))
    with pytest.raises(ValueError, match="IPv6"):
        nl.encode_tuple_payload(CtTuple(AF_INET6, 6, bytes(4), bytes(4), 1, 2))
    with pytest.raises(ValueError, match="family"):
        nl.encode_tuple_payload(CtTuple(7, 6, bytes(4), bytes(4), 1, 2))


def test_optional_halves_default_on_encode() -> None:
    """A TCP flag without mask is sent with mask = flags; a NAT min port alone as min=max."""
    t = make_tuple("192.0.2.1", "198.51.100.1", IPPROTO_TCP, 1, 2)
    entry = Entry(
        t,
        protoinfo=TcpInfo(3, flags_orig=0x23, flags_reply=0x02),
        nat_src=NatRange(addr("203.0.113.1"), addr("203.0.113.9"), 1024),
    )
    attrs = nl.encode_entry_attrs(entry)
    got = nl.decode_entry(attrs, 0, len(attrs))
    assert got.protoinfo == TcpInfo(3, flags_orig=0x23, mask_orig=0x23, flags_reply=2, mask_reply=2)
    assert got.nat_src == NatRange(addr("203.0.113.1"), addr("203.0.113.9"), 1024, 1024)


def _mask_tuple_attrs(*, proto: bool, src: bool, dst: bool, ports: bool) -> bytes:
    ip = []
    if src:
        ip.append(nl.attr(nl.CTA_IP_V4_SRC, addr("255.255.255.0")))
    if dst:
        ip.append(nl.attr(nl.CTA_IP_V4_DST, addr("255.255.255.255")))
    parts = [nl.nest(nl.CTA_TUPLE_IP, *ip)]
    pr = [nl.attr_u8(nl.CTA_PROTO_NUM, 6)] if proto else []
    if ports:
        pr += [nl.attr_be16(nl.CTA_PROTO_SRC_PORT, 0), nl.attr_be16(nl.CTA_PROTO_DST_PORT, 0xFFFF)]
    parts.append(nl.nest(nl.CTA_TUPLE_PROTO, *pr))
    return b"".join(parts)


def _expectation_with_mask(mask_payload: bytes, nat_payload: bytes | None = None) -> bytes:
    master = make_tuple("192.0.2.1", "198.51.100.1", IPPROTO_TCP, 40000, 21)
    tup = make_tuple("198.51.100.1", "192.0.2.1", IPPROTO_TCP, 0, 50000)
    parts = [
        nl.encode_tuple(nl.CTA_EXPECT_MASTER, master),
        nl.encode_tuple(nl.CTA_EXPECT_TUPLE, tup),
        nl.nest(nl.CTA_EXPECT_MASK, mask_payload),
    ]
    if nat_payload is not None:
        parts.append(
            nl.nest(
                nl.CTA_EXPECT_NAT,
                nl.attr_be32(nl.CTA_EXPECT_NAT_DIR, 1),
                nl.nest(nl.CTA_EXPECT_NAT_TUPLE, nat_payload),
            )
        )
    return b"".join(parts)


def test_mask_tuple_leniency() -> None:
    """Mask and NAT tuples may lack CTA_PROTO_NUM (proto 0) and one address (zeros)."""
    no_proto = _mask_tuple_attrs(proto=False, src=True, dst=True, ports=True)
    buf = _expectation_with_mask(no_proto, no_proto)
    exp = nl.decode_expectation(buf, 0, len(buf))
    lenient = CtTuple(AF_INET, 0, addr("255.255.255.0"), addr("255.255.255.255"), 0, 0xFFFF)
    assert exp.mask == lenient
    assert exp.nat == ExpectNat(1, lenient)
    only_src = _mask_tuple_attrs(proto=False, src=True, dst=False, ports=False)
    buf = _expectation_with_mask(only_src)
    assert nl.decode_expectation(buf, 0, len(buf)).mask == CtTuple(
        AF_INET, 0, addr("255.255.255.0"), bytes(4)
    )
    # A mask with its protocol number decodes strictly, like any tuple.
    strict = _mask_tuple_attrs(proto=True, src=True, dst=True, ports=True)
    buf = _expectation_with_mask(strict)
    assert nl.decode_expectation(buf, 0, len(buf)).mask == replace(lenient, proto=6)
    # No address at all is an error, as is a missing master/tuple/mask.
    bare = _mask_tuple_attrs(proto=False, src=False, dst=False, ports=True)
    buf = _expectation_with_mask(bare)
    with pytest.raises(CtnetlinkError):
        nl.decode_expectation(buf, 0, len(buf))
    tup_only = nl.encode_tuple(nl.CTA_EXPECT_TUPLE, make_tuple("192.0.2.1", "192.0.2.2", 6))
    with pytest.raises(CtnetlinkError):
        nl.decode_expectation(tup_only, 0, len(tup_only))


def test_decoder_skips_unknown_attributes_and_flags() -> None:
    entry = Entry(make_tuple("192.0.2.1", "198.51.100.1", IPPROTO_UDP, 5, 6), mark=7)
    attrs = nl.encode_entry_attrs(entry)
    noise = nl.attr(0x3FFF, b"abc") + nl.nest(60, nl.attr(1, b"x")) + nl.attr(nl.CTA_FILTER, b"")
    got = nl.decode_entry(noise + attrs + noise, 0, len(noise) * 2 + len(attrs))
    assert got == entry
    # The byte-order flag (0x4000) and NLA_F_NESTED are masked off the type.
    flagged = struct.pack("=HH", 8, nl.CTA_MARK | 0x4000) + struct.pack(">I", 9)
    got = nl.decode_entry(attrs + flagged, 0, len(attrs) + 8)
    assert got.mark == 9


def test_32bit_counters_and_partial_nests() -> None:
    t = make_tuple("192.0.2.1", "198.51.100.1", IPPROTO_UDP, 5, 6)
    attrs = nl.encode_tuple(nl.CTA_TUPLE_ORIG, t) + nl.nest(
        nl.CTA_COUNTERS_ORIG,
        nl.attr_be32(nl.CTA_COUNTERS32_PACKETS, 5),
        nl.attr_be32(nl.CTA_COUNTERS32_BYTES, 500),
    )
    attrs += nl.nest(nl.CTA_SEQ_ADJ_ORIG, nl.attr_be32(nl.CTA_SEQADJ_OFFSET_AFTER, 3))
    got = nl.decode_entry(attrs, 0, len(attrs))
    assert (got.counters_orig.packets, got.counters_orig.bytes) == (5, 500)  # type: ignore[union-attr]
    assert got.seq_adj_orig is not None
    assert (got.seq_adj_orig.correction_pos, got.seq_adj_orig.offset_after) == (0, 3)


@pytest.mark.parametrize(
    "attrs",
    [
        pytest.param(b"", id="empty"),
        pytest.param(nl.attr_be32(nl.CTA_MARK, 1), id="no-orig-tuple"),
        pytest.param(nl.nest(nl.CTA_TUPLE_ORIG), id="empty-tuple"),
        pytest.param(
            nl.nest(nl.CTA_TUPLE_ORIG, nl.nest(nl.CTA_TUPLE_IP, nl.attr(1, bytes(4)))),
            id="no-dst",
        ),
        pytest.param(
            nl.nest(
                nl.CTA_TUPLE_ORIG,
                nl.nest(nl.CTA_TUPLE_IP, nl.attr(1, bytes(4)), nl.attr(4, bytes(16))),
                nl.nest(nl.CTA_TUPLE_PROTO, nl.attr_u8(1, 6)),
            ),
            id="mixed-families",
        ),
        pytest.param(
            nl.nest(
                nl.CTA_TUPLE_ORIG,
                nl.nest(nl.CTA_TUPLE_IP, nl.attr(1, bytes(4)), nl.attr(2, bytes(4))),
            ),
            id="no-proto",
        ),
        pytest.param(
            nl.nest(
                nl.CTA_TUPLE_ORIG,
                nl.nest(nl.CTA_TUPLE_IP, nl.attr(1, bytes(3)), nl.attr(2, bytes(4))),
                nl.nest(nl.CTA_TUPLE_PROTO, nl.attr_u8(1, 6)),
            ),
            id="short-address",
        ),
        pytest.param(
            nl.encode_tuple(nl.CTA_TUPLE_ORIG, make_tuple("192.0.2.1", "192.0.2.2", 6))
            + nl.attr(nl.CTA_STATUS, b"\0\0\0"),
            id="short-status",
        ),
        pytest.param(
            nl.encode_tuple(nl.CTA_TUPLE_ORIG, make_tuple("192.0.2.1", "192.0.2.2", 6))
            + nl.nest(nl.CTA_PROTOINFO, nl.nest(nl.CTA_PROTOINFO_TCP)),
            id="tcp-protoinfo-without-state",
        ),
        pytest.param(
            nl.encode_tuple(nl.CTA_TUPLE_ORIG, make_tuple("192.0.2.1", "192.0.2.2", 6))
            + nl.nest(nl.CTA_NAT_SRC, nl.attr(nl.CTA_NAT_V4_MAXIP, bytes(4))),
            id="nat-without-min",
        ),
        pytest.param(
            nl.encode_tuple(nl.CTA_TUPLE_ORIG, make_tuple("192.0.2.1", "192.0.2.2", 6))[:-1],
            id="truncated",
        ),
    ],
)
def test_malformed_entries_raise_ctnetlink_error(attrs: bytes) -> None:
    with pytest.raises(CtnetlinkError):
        nl.decode_entry(attrs, 0, len(attrs))


# --- golden bytes (little-endian netlink headers) ---------------------------------------

#: 192.0.2.1:40000 -> 198.51.100.2:80 TCP, the canonical kernel layout (48 bytes).
GOLDEN_V4_TCP_TUPLE = bytes.fromhex(
    "14000180"  # CTA_TUPLE_IP, len 20, NLA_F_NESTED | 1
    "08000100" "c0000201"  # CTA_IP_V4_SRC 192.0.2.1
    "08000200" "c6336402"  # CTA_IP_V4_DST 198.51.100.2
    "1c000280"  # CTA_TUPLE_PROTO, len 28, NLA_F_NESTED | 2
    "05000100" "06000000"  # CTA_PROTO_NUM 6 + 3 pad
    "06000200" "9c400000"  # CTA_PROTO_SRC_PORT 40000 (be16) + 2 pad
    "06000300" "00500000"  # CTA_PROTO_DST_PORT 80
)  # fmt: skip
GOLDEN_V4_TCP = make_tuple("192.0.2.1", "198.51.100.2", IPPROTO_TCP, 40000, 80)


@LITTLE_ENDIAN
def test_golden_v4_tcp_tuple_payload() -> None:
    assert len(GOLDEN_V4_TCP_TUPLE) == 48
    assert nl.encode_tuple_payload(GOLDEN_V4_TCP) == GOLDEN_V4_TCP_TUPLE
    assert nl.decode_tuple(GOLDEN_V4_TCP_TUPLE, 0, 48) == GOLDEN_V4_TCP
    assert nl.tuple_key(GOLDEN_V4_TCP) == GOLDEN_V4_TCP_TUPLE
    zone_attr = bytes.fromhex("0600120000050000")  # CTA_ZONE be16 5 + pad
    assert nl.tuple_key(GOLDEN_V4_TCP, 5) == GOLDEN_V4_TCP_TUPLE + zone_attr


@LITTLE_ENDIAN
def test_golden_v6_and_icmp_tuple_payloads() -> None:
    v6 = make_tuple("2001:db8::1", "2001:db8::2", IPPROTO_UDP, 53, 5353)
    assert nl.encode_tuple_payload(v6) == bytes.fromhex(
        "2c000180"
        "14000300" "20010db8000000000000000000000001"
        "14000400" "20010db8000000000000000000000002"
        "1c000280" "05000100" "11000000" "06000200" "00350000" "06000300" "14e90000"
    )  # fmt: skip
    icmp = make_tuple("192.0.2.1", "203.0.113.5", IPPROTO_ICMP, icmp_id=0x1234, icmp_type=8)
    assert nl.encode_tuple_payload(icmp) == bytes.fromhex(
        "14000180" "08000100" "c0000201" "08000200" "cb007105"
        "24000280" "05000100" "01000000"
        "06000400" "12340000"  # CTA_PROTO_ICMP_ID
        "05000500" "08000000"  # CTA_PROTO_ICMP_TYPE
        "05000600" "00000000"  # CTA_PROTO_ICMP_CODE
    )  # fmt: skip
    icmp6 = make_tuple("2001:db8::1", "2001:db8::2", IPPROTO_ICMPV6, icmp_id=1, icmp_type=128)
    payload = nl.encode_tuple_payload(icmp6)
    assert len(payload) == 80
    assert payload[44:] == bytes.fromhex(
        "24000280" "05000100" "3a000000" "06000700" "00010000" "05000800" "80000000"
        "05000900" "00000000"
    )  # fmt: skip
    zoned = replace(GOLDEN_V4_TCP, zone=7)
    tuple_zone = bytes.fromhex("0600030000070000")  # CTA_TUPLE_ZONE be16 7 + pad
    assert nl.encode_tuple_payload(zoned) == GOLDEN_V4_TCP_TUPLE + tuple_zone


@LITTLE_ENDIAN
def test_golden_ct_new_message() -> None:
    entry = Entry(GOLDEN_V4_TCP, status=int(Status.CONFIRMED | Status.ASSURED), timeout=300)
    flags = nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE | nl.NLM_F_EXCL
    msg = nl.encode_ct_message(nl.CT_NEW, flags, 7, entry)
    assert nl.CT_NEW == 0x0100
    assert msg == bytes.fromhex(
        "58000000"  # nlmsg_len 88
        "0001"  # nlmsg_type IPCTNL_MSG_CT_NEW | NFNL_SUBSYS_CTNETLINK << 8
        "0506"  # flags REQUEST|ACK|EXCL|CREATE = 0x0605
        "07000000"  # seq 7
        "00000000"  # pid 0 (the kernel fills in the port id)
        "02" "00" "0000"  # nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0
        "34000180"  # CTA_TUPLE_ORIG, len 52, nested
    ) + GOLDEN_V4_TCP_TUPLE + bytes.fromhex(
        "08000300" "0000000c"  # CTA_STATUS be32 0x0c
        "08000700" "0000012c"  # CTA_TIMEOUT be32 300
    )  # fmt: skip
    assert len(msg) == 16 + 4 + 52 + 8 + 8 == 0x58


@LITTLE_ENDIAN
def test_golden_delete_dump_and_flush() -> None:
    assert nl.encode_delete(3, GOLDEN_V4_TCP, zone=5, ct_id=0xDEADBEEF) == bytes.fromhex(
        "58000000" "0201" "0500" "03000000" "00000000" "02000000"
        "34000180"
    ) + GOLDEN_V4_TCP_TUPLE + bytes.fromhex(
        "06001200" "00050000"  # CTA_ZONE 5
        "08000c00" "deadbeef"  # CTA_ID
    )  # fmt: skip
    assert nl.encode_dump_request(9, 0) == bytes.fromhex(
        "14000000" "0101" "0103" "09000000" "00000000" "00000000"
    )  # fmt: skip
    assert nl.encode_dump_request(9, AF_INET6, expectations=True)[4:6] == b"\x01\x02"
    assert nl.encode_flush(2, mark=0x42) == bytes.fromhex(
        "24000000" "0201" "0500" "02000000" "00000000" "00000000"
        "08000800" "00000042" "08001500" "ffffffff"
    )  # fmt: skip


@LITTLE_ENDIAN
def test_golden_rare_attributes() -> None:
    entry = Entry(
        GOLDEN_V4_TCP,
        labels=(1 << 3).to_bytes(16, "little"),
        helper="ftp",
        seq_adj_orig=SeqAdj(1, 2, 3),
        protoinfo=TcpInfo(int(TcpState.ESTABLISHED), 7, 7, 0x23, 0, 0x23, 0),
    )
    attrs = nl.encode_entry_attrs(entry)
    tail = attrs[52:]
    assert tail == bytes.fromhex(
        # CTA_PROTOINFO { CTA_PROTOINFO_TCP { state, wscale o/r, flags o/r } }: the 44-byte
        # payload record.parse_ct reads in one unpack.
        "30000480" "2c000180"
        "05000100" "03000000" "05000200" "07000000" "05000300" "07000000"
        "06000400" "23000000" "06000500" "23000000"
        "0c000580" "08000100" "66747000"  # CTA_HELP { CTA_HELP_NAME "ftp\0" }
        "1c000f80" "08000100" "00000001" "08000200" "00000002" "08000300" "00000003"
        "14001600" "08000000000000000000000000000000"  # CTA_LABELS, label 3
    )  # fmt: skip


# --- real kernel bytes (tests/core/data) ------------------------------------------------

KERNEL_CT = s.kernel_ct_messages()
KERNEL_EXP = s.kernel_exp_messages()


def _kernel_id(m: KernelMessage) -> str:
    e = nl.decode_entry(m.buf, m.start, m.end)
    name = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp", 33: "dccp", 47: "gre"}
    parts = [m.source.split("_")[1].split(".")[0], str(m.index), name.get(e.proto, str(e.proto))]
    if e.family == AF_INET6:
        parts.append("v6")
    if e.status and e.status & 0x30:
        parts.append("nat")
    if e.orig.zone is not None or (e.reply and e.reply.zone is not None):
        parts.append("dirzone")
    return "-".join(parts)


def kernel_entry(pred: Callable[[Entry], object]) -> Entry:
    for m in KERNEL_CT:
        e = nl.decode_entry(m.buf, m.start, m.end)
        if pred(e):
            return e
    raise AssertionError("no such entry in the capture")


def test_kernel_dump_framing() -> None:
    msgs = s.kernel_messages("kernel_ct_dump.bin")
    assert msgs[-1].mtype == nl.NLMSG_DONE
    assert all(m.mtype == nl.CT_NEW and m.flags & nl.NLM_F_MULTI for m in msgs[:-1])
    assert len(msgs) >= 10
    events = s.kernel_messages("kernel_events.bin")
    assert [(m.mtype, m.flags) for m in events] == [
        (nl.CT_NEW, nl.NLM_F_CREATE | nl.NLM_F_EXCL),  # NEW event
        (nl.CT_NEW, 0),  # UPDATE event
        (nl.CT_DELETE, 0),  # DESTROY event
    ]


@pytest.mark.parametrize("m", KERNEL_CT, ids=_kernel_id)
def test_kernel_entry_reencodes(m: KernelMessage) -> None:
    entry = nl.decode_entry(m.buf, m.start, m.end)
    attrs = nl.encode_entry_attrs(entry)
    assert nl.decode_entry(attrs, 0, len(attrs)) == entry
    assert nl.decode_entry(memoryview(m.buf), m.start, m.end) == entry


@pytest.mark.parametrize("m", KERNEL_CT, ids=_kernel_id)
def test_kernel_tuple_layout_is_what_we_encode(m: KernelMessage) -> None:
    """tuple_key() relies on our encoder emitting the kernel's exact tuple bytes."""
    for atype, a, b in nl._walk(m.buf, m.start, m.end):
        if atype in (nl.CTA_TUPLE_ORIG, nl.CTA_TUPLE_REPLY, nl.CTA_TUPLE_MASTER):
            t = nl.decode_tuple(m.buf, a, b)
            assert nl.encode_tuple_payload(t) == m.buf[a:b], (atype, t)


def test_kernel_entries_hand_checked() -> None:
    dnat = kernel_entry(lambda e: e.orig.dst == addr("203.0.113.10"))
    assert dnat.orig.dport == 80
    assert dnat.reply is not None
    assert (dnat.reply.src, dnat.reply.sport) == (addr("192.0.2.1"), 8080)
    assert dnat.status is not None and dnat.status & Status.DST_NAT
    assert dnat.mark == 0x42
    assert isinstance(dnat.protoinfo, TcpInfo) and dnat.protoinfo.state == TcpState.ESTABLISHED
    assert dnat.counters_orig is not None and dnat.counters_orig.packets >= 3
    assert dnat.timestamp_start

    snat = kernel_entry(lambda e: e.orig.src == addr("192.0.2.24"))
    assert snat.reply is not None and snat.reply.dst == addr("198.51.100.24")
    assert snat.status is not None and snat.status & Status.SRC_NAT and snat.mark == 7

    ftp = kernel_entry(lambda e: e.orig.dport == 21)
    assert ftp.helper == "ftp" and ftp.status is not None and ftp.status & Status.HELPER
    data = kernel_entry(lambda e: e.master is not None)
    assert data.master == ftp.orig and data.status is not None and data.status & Status.EXPECTED

    icmp = kernel_entry(lambda e: e.proto == IPPROTO_ICMP)
    assert icmp.label_bits() == [3] and icmp.labels is not None and len(icmp.labels) == 16
    assert icmp.reply is not None and (icmp.orig.icmp_type, icmp.reply.icmp_type) == (8, 0)

    assert kernel_entry(lambda e: e.zone == 5).orig.dport == 53
    assert kernel_entry(lambda e: e.orig.zone == 7).orig.dport == 2121
    zr = kernel_entry(lambda e: e.reply is not None and e.reply.zone == 9)
    assert zr.orig.zone is None and zr.orig.dport == 2122

    sctp = kernel_entry(lambda e: e.proto == IPPROTO_SCTP)
    assert isinstance(sctp.protoinfo, SctpInfo) and sctp.protoinfo.state == SctpState.ESTABLISHED
    gre = kernel_entry(lambda e: e.proto == IPPROTO_GRE)
    assert (gre.orig.sport, gre.orig.dport) == (0x10, 0x20)
    ipip = kernel_entry(lambda e: e.proto == 4)
    assert (ipip.orig.sport, ipip.orig.dport) == (0, 0)
    icmp6 = kernel_entry(lambda e: e.proto == IPPROTO_ICMPV6)
    assert (icmp6.orig.icmp_id, icmp6.orig.icmp_type) == (77, 128)


def test_kernel_events() -> None:
    new, update, destroy = (
        nl.decode_entry(m.buf, m.start, m.end) for m in s.kernel_messages("kernel_events.bin")
    )
    assert new.orig == update.orig == destroy.orig
    assert (new.mark, update.mark, destroy.mark) == (0, 0x99, 0x99)
    assert new.timestamp_event and new.counters_orig is None
    # DESTROY carries counters and timestamps, and TCP protoinfo with the state only.
    assert destroy.status is not None and destroy.status & Status.DYING
    assert destroy.timestamp_stop and destroy.counters_orig is not None
    assert destroy.protoinfo == TcpInfo(int(TcpState.ESTABLISHED))


def test_kernel_expectation() -> None:
    assert len(KERNEL_EXP) == 1
    m = KERNEL_EXP[0]
    assert m.mtype == nl.EXP_NEW
    exp = nl.decode_expectation(m.buf, m.start, m.end)
    assert exp.helper == "ftp"
    assert (exp.master.dport, exp.tuple.dport, exp.tuple.sport) == (21, 50000, 0)
    assert exp.mask == CtTuple(AF_INET, IPPROTO_TCP, b"\xff" * 4, b"\xff" * 4, 0, 0xFFFF)
    assert exp.timeout and exp.id is not None and exp.flags == 0 and exp.klass == 0
    msg = nl.encode_expectation(nl.EXP_NEW, 0, 0, exp)
    start, end = body_of(msg)
    assert nl.decode_expectation(msg, start, end) == exp


# --- robustness: parse it, or raise CtnetlinkError, nothing else ------------------------

_valid_entry_attrs = s.entries().map(nl.encode_entry_attrs)
_valid_messages = st.lists(s.entries(), min_size=1, max_size=3).map(
    lambda batch: b"".join(nl.encode_ct_message(nl.CT_NEW, 0, i, e) for i, e in enumerate(batch))
)
_valid_exp_attrs = s.expectations().map(
    lambda exp: nl.encode_expectation(nl.EXP_NEW, 0, 0, exp)[nl.PAYLOAD_OFFSET :]
)
_kernel_bodies = (
    st.sampled_from([m.body for m in KERNEL_CT + KERNEL_EXP]) if KERNEL_CT else st.nothing()
)
_kernel_datagrams = (
    st.sampled_from(sorted({m.buf for m in KERNEL_CT + KERNEL_EXP})) if KERNEL_CT else st.nothing()
)

#: Everything the decoders get fed: random bytes, random attribute trees, and mutations
#: of valid encodings and of real kernel messages.
fuzz_attrs = st.one_of(
    st.binary(max_size=300),
    s.tlv_trees(),
    s.mutated(_valid_entry_attrs),
    s.mutated(_valid_exp_attrs),
    s.mutated(_kernel_bodies),
)


def _accepts_or_ctnetlink_error(fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(CtnetlinkError):
        fn(*args)


@FUZZ
@given(st.one_of(st.binary(max_size=200), s.mutated(_valid_messages), s.mutated(_kernel_datagrams)))
@example(b"\x10\x00\x00\x00" + bytes(12))
@example(b"\xff\xff\xff\xff" + bytes(12))
def test_fuzz_iter_messages(buf: bytes) -> None:
    try:
        for _mtype, _flags, _seq, _pid, start, end in nl.iter_messages(buf):
            assert nl.NLMSG_HDRLEN <= start <= end <= len(buf)
    except CtnetlinkError:
        pass


@FUZZ
@given(st.binary(max_size=120), st.data())
def test_fuzz_iter_messages_length_and_decode_error(buf: bytes, data: st.DataObject) -> None:
    length = data.draw(st.integers(0, len(buf)))
    _accepts_or_ctnetlink_error(lambda: list(nl.iter_messages(buf, length)))
    start = data.draw(st.integers(0, len(buf)))
    end = data.draw(st.integers(start, len(buf)))
    _accepts_or_ctnetlink_error(nl.decode_error, buf, start, end)


@FUZZ
@given(fuzz_attrs)
def test_fuzz_decode_entry(buf: bytes) -> None:
    _accepts_or_ctnetlink_error(nl.decode_entry, buf, 0, len(buf))
    _accepts_or_ctnetlink_error(nl.decode_entry, memoryview(buf), 0, len(buf))


@FUZZ
@given(fuzz_attrs)
def test_fuzz_decode_expectation(buf: bytes) -> None:
    _accepts_or_ctnetlink_error(nl.decode_expectation, buf, 0, len(buf))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=120),
        s.tlv_trees(),
        s.mutated(s.ct_tuples().map(nl.encode_tuple_payload)),
    )
)
def test_fuzz_decode_tuple_and_key(buf: bytes) -> None:
    _accepts_or_ctnetlink_error(nl.decode_tuple, buf, 0, len(buf))
    _accepts_or_ctnetlink_error(nl.decode_key, buf)


@FUZZ
@given(s.entries())
def test_fuzz_every_truncation_of_an_entry(entry: Entry) -> None:
    """Each prefix of a valid encoding decodes or raises CtnetlinkError."""
    attrs = nl.encode_entry_attrs(entry)
    for cut in range(0, len(attrs), 3):
        _accepts_or_ctnetlink_error(nl.decode_entry, attrs, 0, cut)
