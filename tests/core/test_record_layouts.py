"""parse_ct's learned whole-message layouts give exactly what the attribute walk gives."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

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
    if proto == IPPROTO_TCP and draw(st.booleans()):
        flags = st.integers(0, 255)
        info = TcpInfo(draw(st.integers(0, 9)), draw(st.integers(0, 14)),
                       draw(st.integers(0, 14)), draw(flags), 0, draw(flags), 0)  # fmt: skip
    optional = st.none() | st.integers(0, 2**32 - 1)
    counters = st.none() | st.builds(Counters, st.integers(0, 2**40), st.integers(0, 2**40))
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
    )  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(kernel_like())
def test_learned_layout_equals_the_walk(entry: Entry) -> None:
    body = nl.encode_entry_attrs(entry)
    expected = r._parse_walk(body, 0, len(body))
    assert r.parse_ct(body, 0, len(body)) == expected  # may learn the layout
    assert r.parse_ct(body, 0, len(body)) == expected  # may use it


@settings(max_examples=200, deadline=None)
@given(kernel_like(), st.integers(0, 300), st.integers(0, 255))
def test_a_corrupted_message_of_a_known_layout_is_not_misread(
    entry: Entry, where: int, value: int
) -> None:
    """Same length as a learned layout, other bytes: fast path and walk agree (or both
    raise the protocol error)."""
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
    r._LAYOUTS.clear()
    r._UNLEARNABLE.clear()
    r.parse_ct(body, 0, len(body))
    (layout,) = r._LAYOUTS[len(body)]
    other = nl.encode_entry_attrs(replace(entry, mark=5, id=9))
    assert layout.parse(other, 0) == r._parse_walk(other, 0, len(other))
