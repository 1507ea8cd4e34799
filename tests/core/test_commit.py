"""Commit messages follow the kernel's rules, and the fast path equals the generic one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctsync.core import commit, record
from ctsync.core import ctnetlink as nl
from ctsync.core.entry import (
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_FLAG_BE_LIBERAL,
    TCP_FLAG_CLOSE_INIT,
    TCP_FLAG_SACK_PERM,
    TCP_FLAG_WINDOW_SCALE,
    Entry,
    NatRange,
    Status,
    TcpInfo,
    TcpState,
    addr,
    bits_to_labels,
    make_tuple,
)


def decoded(message: bytes) -> Entry:
    (mtype, flags, _seq, _pid, start, end), *rest = list(nl.iter_messages(message))
    assert not rest
    assert mtype == nl.CT_NEW
    assert flags & nl.NLM_F_CREATE and not flags & nl.NLM_F_EXCL
    return nl.decode_entry(message, start + nl.NFGEN_HDRLEN, end)


def masqueraded_dnat() -> Entry:
    orig = make_tuple("192.0.2.2", "203.0.113.10", IPPROTO_TCP, 40000, 80)
    reply = make_tuple("198.51.100.2", "198.51.100.1", IPPROTO_TCP, 8080, 31001)
    status = Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED | Status.SRC_NAT
    status |= Status.DST_NAT | Status.SRC_NAT_DONE | Status.DST_NAT_DONE | Status.EXPECTED
    return Entry(
        orig, reply, status=int(status), timeout=431999, mark=0x42, id=99,
        protoinfo=TcpInfo(TcpState.ESTABLISHED, 7, 9, TCP_FLAG_WINDOW_SCALE | 0x20, 0, 0x23, 0),
    )  # fmt: skip


def test_nat_is_rebuilt_from_the_reply_tuple() -> None:
    key, value = record.from_entry(masqueraded_dnat())
    sent = decoded(commit.commit_message(key, value, 1))
    orig = masqueraded_dnat().orig
    assert sent.reply == orig.inverted()  # the kernel applies NAT to the inverse
    assert sent.nat_src == NatRange(addr("198.51.100.1"), addr("198.51.100.1"), 31001, 31001)
    assert sent.nat_dst == NatRange(addr("198.51.100.2"), addr("198.51.100.2"), 8080, 8080)


def test_status_is_confirmed_never_expected_nor_nat_bits() -> None:
    key, value = record.from_entry(masqueraded_dnat())
    sent = decoded(commit.commit_message(key, value, 1))
    assert sent.status == Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED


def test_tcp_tracking_is_relaxed_and_window_scale_kept() -> None:
    key, value = record.from_entry(masqueraded_dnat())
    info = decoded(commit.commit_message(key, value, 1)).protoinfo
    assert isinstance(info, TcpInfo)
    assert (info.state, info.wscale_orig, info.wscale_reply) == (TcpState.ESTABLISHED, 7, 9)
    base = TCP_FLAG_BE_LIBERAL | TCP_FLAG_SACK_PERM
    assert info.flags_orig == info.mask_orig == base | TCP_FLAG_WINDOW_SCALE
    assert info.flags_reply == info.mask_reply == base | TCP_FLAG_WINDOW_SCALE


def test_closing_connections_get_close_init() -> None:
    entry = Entry(make_tuple("192.0.2.2", "203.0.113.1", IPPROTO_TCP, 1, 2), status=8,
                  timeout=100, protoinfo=TcpInfo(TcpState.TIME_WAIT))  # fmt: skip
    info = decoded(commit.commit_message(*record.from_entry(entry), 1)).protoinfo
    assert isinstance(info, TcpInfo)
    assert info.flags_orig is not None and info.flags_orig & TCP_FLAG_CLOSE_INIT


def test_timeout_is_always_sent() -> None:
    entry = Entry(make_tuple("192.0.2.2", "203.0.113.1", IPPROTO_UDP, 1, 2), status=8)
    key, value = record.from_entry(entry)
    assert decoded(commit.commit_message(key, value, 1)).timeout == 1
    assert decoded(commit.commit_message(key, value, 1, timeout=180)).timeout == 180


def test_update_without_nat() -> None:
    key, value = record.from_entry(masqueraded_dnat())
    sent = decoded(commit.commit_message(key, value, 1, with_nat=False))
    assert sent.nat_src is None and sent.nat_dst is None


def test_rare_attributes_take_the_generic_path() -> None:
    entry = Entry(
        make_tuple("2001:db8:1::2", "2001:db8:2::2", IPPROTO_TCP, 1000, 21),
        status=8, timeout=300, mark=1, zone=5, labels=bits_to_labels([3, 100]), helper="ftp",
        protoinfo=TcpInfo(TcpState.ESTABLISHED),
    )  # fmt: skip
    sent = decoded(commit.commit_message(*record.from_entry(entry), 7))
    assert (sent.zone, sent.helper, sent.label_bits()) == (5, "ftp", [3, 100])


def test_icmp_nat_uses_the_id_as_port() -> None:
    orig = make_tuple("192.0.2.2", "203.0.113.1", IPPROTO_ICMP, icmp_id=7, icmp_type=8)
    reply = make_tuple("203.0.113.1", "198.51.100.1", IPPROTO_ICMP, icmp_id=9, icmp_type=0)
    snat, dnat = commit.nat_bindings(orig, reply)
    assert dnat is None
    assert snat == NatRange(addr("198.51.100.1"), addr("198.51.100.1"), 9, 9)


addresses4 = st.sampled_from(["192.0.2.2", "192.0.2.9", "198.51.100.1", "203.0.113.7"])
ports = st.integers(0, 65535)


@given(
    src=addresses4, dst=addresses4, rsrc=addresses4, rdst=addresses4,
    sport=ports, dport=ports, rsport=ports, rdport=ports,
    proto=st.sampled_from([IPPROTO_TCP, IPPROTO_UDP, 132, 33]),
    status=st.integers(0, 0xFFFF), timeout=st.integers(0, 2**32 - 1),
    mark=st.integers(0, 2**32 - 1),
    state=st.integers(0, 9), wscale=st.integers(0, 14), flags=st.integers(0, 255),
    six=st.booleans(),
)  # fmt: skip
def test_fast_path_equals_generic_encoding(
    src: str, dst: str, rsrc: str, rdst: str, sport: int, dport: int, rsport: int,
    rdport: int, proto: int, status: int, timeout: int, mark: int, state: int, wscale: int,
    flags: int, six: bool,
) -> None:  # fmt: skip
    if six:
        src, dst, rsrc, rdst = (f"2001:db8::{a.split('.')[-1]}" for a in (src, dst, rsrc, rdst))
    orig = make_tuple(src, dst, proto, sport, dport)
    reply = make_tuple(rsrc, rdst, proto, rsport, rdport)
    if reply != orig.inverted():
        status |= Status.SRC_NAT
    info = TcpInfo(state, wscale, wscale, flags, 0, flags, 0) if proto == IPPROTO_TCP else None
    entry = Entry(orig, reply, status=status, timeout=timeout, mark=mark, protoinfo=info)
    key, value = record.from_entry(entry)
    for with_nat in (True, False):
        for override in (None, 1, 300):  # the record's timeout, or a commit-wide one
            fast = commit.commit_message(key, value, 5, timeout=override, with_nat=with_nat)
            generic_entry = commit.commit_entry(
                record.to_entry(key, value), override, with_nat=with_nat
            )
            generic = nl.encode_ct_message(nl.CT_NEW, commit.COMMIT_FLAGS, 5, generic_entry)
            assert fast == generic


def test_malformed_record_raises_protocol_error() -> None:
    with pytest.raises(nl.CtnetlinkError):
        commit.commit_message(b"\x01garbage", b"\x00" * 3, 1)
