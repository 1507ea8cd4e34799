"""parse_ct's learned whole-message layouts give exactly what the attribute walk gives."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctsync.core import ctnetlink as nl
from ctsync.core import record as r
from ctsync.core.entry import (
    IPPROTO_GRE,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Counters,
    Entry,
    Status,
    Synproxy,
    TcpInfo,
    make_tuple,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _fresh_layouts() -> Iterator[None]:
    """record's layout caches are module state: each test starts without layouts and
    leaves the caches as it found them."""
    saved = dict(r._LAYOUTS), dict(r._UNLEARNABLE)
    _forget_layouts()
    yield
    _forget_layouts()
    r._LAYOUTS.update(saved[0])
    r._UNLEARNABLE.update(saved[1])


def _forget_layouts() -> None:
    r._LAYOUTS.clear()
    r._UNLEARNABLE.clear()


def _fast(body: bytes | bytearray) -> r.Parsed | None:
    """What the learned layouts of this length make of a message (None: no layout does)."""
    for layout in r._LAYOUTS.get(len(body), []):
        parts = layout.parse(body, 0, len(body))
        if parts is not None:
            return parts
    return None


v4 = st.sampled_from(["192.0.2.1", "192.0.2.77", "198.51.100.1", "203.0.113.9"])
v6 = st.sampled_from(["2001:db8::1", "2001:db8:1::ff", "2001:db8:2::2"])
port = st.integers(0, 65535)


@st.composite
def kernel_like(draw: st.DrawFn) -> Entry:
    """Entries shaped like the ones the fast path learns: ports protocols, with the
    attributes events and dumps carry, sometimes NATed, sometimes with a live synproxy."""
    addrs = draw(st.sampled_from([v4, v6]))
    proto = draw(st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_GRE]))
    orig = make_tuple(draw(addrs), draw(addrs), proto, draw(port), draw(port))
    nat = draw(st.booleans())
    reply = (
        make_tuple(draw(addrs), draw(addrs), proto, draw(port), draw(port))
        if nat
        else orig.inverted()
    )
    status = draw(st.integers(0, 0xFFFF)) | int(Status.CONFIRMED)
    if nat:
        status |= int(Status.SRC_NAT)
    else:
        status &= ~int(Status.SRC_NAT | Status.DST_NAT)
    info = None
    form = draw(st.sampled_from(["none", "full", "destroy"]))
    if proto == IPPROTO_TCP and form == "full":
        flags = st.integers(0, 255)
        info = TcpInfo(draw(st.integers(0, 9)), draw(st.integers(0, 14)),
                       draw(st.integers(0, 14)), draw(flags), 0, draw(flags), 0)  # fmt: skip
    elif proto == IPPROTO_TCP and form == "destroy":
        info = TcpInfo(draw(st.integers(0, 255)))  # a DESTROY event's: the state alone
    optional = st.none() | st.integers(0, 2**32 - 1)
    counters = st.none() | st.builds(Counters, st.integers(0, 2**40), st.integers(0, 2**40))
    stamp = draw(st.none() | st.integers(0, 2**63))  # a DESTROY event's CTA_TIMESTAMP
    synproxy = (
        st.none()
        | st.just(Synproxy(0, 0, 0))
        | st.builds(Synproxy, st.integers(0, 9), st.integers(0, 9), st.integers(0, 9))
    )
    return Entry(
        orig, reply, status=status, timeout=draw(optional), mark=draw(optional),
        id=draw(optional), use=draw(optional), protoinfo=info,
        counters_orig=draw(counters), counters_reply=draw(counters),
        synproxy=draw(synproxy), timestamp_event=draw(st.none() | st.integers(0, 2**63)),
        timestamp_start=stamp, timestamp_stop=stamp,
    )  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(kernel_like())
def test_learned_layout_equals_the_walk(entry: Entry) -> None:
    _forget_layouts()
    body = nl.encode_entry_attrs(entry)
    expected = r._parse_walk(body, 0, len(body))
    assert r.parse_ct(body, 0, len(body)) == expected  # learns the layout
    assert r.parse_ct(body, 0, len(body)) == expected  # uses it
    if entry.synproxy is None or entry.synproxy == Synproxy(0, 0, 0):
        assert _fast(body) == expected  # every such kernel layout is learned


@settings(max_examples=400, deadline=None)
@given(kernel_like(), st.integers(0, 300), st.integers(0, 255))
def test_a_corrupted_message_of_a_known_layout_is_not_misread(
    entry: Entry, where: int, value: int
) -> None:
    """Same length as a learned layout, other bytes: fast path and walk agree (or both
    raise the protocol error)."""
    _forget_layouts()
    body = bytearray(nl.encode_entry_attrs(entry))
    r.parse_ct(bytes(body), 0, len(body))  # learn it
    body[where % len(body)] = value
    try:
        expected: r.Parsed | None = r._parse_walk(body, 0, len(body))
    except nl.CtnetlinkError:
        expected = None
    try:
        got: r.Parsed | None = r.parse_ct(body, 0, len(body))
    except nl.CtnetlinkError:
        got = None
    assert got == expected


def test_kernel_captures_parse_the_same_both_ways() -> None:
    for name in ("kernel_ct_dump.bin", "kernel_events.bin"):
        data = (DATA / name).read_bytes()
        for mtype, _f, _s, _p, start, end in nl.iter_messages(data):
            if mtype not in (nl.CT_NEW, nl.CT_DELETE):
                continue
            body = data[start + nl.NFGEN_HDRLEN : end]
            expected = r._parse_walk(body, 0, len(body))
            assert r.parse_ct(body, 0, len(body)) == expected
            assert r.parse_ct(body, 0, len(body)) == expected


def test_a_tcp_event_takes_the_fast_path() -> None:
    orig = make_tuple("192.0.2.2", "203.0.113.10", IPPROTO_TCP, 40000, 80)
    info = TcpInfo(3, 7, 7, 0x23, 0, 0x23, 0)
    entry = Entry(orig, orig.inverted(), status=0x18E, timeout=431999, mark=0, id=7,
                  protoinfo=info, synproxy=Synproxy(0, 0, 0))  # fmt: skip
    body = nl.encode_entry_attrs(entry)
    r.parse_ct(body, 0, len(body))
    (layout,) = r._LAYOUTS[len(body)]
    other = nl.encode_entry_attrs(replace(entry, mark=5, id=9))
    assert layout.parse(other, 0, len(other)) == r._parse_walk(other, 0, len(other))


# DESTROY events the kernel (6.18) sent for a `conntrack -F`: TCP v4 and v6 entries (the
# protoinfo is the state alone), a SNATed one (reply not the inverse), a UDP one, and a TCP
# one with nf_conntrack_acct and nf_conntrack_timestamp on (counters, start/stop, event).
KERNEL_DESTROYS = [
    "340001801400018008000100c000020108000200cb0071011c00028005000100060000000600020003ea"
    "00000600030000500000340002801400018008000100cb00710108000200c63364091c00028005000100"
    "060000000600020000500000060003001388000008000c00e0e3b487080003000000020e080007000000"
    "0064100004800c0001800500010003000000",
    "340001801400018008000100c000020108000200cb0071011c00028005000100060000000600020003e9"
    "00000600030000500000340002801400018008000100cb00710108000200c00002011c00028005000100"
    "0600000006000200005000000600030003e9000008000c00c677f1a80800030000000208080007000000"
    "0063100004800c00018005000100030000000800080000000007",
    "4c0001802c0001801400030020010db80000000000000000000000011400040020010db8000000000000"
    "0000000000021c00028005000100060000000600020003e8000006000300005000004c0002802c000180"
    "1400030020010db80000000000000000000000021400040020010db80000000000000000000000011c00"
    "0280050001000600000006000200005000000600030003e8000008000c006e21dd490800030000000208"
    "0800070000000063100004800c0001800500010003000000",
    "340001801400018008000100c000020108000200cb0071011c00028005000100110000000600020003e8"
    "00000600030000350000340002801400018008000100cb00710108000200c00002011c00028005000100"
    "1100000006000200003500000600030003e8000008000c0046aa4bb10800030000000208080007000000"
    "0063",
    "340001801400018008000100c000020108000200cb0071011c00028005000100060000000600020003e8"
    "00000600030000500000340002801400018008000100cb00710108000200c00002011c00028005000100"
    "0600000006000200005000000600030003e8000008000c00277c9842080003000000020e080007000000"
    "00631c0009800c00010000000000000000000c00020000000000000000001c000a800c00010000000000"
    "000000000c00020000000000000000001c0014800c00010018ea2f44746cd9690c00020018ea2f4474df"
    "570c100004800c00018005000100030000000c001b0018ea2f4474df5776",
]


@pytest.mark.parametrize("hexed", KERNEL_DESTROYS)
def test_kernel_destroy_events_take_a_learned_layout(hexed: str) -> None:
    body = bytes.fromhex(hexed)
    expected = r._parse_walk(body, 0, len(body))
    assert r.parse_ct(body, 0, len(body)) == expected
    assert _fast(body) == expected
    assert r.parse_ct(body, 0, len(body)) == expected
    # another entry of the same layout: other addresses, ports, state, id
    other = bytearray(body)
    other[12] ^= 0x01  # orig source address, first byte
    other[40 if body[0] == 52 else 64] ^= 0x10  # orig source port (v4 / v6 tuple)
    assert _fast(other) == r._parse_walk(other, 0, len(other)) != expected


def test_destroy_tcp_protoinfo_is_the_state_with_zero_scales_and_flags() -> None:
    body = bytes.fromhex(KERNEL_DESTROYS[0])
    r.parse_ct(body, 0, len(body))
    parts = _fast(body)
    assert parts is not None
    assert parts[1] == r.P_ALL_FIXED & ~r.P_MARK  # no CTA_MARK in this one
    assert parts[6] == r.VAL_TCP
    assert parts[7] == bytes([3, 0, 0, 0, 0, 0, 0])  # ESTABLISHED
    assert parts[8] == b""  # no NAT status bits: no compact reply


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("nat", [0, int(Status.SRC_NAT), int(Status.DST_NAT)])
@pytest.mark.parametrize("mark", [None, 0, 7])
def test_codec_built_destroy_layouts(v6: bool, nat: int, mark: int | None) -> None:
    """DESTROY-shaped TCP messages, NATed or not: the layout gives the walk's parts,
    with the compact reply exactly when a NAT bit is set."""
    a, b, c = ("2001:db8::1", "2001:db8::2", "2001:db8:9::9") if v6 else (
        "192.0.2.1", "203.0.113.1", "198.51.100.9")  # fmt: skip
    orig = make_tuple(a, b, IPPROTO_TCP, 1000, 80)
    reply = make_tuple(b, c, IPPROTO_TCP, 80, 5000) if nat else orig.inverted()
    entry = Entry(orig, reply, status=0x20E | nat, timeout=0, mark=mark, id=99,
                  protoinfo=TcpInfo(7))  # fmt: skip
    body = nl.encode_entry_attrs(entry)
    expected = r._parse_walk(body, 0, len(body))
    assert r.parse_ct(body, 0, len(body)) == expected
    assert _fast(body) == expected
    assert bool(expected[6] & r.VAL_REPLY) is bool(nat)
    back = r.to_entry(expected[0], r.value_from_parts(expected))
    assert back.reply == reply
    assert back.protoinfo == TcpInfo(7, 0, 0, 0, 0, 0, 0)


def _learned_v4_tcp() -> bytes:
    orig = make_tuple("192.0.2.2", "203.0.113.10", IPPROTO_TCP, 40000, 80)
    entry = Entry(orig, orig.inverted(), status=0x18E, timeout=5, mark=0, id=7,
                  protoinfo=TcpInfo(3, 7, 7, 0x23, 0, 0x23, 0))  # fmt: skip
    body = nl.encode_entry_attrs(entry)
    r.parse_ct(body, 0, len(body))
    assert _fast(body) is not None
    return body


@pytest.mark.parametrize("proto", [1, 4, 17, 132])
def test_a_reply_of_another_protocol_is_left_to_the_walk(proto: int) -> None:
    """No NAT bit, reply tuple with another protocol number: the walk keeps a reply that
    is not a ports tuple as a raw rare attribute; the layout must not drop it."""
    body = bytearray(_learned_v4_tcp())
    at = 52 + 4 + 20 + 4 + 4  # the reply tuple's CTA_PROTO_NUM value
    assert body[at] == IPPROTO_TCP
    body[at] = proto
    assert r.parse_ct(body, 0, len(body)) == r._parse_walk(body, 0, len(body))


def test_a_layout_is_not_learned_from_a_repeated_attribute() -> None:
    body = _learned_v4_tcp() + nl.attr_be32(nl.CTA_MARK, 5) + nl.attr_be32(nl.CTA_MARK, 6)
    assert r._Layout.learn(body, 0, len(body)) is None
    assert r.parse_ct(body, 0, len(body)) == r._parse_walk(body, 0, len(body))
    assert r.parse_ct(body, 0, len(body))[4] == 6  # the last one, as the walk does


def test_a_synproxy_without_the_nested_flag_is_not_learned() -> None:
    """The walk drops only a zero synproxy with the kernel's exact header."""
    plain = nl.attr(nl.CTA_SYNPROXY, r._ZERO_SYNPROXY[4:])
    body = _learned_v4_tcp() + plain
    assert r._Layout.learn(body, 0, len(body)) is None
    parts = r.parse_ct(body, 0, len(body))
    assert parts == r._parse_walk(body, 0, len(body))
    assert parts[6] & r.VAL_RARE


def _outcome(body: bytearray) -> r.Parsed | None:
    try:
        return r.parse_ct(body, 0, len(body))
    except nl.CtnetlinkError:
        return None


def _walk_outcome(body: bytearray) -> r.Parsed | None:
    try:
        return r._parse_walk(body, 0, len(body))
    except nl.CtnetlinkError:
        return None


def _new_events() -> list[str]:
    """NEW-shaped messages: full TCP protoinfo, zero synproxy, NAT, mark; v4 and v6."""
    out = []
    for a, b, c in (("192.0.2.1", "203.0.113.1", "198.51.100.9"),
                    ("2001:db8::1", "2001:db8::2", "2001:db8:9::9")):  # fmt: skip
        orig = make_tuple(a, b, IPPROTO_TCP, 1000, 80)
        reply = make_tuple(b, c, IPPROTO_TCP, 80, 5000)
        info = TcpInfo(3, 7, 7, 0x23, 0, 0x23, 0)
        entry = Entry(orig, reply, status=0x1BE, timeout=5, mark=3, id=7, protoinfo=info,
                      synproxy=Synproxy(0, 0, 0), use=1)  # fmt: skip
        out.append(nl.encode_entry_attrs(entry).hex())
        udp = make_tuple(a, b, IPPROTO_UDP, 1000, 53)
        out.append(nl.encode_entry_attrs(Entry(udp, udp.inverted(), status=8, id=1)).hex())
    return out


@pytest.mark.parametrize("hexed", KERNEL_DESTROYS[::2] + _new_events())
def test_every_byte_of_a_learned_message_changed(hexed: str) -> None:
    """Each byte of a learned message set to a few other values: the layout answers as the
    walk does (headers of nested attributes included), or leaves it to the walk."""
    body = bytes.fromhex(hexed)
    r.parse_ct(body, 0, len(body))
    assert _fast(body) is not None
    for at in range(len(body)):
        for value in {body[at] ^ 0x01, body[at] ^ 0x80, 0x00, 0xFF} - {body[at]}:
            changed = bytearray(body)
            changed[at] = value
            assert _outcome(changed) == _walk_outcome(changed), (at, value)


def test_a_live_synproxy_is_not_learned_a_zero_one_of_that_length_is() -> None:
    orig = make_tuple("192.0.2.2", "203.0.113.10", IPPROTO_TCP, 40000, 80)
    info = TcpInfo(3, 7, 7, 0x23, 0, 0x23, 0)
    live = Entry(orig, orig.inverted(), 0x18E, 5, id=7, protoinfo=info, synproxy=Synproxy(1, 2, 3))
    zero = replace(live, synproxy=Synproxy(0, 0, 0))
    live_body = nl.encode_entry_attrs(live)
    zero_body = nl.encode_entry_attrs(zero)
    assert len(live_body) == len(zero_body)
    for _ in range(3):
        assert r.parse_ct(live_body, 0, len(live_body)) == r._parse_walk(
            live_body, 0, len(live_body)
        )
    assert len(live_body) not in r._LAYOUTS
    expected = r._parse_walk(zero_body, 0, len(zero_body))
    assert r.parse_ct(zero_body, 0, len(zero_body)) == expected
    assert _fast(zero_body) == expected
    assert _fast(live_body) is None  # the layout leaves a live synproxy to the walk
