"""The UDP sync transport against the real kernel: two namespaces joined by two veth pairs.

Each Transport is created inside its namespace (``in_netns`` around ``start()``) and then
driven from the test's own asyncio loop: its sockets stay in the namespace.

    a: sa0 192.0.2.1/24    2001:db8:1::1/64  ---  b: sb0 192.0.2.2/24    2001:db8:1::2/64
    a: sa1 198.51.100.1/24 2001:db8:2::1/64  ---  b: sb1 198.51.100.2/24 2001:db8:2::2/64
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from ctsync.io.transport import LinkConfig, Transport, TransportError
from tests.linux.netns import Namespace, NamespaceFactory, add_addr, in_netns, veth

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]

GROUP_V4 = "225.0.0.50"
GROUP_V4_B = "225.0.0.51"
GROUP_V6 = "ff12::3780"  # transient, link-local scope
GROUP_V6_B = "ff12::3781"

ADDR = {
    ("a", 0, 4): "192.0.2.1",
    ("b", 0, 4): "192.0.2.2",
    ("a", 1, 4): "198.51.100.1",
    ("b", 1, 4): "198.51.100.2",
    ("a", 0, 6): "2001:db8:1::1",
    ("b", 0, 6): "2001:db8:1::2",
    ("a", 1, 6): "2001:db8:2::1",
    ("b", 1, 6): "2001:db8:2::2",
}
STRANGER = {4: "192.0.2.3", 6: "2001:db8:1::3"}


@dataclass
class Pair:
    a: Namespace
    b: Namespace

    def ifname(self, side: str, link: int) -> str:
        return f"s{side}{link}"


@pytest.fixture
def pair(netns_factory: NamespaceFactory) -> Pair:
    a = netns_factory.create("a")
    b = netns_factory.create("b")
    for link in (0, 1):
        veth(a, f"sa{link}", b, f"sb{link}")
        for side, ns in (("a", a), ("b", b)):
            add_addr(ns, f"s{side}{link}", f"{ADDR[side, link, 4]}/24")
            add_addr(ns, f"s{side}{link}", f"{ADDR[side, link, 6]}/64")
    return Pair(a, b)


class Inbox:
    """Collects (payload, source, link) as the transport hands them over."""

    def __init__(self) -> None:
        self.items: list[tuple[bytes, tuple[str, int], int]] = []

    def __call__(self, data: bytes, source: tuple[str, int], link: int) -> None:
        self.items.append((data, source, link))

    def payloads(self) -> list[bytes]:
        return [item[0] for item in self.items]

    async def wait_for(self, payload: bytes, timeout: float = 5.0) -> tuple[str, int, int]:
        """Wait until *payload* arrived; return (source host, source port, link index)."""
        await until(lambda: payload in self.payloads(), timeout, f"{payload!r} never arrived")
        for data, (host, port), link in self.items:
            if data == payload:
                return host, port, link
        raise AssertionError("unreachable")


async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout after {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def start_in(
    ns: Namespace, links: Sequence[LinkConfig], inbox: Inbox, *, failback: bool = False
) -> Transport:
    transport = Transport(links, inbox, failback=failback)
    with in_netns(ns.name):
        await transport.start()
    return transport


def open_udp_in(ns: Namespace, family: int, bind: str) -> socket.socket:
    with in_netns(ns.name):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((bind, 0))
    return sock


# --------------------------------------------------------------------------- multicast


@pytest.mark.parametrize(("version", "group"), [(4, GROUP_V4), (6, GROUP_V6)])
def test_multicast_both_ways_and_stats(pair: Pair, version: int, group: str) -> None:
    async def main() -> None:
        inbox_a, inbox_b = Inbox(), Inbox()
        ta = await start_in(pair.a, [LinkConfig("sa0", group=group)], inbox_a)
        tb = await start_in(pair.b, [LinkConfig("sb0", group=group)], inbox_b)
        try:
            # Unicast to our port is not for a socket bound to the group: send one first,
            # then the multicast; veth keeps order, so once the latter arrived the former
            # would have too.
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            stray = open_udp_in(pair.b, family, ADDR["b", 0, version])
            try:
                stray.sendto(b"unicast-stray", (ADDR["a", 0, version], 3780))
            finally:
                stray.close()

            payloads = [b"a" * 10, b"b" * 200, b"c" * 1000]
            for payload in payloads:
                assert tb.send(payload)
            for payload in payloads:
                _host, port, link = await inbox_a.wait_for(payload)
                assert (port, link) == (3780, 0)
            assert b"unicast-stray" not in inbox_a.payloads()

            assert ta.send(b"from-a")
            host, _port, link = await inbox_b.wait_for(b"from-a")
            assert link == 0
            if version == 4:
                assert host == ADDR["a", 0, 4]
            assert inbox_a.payloads().count(b"from-a") == 0  # multicast loop is off

            sent = tb.stats().links[0]
            recv = ta.stats().links[0]
            total = sum(len(p) for p in payloads)
            assert (sent.packets_sent, sent.bytes_sent) == (3, total)
            assert (recv.packets_recv, recv.bytes_recv) == (3, total)
            assert (sent.packets_recv, recv.packets_sent) == (1, 1)
            for stats in (sent, recv):
                assert (stats.status, stats.role, stats.kind) == ("RUNNING", "ACTIVE", "multicast")
                assert stats.send_errors == stats.recv_errors == stats.unknown_source == 0
            assert sent.device == "sb0"
            assert recv.mtu == 1500
            expected = 1500 - (28 if version == 4 else 48)
            assert ta.max_datagram() == expected
        finally:
            ta.close()
            tb.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- unicast


@pytest.mark.parametrize("version", [4, 6])
def test_unicast_both_ways_and_unknown_source(pair: Pair, version: int) -> None:
    async def main() -> None:
        inbox_a, inbox_b = Inbox(), Inbox()
        link_a = LinkConfig(
            "sa0", peers=[ADDR["b", 0, version]], listen_address=ADDR["a", 0, version]
        )
        # b binds its address: otherwise the stranger address added below could become
        # b's source address (IPv6 source selection may prefer the newest).
        link_b = LinkConfig(
            "sb0", peers=(ADDR["a", 0, version],), listen_address=ADDR["b", 0, version]
        )
        ta = await start_in(pair.a, [link_a], inbox_a)
        tb = await start_in(pair.b, [link_b], inbox_b)
        try:
            assert ta.send(b"to-b")
            host, port, link = await inbox_b.wait_for(b"to-b")
            assert (host, port, link) == (ADDR["a", 0, version], 3780, 0)
            assert tb.send(b"to-a")
            host, port, link = await inbox_a.wait_for(b"to-a")
            assert (host, port, link) == (ADDR["b", 0, version], 3780, 0)

            # A stranger on the same link, to the right port: counted, dropped.
            prefix = 24 if version == 4 else 64
            add_addr(pair.b, "sb0", f"{STRANGER[version]}/{prefix}")
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            stranger = open_udp_in(pair.b, family, STRANGER[version])
            try:
                stranger.sendto(b"spoof", (ADDR["a", 0, version], 3780))
            finally:
                stranger.close()
            await until(lambda: ta.stats().links[0].unknown_source == 1, what="unknown_source")
            assert tb.send(b"after-spoof")
            await inbox_a.wait_for(b"after-spoof")
            assert b"spoof" not in inbox_a.payloads()

            stats = ta.stats().links[0]
            assert stats.kind == "UDP"
            assert (stats.packets_recv, stats.bytes_recv) == (2, len(b"to-a") + len(b"after-spoof"))
            assert (stats.packets_sent, stats.bytes_sent) == (1, len(b"to-b"))
        finally:
            ta.close()
            tb.close()

    asyncio.run(main())


def test_unicast_to_several_peers_and_handler_errors(pair: Pair) -> None:
    """Every peer gets each datagram; a handler that raises is counted, nothing breaks."""
    add_addr(pair.b, "sb0", "192.0.2.4/24")

    async def main() -> None:
        inbox_b1, inbox_b2 = Inbox(), Inbox()
        calls: list[bytes] = []

        def broken(data: bytes, source: tuple[str, int], link: int) -> None:
            calls.append(data)
            raise RuntimeError("handler bug")

        ta = Transport([LinkConfig("sa0", peers=("192.0.2.2", "192.0.2.4"))], broken)
        with in_netns(pair.a.name):
            await ta.start()
        tb1 = await start_in(
            pair.b, [LinkConfig("sb0", peers=("192.0.2.1",), listen_address="192.0.2.2")], inbox_b1
        )
        tb2 = await start_in(
            pair.b, [LinkConfig("sb0", peers=("192.0.2.1",), listen_address="192.0.2.4")], inbox_b2
        )
        try:
            assert ta.send(b"fanout")
            await inbox_b1.wait_for(b"fanout")
            await inbox_b2.wait_for(b"fanout")
            assert ta.stats().links[0].packets_sent == 2
            tb1.send(b"one")
            tb2.send(b"two")
            await until(lambda: len(calls) == 2, what="handler calls")
            assert ta.stats().links[0].handler_errors == 2
        finally:
            ta.close()
            tb1.close()
            tb2.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- failover


@pytest.mark.parametrize("failback", [False, True])
@pytest.mark.parametrize("version", [4, 6])
def test_failover_to_second_link(pair: Pair, version: int, failback: bool) -> None:
    groups = (GROUP_V4, GROUP_V4_B) if version == 4 else (GROUP_V6, GROUP_V6_B)

    async def main() -> None:
        inbox_a, inbox_b = Inbox(), Inbox()
        links_a = [LinkConfig("sa0", group=groups[0]), LinkConfig("sa1", group=groups[1])]
        links_b = [LinkConfig("sb0", group=groups[0]), LinkConfig("sb1", group=groups[1])]
        ta = await start_in(pair.a, links_a, inbox_a, failback=failback)
        tb = await start_in(pair.b, links_b, inbox_b, failback=failback)
        try:
            assert ta.active == tb.active == 0
            assert ta.send(b"before")
            assert (await inbox_b.wait_for(b"before"))[2] == 0

            pair.a.ip("link", "set", "sa0", "down")
            # Keep sending as an agent would; every datagram after the switch must arrive
            # on link 1, and the switch must come within a few poll intervals.
            start = time.monotonic()
            sent: list[bytes] = []
            while ta.active != 1:
                assert time.monotonic() - start < 2.0, "no failover within 2 s"
                payload = f"during-{len(sent)}".encode()
                ta.send(payload)
                sent.append(payload)
                await asyncio.sleep(0.02)
            assert ta.send(b"after")
            assert (await inbox_b.wait_for(b"after"))[2] == 1

            # b's sb0 lost its carrier (the veth peer is down): b fails over too.
            await until(lambda: tb.active == 1, what="b failover")
            assert tb.send(b"reply")
            assert (await inbox_a.wait_for(b"reply"))[2] == 1

            sa = ta.stats()
            assert sa.link_failovers == 1
            assert [(ln.status, ln.role) for ln in sa.links] == [
                ("DOWN", "BACKUP"),
                ("RUNNING", "ACTIVE"),
            ]
            assert sa.links[1].packets_sent >= 1
            assert sa.links[1].packets_recv == 1
            sb = tb.stats()
            assert [ln.status for ln in sb.links] == ["NO-CARRIER", "RUNNING"]
            assert sb.links[1].packets_recv >= 1

            pair.a.ip("link", "set", "sa0", "up")
            if failback:
                await until(lambda: ta.active == 0 and tb.active == 0, what="failback")
                assert ta.send(b"back")
                assert (await inbox_b.wait_for(b"back"))[2] == 0
                # a's group membership on sa0 survived the down/up
                assert tb.send(b"back-reply")
                assert (await inbox_a.wait_for(b"back-reply"))[2] == 0
                assert ta.stats().link_failovers == 2
            else:
                await until(
                    lambda: ta.stats().links[0].status == "RUNNING", what="sa0 running again"
                )
                await asyncio.sleep(3 * ta.poll_interval)
                assert ta.active == tb.active == 1  # conntrackd: no return to link 0
                assert ta.stats().link_failovers == 1
        finally:
            ta.close()
            tb.close()

    asyncio.run(main())


def test_first_running_link_is_active_and_missing_interface_fails(pair: Pair) -> None:
    pair.a.ip("link", "set", "sa0", "down")

    async def main() -> None:
        ta = await start_in(
            pair.a,
            [LinkConfig("sa0", group=GROUP_V4), LinkConfig("sa1", group=GROUP_V4_B)],
            Inbox(),
        )
        try:
            assert ta.active == 1
            assert [ln.role for ln in ta.stats().links] == ["BACKUP", "ACTIVE"]
        finally:
            ta.close()
        with pytest.raises(TransportError, match=r"nosuch0.*no such interface"):
            await start_in(pair.a, [LinkConfig("nosuch0", group=GROUP_V4)], Inbox())

    asyncio.run(main())


@pytest.mark.parametrize("version", [4, 6])
def test_recreated_interface_is_reattached(pair: Pair, version: int) -> None:
    """A deleted and re-created device has a new index: the socket binds and joins again."""
    group = GROUP_V4 if version == 4 else GROUP_V6

    async def main() -> None:
        inbox_a, inbox_b = Inbox(), Inbox()
        ta = await start_in(pair.a, [LinkConfig("sa0", group=group)], inbox_a)
        tb = await start_in(pair.b, [LinkConfig("sb0", group=group)], inbox_b)
        try:
            assert ta.send(b"one")
            await inbox_b.wait_for(b"one")
            pair.a.ip("link", "del", "sa0")  # removes sb0 too
            await until(lambda: ta.stats().links[0].status == "DOWN", what="sa0 gone")
            assert not ta.send(b"lost")
            assert ta.stats().links[0].send_errors >= 1
            veth(pair.a, "sa0", pair.b, "sb0")
            for side, ns in (("a", pair.a), ("b", pair.b)):
                add_addr(ns, f"s{side}0", f"{ADDR[side, 0, version]}/{24 if version == 4 else 64}")
            await until(
                lambda: ta.stats().links[0].status == tb.stats().links[0].status == "RUNNING",
                what="re-created links running",
            )
            assert ta.send(b"two")
            assert (await inbox_b.wait_for(b"two"))[2] == 0
            assert tb.send(b"three")
            assert (await inbox_a.wait_for(b"three"))[2] == 0
            assert ta.stats().no_link_available == 1
        finally:
            ta.close()
            tb.close()

    asyncio.run(main())


def test_link_config_validation() -> None:
    assert LinkConfig("eth1", peers=["192.0.2.2"]).peers == ("192.0.2.2",)
    assert LinkConfig("eth1", group=GROUP_V6).version == 6
    bad: list[dict[str, object]] = [
        {},  # neither group nor peers
        {"group": GROUP_V4, "peers": ("192.0.2.2",)},
        {"group": "192.0.2.1"},
        {"peers": ("225.0.0.50",)},
        {"peers": ("192.0.2.2", "2001:db8::2")},
        {"peers": ("192.0.2.2",), "listen_address": "2001:db8::1"},
        {"group": GROUP_V6, "listen_address": "2001:db8::1"},
        {"group": GROUP_V4, "port": 0},
        {"group": GROUP_V4, "rcvbuf": -1},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            LinkConfig("eth1", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LinkConfig("an-interface-name-too-long", group=GROUP_V4)
    with pytest.raises(ValueError):
        Transport([], Inbox())


def test_send_error_fails_over_while_device_runs(pair: Pair) -> None:
    """Unicast link 0 loses its bound address: the device stays RUNNING, but the send
    fails (EADDRNOTAVAIL/ENETUNREACH), so the datagram goes out on link 1 at once."""

    async def main() -> None:
        inbox_b = Inbox()
        links_a = [
            LinkConfig("sa0", peers=[ADDR["b", 0, 4]], listen_address=ADDR["a", 0, 4]),
            LinkConfig("sa1", peers=[ADDR["b", 1, 4]], listen_address=ADDR["a", 1, 4]),
        ]
        links_b = [
            LinkConfig("sb0", peers=[ADDR["a", 0, 4]]),
            LinkConfig("sb1", peers=[ADDR["a", 1, 4]]),
        ]
        ta = await start_in(pair.a, links_a, Inbox())
        tb = await start_in(pair.b, links_b, inbox_b)
        try:
            assert ta.send(b"one")
            assert (await inbox_b.wait_for(b"one"))[2] == 0
            pair.a.ip("addr", "del", f"{ADDR['a', 0, 4]}/24", "dev", "sa0")
            assert ta.send(b"two")  # failed on link 0, retried on link 1
            assert (await inbox_b.wait_for(b"two"))[2] == 1
            stats = ta.stats()
            assert stats.active == 1 and stats.link_failovers == 1
            assert stats.links[0].status == "RUNNING"
            assert stats.links[0].send_errors == 1
            assert stats.no_link_available == 0
        finally:
            ta.close()
            tb.close()

    asyncio.run(main())
