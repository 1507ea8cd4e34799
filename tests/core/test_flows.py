"""Flow discovery, pure part: flow keys, the collector, prefix covers, summaries, renderers.

The CLI is driven with a fake observation (no netlink) to check options, filters and
output formats end to end.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ctsync.cli import flows_cmd
from ctsync.cli.main import cli
from ctsync.core.entry import (
    AF_INET,
    AF_INET6,
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CtTuple,
    Entry,
    Status,
    addr,
    make_tuple,
)
from ctsync.core.flows import (
    Cover,
    Flow,
    FlowCollector,
    FlowFilter,
    FlowKey,
    ObservationInfo,
    PortRange,
    collapse_port,
    cover_prefixes,
    flow_key,
    hook_of,
    nft_rule,
    render_nft,
    render_text,
    summarize,
    summary_to_json,
)

SEEN = int(Status.SEEN_REPLY | Status.CONFIRMED)
ASSURED = int(Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED)
UNREPLIED = int(Status.CONFIRMED)
HIGH = PortRange(1025, 65535)


def tcp(src: str, dst: str, sport: int, dport: int, status: int = ASSURED, **kw: object) -> Entry:
    orig = make_tuple(src, dst, IPPROTO_TCP, sport, dport)
    return Entry(orig, reply=orig.inverted(), status=status, **kw)  # type: ignore[arg-type]


def udp(src: str, dst: str, sport: int, dport: int, status: int = SEEN) -> Entry:
    orig = make_tuple(src, dst, IPPROTO_UDP, sport, dport)
    return Entry(orig, reply=orig.inverted(), status=status)


def icmp(src: str, dst: str, icmp_id: int, icmp_type: int = 8, status: int = SEEN) -> Entry:
    proto = IPPROTO_ICMPV6 if ":" in src else IPPROTO_ICMP
    orig = make_tuple(src, dst, proto, icmp_id=icmp_id, icmp_type=icmp_type, icmp_code=0)
    return Entry(orig, reply=orig.inverted(), status=status)


def dnat(entry: Entry, to: str, port: int, snat: str | None = None) -> Entry:
    """``entry`` DNATed to to:port (and SNATed to ``snat``), as the kernel reports it."""
    assert entry.reply is not None
    reply = replace(entry.reply, src=addr(to), sport=port)
    status = int(entry.status or 0) | Status.DST_NAT
    if snat is not None:
        reply = replace(reply, dst=addr(snat))
        status |= Status.SRC_NAT
    return replace(entry, reply=reply, status=status)


def key_of(entry: Entry) -> bytes:
    """A connection id for the collector (the real one is the record key)."""
    return repr((entry.orig, entry.zone)).encode()


def collect(entries: Iterable[Entry], **kw: object) -> FlowCollector:
    collector = FlowCollector(**kw)  # type: ignore[arg-type]
    for entry in entries:
        collector.observe(key_of(entry), entry)
    return collector


# --------------------------------------------------------------------------- flow keys


def test_client_ports_collapse_above_1024_and_privileged_ports_stay() -> None:
    assert collapse_port(1024, 1024) == PortRange(1024, 1024)
    assert collapse_port(1025, 1024) == HIGH
    assert collapse_port(65535, 1024) == HIGH
    assert collapse_port(40000, None) == PortRange(40000, 40000)
    assert collapse_port(5000, 4999) == PortRange(5000, 65535)
    assert HIGH.text == "1025-65535"
    assert PortRange(123, 123).text == "123"


def test_flow_key_original_direction_icmp_and_other_protocols() -> None:
    key = flow_key(tcp("192.0.2.2", "198.51.100.2", 40000, 443))
    assert key == FlowKey(AF_INET, IPPROTO_TCP, addr("192.0.2.2"), addr("198.51.100.2"), HIGH, 443)
    assert key.filter_dst == addr("198.51.100.2")
    ping = flow_key(icmp("192.0.2.2", "198.51.100.2", icmp_id=77))
    assert (ping.icmp_type, ping.icmp_code, ping.sport, ping.dport) == (8, 0, None, None)
    # The ICMP id is not part of the flow: two pings are one flow.
    assert flow_key(icmp("192.0.2.2", "198.51.100.2", icmp_id=78)) == ping
    gre_orig = CtTuple(AF_INET, IPPROTO_GRE, addr("192.0.2.2"), addr("198.51.100.2"), 5, 6)
    gre = flow_key(Entry(gre_orig, reply=gre_orig.inverted()))
    assert (gre.sport, gre.dport) == (None, None)  # GRE keys are not ports


def test_flow_key_keeps_the_dnat_target_apart_and_snat_is_only_noted() -> None:
    plain = tcp("192.0.2.2", "203.0.113.10", 40000, 80)
    natted = dnat(plain, "198.51.100.2", 8080, snat="198.51.100.1")
    key = flow_key(natted)
    assert (key.dst, key.dport) == (addr("203.0.113.10"), 80)  # original direction
    assert (key.dnat_dst, key.dnat_dport) == (addr("198.51.100.2"), 8080)
    assert (key.filter_dst, key.filter_dport) == (addr("198.51.100.2"), 8080)
    assert plain.reply is not None
    snat_only = replace(plain, reply=replace(plain.reply, dst=addr("198.51.100.1")))
    assert flow_key(snat_only) == flow_key(plain)
    flows = collect([snat_only]).flows()
    assert flows[0].snat == (addr("198.51.100.1"),)


# --------------------------------------------------------------------------- collector


def test_collector_counts_connections_per_flow_and_both_directions() -> None:
    entries = [tcp("192.0.2.2", "198.51.100.2", 40000 + i, 5000) for i in range(3)] + [
        udp("192.0.2.2", "198.51.100.2", 50000, 5999, status=UNREPLIED),
        udp("192.0.2.2", "198.51.100.2", 123, 123),
    ]
    flows = collect(entries).flows()
    summary = [(f.key.proto, f.key.sport, f.key.dport, f.connections, f.replied) for f in flows]
    assert summary == [
        (IPPROTO_TCP, HIGH, 5000, 3, 3),
        (IPPROTO_UDP, PortRange(123, 123), 123, 1, 1),
        (IPPROTO_UDP, HIGH, 5999, 1, 0),
    ]
    assert [f.both_directions for f in flows] == [True, True, False]
    assert flows[0].assured == 3


def test_collector_later_status_confirms_and_destroyed_tuples_count_again() -> None:
    collector = FlowCollector()
    first = tcp("192.0.2.2", "198.51.100.2", 40000, 22, status=UNREPLIED)
    conn = key_of(first)
    collector.observe(conn, first)
    assert collector.known(conn)
    collector.observe(conn, first)  # the same connection again: not a new one
    collector.update_status(conn, SEEN)
    collector.update_status(conn, ASSURED)
    collector.update_status(conn, ASSURED)
    (flow,) = collector.flows()
    assert (flow.connections, flow.replied, flow.assured) == (1, 1, 1)
    collector.destroy(conn)
    assert not collector.known(conn)
    collector.observe(conn, first)  # the tuple reused by a new connection
    (flow,) = collector.flows()
    assert (flow.connections, flow.replied) == (2, 1)
    assert collector.connections == 2


def test_collector_filter_is_applied_once_per_connection() -> None:
    calls: list[Entry] = []

    def accept(entry: Entry) -> bool:
        calls.append(entry)
        return entry.orig.dport != 22

    collector = FlowCollector(accept=accept)
    ssh = tcp("192.0.2.2", "198.51.100.2", 40000, 22)
    web = tcp("192.0.2.2", "198.51.100.2", 40001, 80)
    for entry in (ssh, web, ssh, web):
        collector.observe(key_of(entry), entry)
    collector.update_status(key_of(ssh), ASSURED)  # ignored connection: no effect
    assert len(calls) == 2
    assert collector.ignored == 1
    assert [f.key.dport for f in collector.flows()] == [80]


def test_flows_are_sorted_by_protocol_source_destination_ports() -> None:
    entries = [
        udp("198.51.100.7", "192.0.2.1", 40000, 53),
        tcp("2001:db8:1::2", "2001:db8:2::2", 40000, 80),
        tcp("192.0.2.10", "198.51.100.2", 40000, 80),
        tcp("192.0.2.9", "198.51.100.2", 40000, 443),
        tcp("192.0.2.9", "198.51.100.2", 40000, 80),
        icmp("192.0.2.9", "198.51.100.2", 1),
    ]
    flows = collect(entries).flows()
    got = [(f.key.proto, str(ipaddress.ip_address(f.key.src)), f.key.dport) for f in flows]
    assert got == [
        (IPPROTO_ICMP, "192.0.2.9", None),
        (IPPROTO_TCP, "192.0.2.9", 80),
        (IPPROTO_TCP, "192.0.2.9", 443),
        (IPPROTO_TCP, "192.0.2.10", 80),  # numeric, not text order
        (IPPROTO_TCP, "2001:db8:1::2", 80),  # IPv4 before IPv6
        (IPPROTO_UDP, "198.51.100.7", 53),
    ]


def test_flow_filter_criteria() -> None:
    web = tcp("192.0.2.2", "198.51.100.2", 40000, 80, mark=0x42, zone=5)
    net = ipaddress.ip_network
    assert FlowFilter().matches(web)
    assert FlowFilter(protos=frozenset({IPPROTO_TCP}), dports=frozenset({80})).matches(web)
    assert not FlowFilter(protos=frozenset({IPPROTO_UDP})).matches(web)
    assert not FlowFilter(families=frozenset({AF_INET6})).matches(web)
    assert FlowFilter(src=(net("2001:db8::/32"), net("192.0.2.0/24"))).matches(web)
    assert not FlowFilter(src=(net("203.0.113.0/24"),)).matches(web)
    assert FlowFilter(dst=(net("198.51.100.0/24"),)).matches(web)
    assert not FlowFilter(exclude=(net("198.51.100.2/32"),)).matches(web)
    assert not FlowFilter(exclude=(net("192.0.2.0/25"),)).matches(web)
    assert FlowFilter(zone=5, mark=0x40, mark_mask=0xF0).matches(web)
    assert not FlowFilter(zone=0).matches(web)
    assert not FlowFilter(mark=0x41).matches(web)
    assert not FlowFilter(dports=frozenset({80})).matches(icmp("192.0.2.2", "198.51.100.2", 1))


def test_hook_of_local_addresses_loopback_and_multicast() -> None:
    local = frozenset({addr("192.0.2.1"), addr("2001:db8:1::1")})

    def key(src: str, dst: str) -> FlowKey:
        return flow_key(udp(src, dst, 40000, 53))

    assert hook_of(key("192.0.2.2", "198.51.100.2"), local) == "forward"
    assert hook_of(key("192.0.2.2", "192.0.2.1"), local) == "input"
    assert hook_of(key("192.0.2.1", "198.51.100.2"), local) == "output"
    assert hook_of(key("127.0.0.1", "127.0.0.1"), local) == "local"
    assert hook_of(key("2001:db8:1::2", "2001:db8:1::1"), local) == "input"
    assert hook_of(key("192.0.2.2", "224.0.0.18"), local) == "input"
    assert hook_of(key("192.0.2.1", "224.0.0.18"), local) == "output"
    assert hook_of(key("192.0.2.2", "192.0.2.1"), frozenset()) == "forward"
    # DNAT to this host: filtered by input.
    redirected = flow_key(dnat(tcp("192.0.2.2", "203.0.113.10", 40000, 80), "192.0.2.1", 8080))
    assert hook_of(redirected, local) == "input"


# --------------------------------------------------------------------------- prefix cover


def nets(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def v4(*texts: str) -> list[bytes]:
    return [addr(t) for t in texts]


def test_exact_cover_examples() -> None:
    assert cover_prefixes([]) == Cover((), 0)
    assert cover_prefixes(v4("192.0.2.7")) == Cover(nets("192.0.2.7/32"), 0)
    four = v4("192.0.2.4", "192.0.2.5", "192.0.2.6", "192.0.2.7")
    assert cover_prefixes(four) == Cover(nets("192.0.2.4/30"), 0)
    assert cover_prefixes([*four, addr("192.0.2.8")]) == Cover(
        nets("192.0.2.4/30", "192.0.2.8/32"), 0
    )
    assert cover_prefixes([addr("2001:db8::"), addr("2001:db8::1")]) == Cover(
        nets("2001:db8::/127"), 0
    )
    with pytest.raises(ValueError, match="one family"):
        cover_prefixes([addr("192.0.2.1"), addr("2001:db8::1")])
    with pytest.raises(ValueError, match="at least 1"):
        cover_prefixes(four, 0)


def test_loose_cover_examples() -> None:
    spread = v4("192.0.2.1", "192.0.2.3", "192.0.2.200")
    assert cover_prefixes(spread, 3) == Cover(
        nets("192.0.2.1/32", "192.0.2.3/32", "192.0.2.200/32"), 0
    )
    # Two prefixes: merging .1 and .3 into /30 adds 2 addresses; anything else adds more.
    assert cover_prefixes(spread, 2) == Cover(nets("192.0.2.0/30", "192.0.2.200/32"), 2)
    assert cover_prefixes(spread, 1) == Cover(nets("192.0.2.0/24"), 253)
    far = v4("192.0.2.1", "203.0.113.1")
    assert cover_prefixes(far, 1) == Cover(nets("192.0.0.0/4"), 2**28 - 2)
    v6 = [addr("2001:db8:1::1"), addr("2001:db8:1::2"), addr("2001:db8:2::1")]
    cover = cover_prefixes(v6, 2)
    assert cover.prefixes == nets("2001:db8:1::/126", "2001:db8:2::1/128")
    assert cover.extra == 2


ADDRESSES_24 = st.lists(st.integers(0, 255), min_size=1, max_size=40).map(
    lambda xs: [bytes([192, 0, 2, x]) for x in xs]
)


def _members(cover: Cover) -> set[int]:
    out: set[int] = set()
    for net in cover.prefixes:
        out.update(range(int(net.network_address), int(net.broadcast_address) + 1))
    return out


def _ints(addresses: Iterable[bytes]) -> set[int]:
    return {int.from_bytes(a, "big") for a in addresses}


@settings(max_examples=200, deadline=None)
@given(ADDRESSES_24)
def test_exact_cover_covers_every_source_and_nothing_else(addresses: list[bytes]) -> None:
    cover = cover_prefixes(addresses)
    assert cover.extra == 0
    assert _members(cover) == _ints(addresses)
    # The fewest prefixes: no two of them can be merged into their parent.
    assert sum(n.num_addresses for n in cover.prefixes) == len(_ints(addresses))
    for a, b in itertools.combinations(cover.prefixes, 2):
        assert not a.overlaps(b)
        if a.prefixlen == b.prefixlen and a.prefixlen > 0:
            assert a.supernet() != b.supernet()


def _brute_force(addresses: set[int], k: int) -> tuple[int, int]:
    """(extra, count) of the best cover of addresses inside 192.0.2.0/28 with <= k prefixes."""
    base = int(ipaddress.ip_address("192.0.2.0"))
    candidates = [
        ipaddress.ip_network((base + start, 32 - bits))
        for bits in range(5)
        for start in range(0, 16, 1 << bits)
    ]
    best = None
    for count in range(1, k + 1):
        for combo in itertools.combinations(candidates, count):
            covered: set[int] = set()
            for net in combo:
                covered.update(range(int(net.network_address), int(net.broadcast_address) + 1))
            if addresses <= covered:
                option = (len(covered) - len(addresses), count)
                best = option if best is None or option < best else best
    assert best is not None
    return best


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 15), min_size=1, max_size=8).map(
        lambda xs: [bytes([192, 0, 2, x]) for x in xs]
    ),
    st.integers(1, 3),
)
def test_loose_cover_is_optimal_within_its_budget(addresses: list[bytes], k: int) -> None:
    cover = cover_prefixes(addresses, k)
    observed = _ints(addresses)
    members = _members(cover)
    assert observed <= members
    assert len(cover.prefixes) <= k
    assert cover.extra == len(members) - len(observed)
    assert sum(n.num_addresses for n in cover.prefixes) == len(members)  # disjoint
    # The prefixes of a 192.0.2.0/28 cover never need to be wider than /28.
    assert (cover.extra, len(cover.prefixes)) == _brute_force(observed, k)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=60),
    st.integers(1, 8),
)
def test_loose_cover_covers_every_source_ipv6(values: list[int], k: int) -> None:
    addresses = [(0x20010DB8 << 96 | v << 40).to_bytes(16, "big") for v in values]
    cover = cover_prefixes(addresses, k)
    assert len(cover.prefixes) <= k
    for a in addresses:
        assert sum(ipaddress.ip_address(a) in n for n in cover.prefixes) == 1
    assert cover.extra == sum(n.num_addresses for n in cover.prefixes) - len(set(addresses))
    exact = cover_prefixes(addresses)
    if len(exact.prefixes) <= k:
        assert cover == exact


# --------------------------------------------------------------------------- summary


LOCAL = frozenset({addr("192.0.2.1"), addr("198.51.100.1")})


def sample_flows() -> list[Flow]:
    entries = [
        *(tcp(f"192.0.2.{h}", "198.51.100.2", 40000 + h, 5000) for h in (4, 5, 6, 7, 9)),
        tcp("192.0.2.4", "198.51.100.2", 41000, 5000),
        dnat(tcp("192.0.2.2", "203.0.113.10", 40000, 80), "198.51.100.2", 8080, "198.51.100.1"),
        udp("192.0.2.2", "198.51.100.2", 123, 5300),
        udp("192.0.2.2", "198.51.100.2", 40000, 5300),
        udp("192.0.2.2", "198.51.100.2", 40001, 5999, status=UNREPLIED),
        icmp("192.0.2.2", "198.51.100.2", 1),
        icmp("192.0.2.2", "192.0.2.1", 2),
        icmp("2001:db8:1::2", "2001:db8:2::2", 3, icmp_type=128),
        tcp("2001:db8:1::2", "2001:db8:2::2", 40000, 5000, zone=5),
    ]
    return collect(entries).flows()


def test_summary_groups_services_and_covers_sources() -> None:
    summary = summarize(sample_flows(), ObservationInfo(seconds=12.0), local=LOCAL)
    services = {
        (s.key.hook, s.key.proto, str(ipaddress.ip_address(s.key.dst)), s.key.dport): s
        for s in summary.services
    }
    web = services["forward", IPPROTO_TCP, "198.51.100.2", 5000]
    assert web.connections == 6 and web.flows == 5
    assert web.cover.prefixes == nets("192.0.2.4/30", "192.0.2.9/32")
    dnat_service = services["forward", IPPROTO_TCP, "198.51.100.2", 8080]
    assert dnat_service.key.via_dst == addr("203.0.113.10")
    assert dnat_service.key.via_dport == 80
    ntp_like = services["forward", IPPROTO_UDP, "198.51.100.2", 5300]
    assert ntp_like.sports == (PortRange(123, 123), HIGH)
    assert ("input", IPPROTO_ICMP, "192.0.2.1", None) in services
    assert (
        summary.hooks[
            summary.flows.index(next(f for f in summary.flows if f.key.dst == addr("192.0.2.1")))
        ]
        == "input"
    )
    loose = summarize(sample_flows(), local=LOCAL, max_prefixes=1)
    web = next(s for s in loose.services if s.key.dport == 5000 and s.key.family == AF_INET)
    assert web.cover == Cover(nets("192.0.2.0/28"), 11)
    replied = summarize(sample_flows(), local=LOCAL, replied_only=True)
    assert all(f.replied for f in replied.flows)
    assert len(replied.flows) == len(summary.flows) - 1


def test_text_lists_flows_and_services() -> None:
    summary = summarize(sample_flows(), ObservationInfo(seconds=12.0), local=LOCAL)
    text = render_text(summary)
    lines = text.splitlines()
    assert lines[0].startswith("# 13 flows, 14 connections, 8 services observed in 12.0s")
    flow_lines = [line.split() for line in lines[2:15]]
    assert flow_lines[0][:7] == ["icmp", "192.0.2.2", "-", "192.0.2.1", "echo-request", "8/0", "1"]
    dnat_line = next(line for line in lines if "203.0.113.10" in line and "tcp" in line)
    assert "dnat 198.51.100.2:8080, snat 198.51.100.1" in dnat_line
    assert "1025-65535" in dnat_line
    unreplied = next(line for line in lines if "5999" in line)
    assert unreplied.split()[6] == "no"
    assert any(line.split()[:1] == ["ZONE"] or "ZONE" in line.split() for line in lines)
    assert any("192.0.2.4/30 192.0.2.9" in line for line in lines)
    assert any("dnat from 203.0.113.10:80" in line for line in lines)
    empty = render_text(summarize([], ObservationInfo(seconds=1.0)))
    assert empty.splitlines()[1] == "no flows observed"


def test_json_has_every_flow_and_service() -> None:
    summary = summarize(sample_flows(), ObservationInfo(seconds=12.0, events=40), local=LOCAL)
    data = json.loads(json.dumps(summary_to_json(summary)))
    assert data["observed"]["events"] == 40
    assert len(data["flows"]) == 13 and len(data["services"]) == 8
    web = next(f for f in data["flows"] if f["dst"] == "203.0.113.10")
    assert web["sport"] == "1025-65535" and web["sport_range"] == [1025, 65535]
    assert web["nat"] == {"dnat": {"dst": "198.51.100.2", "dport": 8080}, "snat": ["198.51.100.1"]}
    assert web["both_directions"] is True and web["hook"] == "forward"
    ping = next(f for f in data["flows"] if f["protocol"] == "icmpv6")
    assert (ping["icmp_type"], ping["icmp_name"]) == (128, "echo-request")
    svc = next(s for s in data["services"] if s.get("dport") == 5300)
    assert svc["sports"] == [123, "1025-65535"]
    assert svc["prefixes"] == ["192.0.2.2/32"]


def test_nft_rules() -> None:
    summary = summarize(sample_flows(), ObservationInfo(seconds=12.0), local=LOCAL)
    rules = [nft_rule(s) for s in summary.services]
    assert (
        "ip saddr { 192.0.2.4/30, 192.0.2.9 } ip daddr 198.51.100.2 tcp dport 5000"
        ' ct state new accept comment "6 connections from 5 sources"'
    ) in rules
    assert (
        "ip saddr 192.0.2.2 ip daddr 198.51.100.2 tcp dport 8080"
        " ct original ip daddr 203.0.113.10 ct original proto-dst 80"
        ' ct state new accept comment "1 connection from 1 source"'
    ) in rules
    assert (
        "ip saddr 192.0.2.2 ip daddr 198.51.100.2 udp sport { 123, 1025-65535 } udp dport 5300"
        ' ct state new accept comment "2 connections from 1 source"'
    ) in rules
    assert (
        "ip saddr 192.0.2.2 ip daddr 198.51.100.2 udp dport 5999"
        ' ct state new accept comment "1 connection from 1 source, no reply seen"'
    ) in rules
    assert (
        "ip6 saddr 2001:db8:1::2 ip6 daddr 2001:db8:2::2 icmpv6 type echo-request"
        ' ct state new accept comment "1 connection from 1 source"'
    ) in rules
    assert (
        "ip6 saddr 2001:db8:1::2 ip6 daddr 2001:db8:2::2 tcp dport 5000 ct zone 5"
        ' ct state new accept comment "1 connection from 1 source"'
    ) in rules


def test_nft_rule_never_lists_client_ports() -> None:
    entries = [udp("192.0.2.2", "198.51.100.2", 40000 + i, 53) for i in range(3)]
    kept = summarize(collect(entries, collapse_above=None).flows(), collapse_above=None)
    (service,) = kept.services
    assert len(service.sports) == 3  # the summary keeps them apart
    assert "sport" not in nft_rule(service, None)
    mixed = [*entries, udp("192.0.2.2", "198.51.100.2", 53, 53)]
    kept = summarize(collect(mixed, collapse_above=None).flows(), collapse_above=None)
    assert "udp sport { 53, 1025-65535 } udp dport 53" in nft_rule(kept.services[0], None)


def test_nft_draft_layout() -> None:
    summary = summarize(sample_flows(), ObservationInfo(seconds=12.0), local=LOCAL)
    draft = render_nft(summary, table="fw_draft")
    lines = draft.splitlines()
    assert lines[0] == "#!/usr/sbin/nft -f"
    assert "table inet fw_draft" in lines and "delete table inet fw_draft" in lines
    chains = [line.strip() for line in lines if line.strip().startswith("chain ")]
    assert chains == ["chain input {", "chain forward {"]  # no output flows: no chain
    forward = lines[lines.index("    chain forward {") :]
    assert forward[1].strip() == "type filter hook forward priority filter; policy drop;"
    assert forward[2].strip() == "ct state established,related accept"
    assert forward[3].strip() == "ct state invalid drop"
    assert forward[-3].strip() == "# policy drop: every other new connection is dropped"
    assert sum("ct state new accept" in line for line in forward) == 7
    input_chain = lines[lines.index("    chain input {") : lines.index("    chain forward {")]
    assert any('iifname "lo" accept' in line for line in input_chain)
    assert any("nd-neighbor-solicit" in line for line in input_chain)
    assert draft.count("{") == draft.count("}")
    staged = render_nft(summary, policy="accept")
    assert "policy accept;" in staged and "policy drop;" not in staged
    assert 'ct state new counter comment "not observed: a drop policy drops these"' in staged
    with pytest.raises(ValueError):
        render_nft(summary, policy="reject")
    with pytest.raises(ValueError):
        render_nft(summary, table="x; flush ruleset")
    empty = render_nft(summarize([]))
    assert "chain" not in empty.replace("no chain", "")


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1.5m", 90.0),
        ("2h0m1s", 7201.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert flows_cmd.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-1s", "5x", "s", "1.5.2"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        flows_cmd.parse_duration(text)


class FakeWatch:
    """Stands in for io.flow_watch.FlowWatch: a table, then events, no netlink."""

    table: ClassVar[list[Entry]] = [
        tcp("192.0.2.2", "198.51.100.2", 40000, 22),
        udp("192.0.2.3", "198.51.100.2", 40000, 53),
    ]
    events: ClassVar[list[Entry]] = [
        tcp("192.0.2.2", "198.51.100.2", 40001, 80),
        tcp("2001:db8:1::2", "2001:db8:2::2", 40001, 80),
        icmp("192.0.2.2", "198.51.100.2", 9),
    ]
    runs: ClassVar[list[tuple[float | None, bool]]] = []

    def __init__(self, collector: FlowCollector, *, include_table: bool = True) -> None:
        self.collector = collector
        self.include_table = include_table
        self.table_entries = 0

    def __enter__(self) -> FakeWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read_table(self) -> int:
        for entry in self.table:
            self.collector.observe(key_of(entry), entry)
        self.table_entries = len(self.table)
        return self.table_entries

    def run(self, duration: float | None, stop: threading.Event) -> float:
        self.runs.append((duration, stop.is_set()))
        for entry in self.events:
            self.collector.observe(key_of(entry), entry)
        return duration or 1.0

    def info(
        self, seconds: float, *, interrupted: bool, warnings: tuple[str, ...] = ()
    ) -> ObservationInfo:
        return ObservationInfo(
            seconds, self.include_table, self.table_entries, 3, 0, 0, interrupted, warnings
        )


@pytest.fixture
def fake_watch(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeWatch]]:
    from ctsync.io import flow_watch

    FakeWatch.runs = []
    monkeypatch.setattr(flow_watch, "FlowWatch", FakeWatch)
    monkeypatch.setattr(flow_watch, "local_addresses", frozenset)
    monkeypatch.setattr(flow_watch, "events_setting", lambda: 0)
    yield FakeWatch


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["flows", *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_text_with_table_and_events(fake_watch: type[FakeWatch]) -> None:
    code, out, err = run_cli("--duration", "2s")
    assert code == 0, err
    assert fake_watch.runs == [(2.0, False)]
    assert out.startswith(
        "# 5 flows, 5 connections, 5 services observed in 2.0s (table and events)"
    )
    assert "# warning: net.netfilter.nf_conntrack_events is 0" in out
    assert "observing conntrack events for 2s; 2 entries in the table" in err


def test_cli_filters_and_json(fake_watch: type[FakeWatch]) -> None:
    code, out, err = run_cli("--no-table", "--json", "-p", "tcp", "-f", "ipv4", "--dport", "80")
    assert code == 0, err
    data = json.loads(out)
    assert [(f["src"], f["dport"]) for f in data["flows"]] == [("192.0.2.2", 80)]
    assert data["observed"]["include_table"] is False
    code, out, _ = run_cli("--json", "-x", "198.51.100.2", "--no-collapse")
    assert [f["protocol"] for f in json.loads(out)["flows"]] == ["tcp"]  # the IPv6 one
    assert json.loads(out)["flows"][0]["sport"] == 40001


def test_cli_nft_to_file(fake_watch: type[FakeWatch], tmp_path: Path) -> None:
    target = tmp_path / "draft.nft"
    code, out, err = run_cli("--nft", "--nft-table", "draft", "-o", str(target), "-t", "1")
    assert code == 0, err
    assert out == ""
    draft = target.read_text()
    assert "table inet draft {" in draft
    assert "ip saddr 192.0.2.2 ip daddr 198.51.100.2 tcp dport 22" in draft


def test_cli_usage_errors(fake_watch: type[FakeWatch]) -> None:
    assert run_cli("--json", "--nft")[0] == 2
    assert run_cli("--duration", "soon")[0] == 2
    assert run_cli("-s", "192.0.2.300")[0] == 2
    assert run_cli("--max-prefixes", "0")[0] == 2
    assert run_cli("--nft", "--nft-table", "a b")[0] == 2
    assert fake_watch.runs == []
