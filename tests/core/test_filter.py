"""accept-protocol / ignore-address / TCP state filters, with conntrackd's semantics."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctsync.core import record
from ctsync.core.entry import (
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Entry,
    Status,
    TcpInfo,
    TcpState,
    make_tuple,
)
from ctsync.core.filter import EntryFilter, parse_protocol, parse_tcp_state


def rec(entry: Entry) -> tuple[bytes, bytes]:
    return record.from_entry(entry)


def tcp_entry(src: str, dst: str, state: int = TcpState.ESTABLISHED) -> Entry:
    orig = make_tuple(src, dst, IPPROTO_TCP, 40000, 443)
    return Entry(orig, orig.inverted(), status=8, protoinfo=TcpInfo(state))


def test_protocol_names_follow_vyos() -> None:
    assert parse_protocol("tcp") == IPPROTO_TCP
    assert parse_protocol("UDP") == IPPROTO_UDP
    assert parse_protocol("icmp6") == IPPROTO_ICMPV6
    assert parse_protocol("ipv6-icmp") == IPPROTO_ICMPV6
    assert parse_protocol("132") == 132
    with pytest.raises(ValueError, match="unknown protocol 'tpc'"):
        parse_protocol("tpc")


def test_tcp_state_names() -> None:
    assert parse_tcp_state("established") == TcpState.ESTABLISHED
    assert parse_tcp_state("time-wait") == TcpState.TIME_WAIT
    with pytest.raises(ValueError, match="unknown TCP state"):
        parse_tcp_state("OPEN")


def test_bad_address_names_the_value() -> None:
    with pytest.raises(ValueError, match=r"'192\.0\.2\.300'"):
        EntryFilter.build(ignore_addresses=["192.0.2.300"])


def test_accept_protocol() -> None:
    f = EntryFilter.build(accept_protocols=["udp"])
    udp = make_tuple("192.0.2.2", "203.0.113.1", IPPROTO_UDP, 5000, 53)
    assert f.accepts(*rec(Entry(udp, status=8)))
    assert not f.accepts(*rec(tcp_entry("192.0.2.2", "203.0.113.1")))


@pytest.mark.parametrize(
    ("src", "dst", "ignored"),
    [
        ("198.51.100.1", "203.0.113.1", True),  # from the firewall itself
        ("192.0.2.2", "198.51.100.1", True),  # to the firewall itself (reply source)
        ("192.0.2.2", "198.51.100.77", True),  # reply source inside the ignored /26
        ("192.0.2.2", "203.0.113.1", False),
        ("2001:db8:ff::5", "2001:db8:1::1", True),
        ("2001:db8:1::5", "2001:db8:2::1", False),
    ],
)
def test_ignore_address_matches_orig_src_or_reply_src(src: str, dst: str, ignored: bool) -> None:
    f = EntryFilter.build(ignore_addresses=["198.51.100.1", "198.51.100.64/26", "2001:db8:ff::/48"])
    assert f.accepts(*rec(tcp_entry(src, dst))) is not ignored


def test_ignore_address_does_not_match_masqueraded_reply_destination() -> None:
    """A masqueraded flow has the firewall as reply destination: it must still sync."""
    f = EntryFilter.build(ignore_addresses=["198.51.100.1"])
    orig = make_tuple("192.0.2.2", "203.0.113.1", IPPROTO_TCP, 40000, 443)
    reply = make_tuple("203.0.113.1", "198.51.100.1", IPPROTO_TCP, 443, 40000)
    nat = Entry(orig, reply, status=int(Status.CONFIRMED | Status.SRC_NAT))
    assert f.accepts(*rec(nat))


def test_dnat_reply_source_is_checked() -> None:
    f = EntryFilter.build(ignore_addresses=["198.51.100.2"])
    orig = make_tuple("192.0.2.2", "203.0.113.10", IPPROTO_TCP, 40000, 80)
    reply = make_tuple("198.51.100.2", "192.0.2.2", IPPROTO_TCP, 8080, 40000)
    assert not f.accepts(*rec(Entry(orig, reply, status=int(Status.CONFIRMED | Status.DST_NAT))))


def test_tcp_states_only_affect_tcp() -> None:
    f = EntryFilter.build(tcp_states=["ESTABLISHED", "TIME_WAIT"])
    assert f.accepts(*rec(tcp_entry("192.0.2.2", "203.0.113.1")))
    assert not f.accepts(*rec(tcp_entry("192.0.2.2", "203.0.113.1", TcpState.SYN_SENT)))
    udp = make_tuple("192.0.2.2", "203.0.113.1", IPPROTO_UDP, 5000, 53)
    assert f.accepts(*rec(Entry(udp, status=8)))


def test_empty_filter_accepts_everything() -> None:
    f = EntryFilter.build()
    assert f.accepts_all
    assert f.accepts(*rec(tcp_entry("198.51.100.1", "203.0.113.1", TcpState.CLOSE)))


_v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


@st.composite
def _networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if draw(st.booleans()):
        return ipaddress.ip_network(f"{draw(_v4)}/{draw(st.integers(0, 32))}", strict=False)
    return ipaddress.ip_network(f"{draw(_v6)}/{draw(st.integers(0, 128))}", strict=False)


@given(
    st.lists(_networks(), max_size=6),
    st.lists(st.one_of(_v4, _v6), min_size=1, max_size=10),
    st.data(),
)
@settings(max_examples=300, deadline=None)
def test_address_ignored_matches_ipaddress(
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    data: st.DataObject,
) -> None:
    """The compiled prefix sets (byte-aligned and shifted) answer as ipaddress does,
    /0 and host routes included; addresses inside some network are drawn too."""
    inside = [net[data.draw(st.integers(0, net.num_addresses - 1))] for net in networks]
    f = EntryFilter.build(ignore_addresses=[str(n) for n in networks])
    for address in [*addresses, *inside]:
        expected = any(address.version == n.version and address in n for n in networks)
        assert f.address_ignored(address.packed) is expected, (address, networks)
