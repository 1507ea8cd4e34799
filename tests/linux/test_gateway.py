"""Gateway watch with real agents and real gateways in network namespaces.

Site (fw1 runs the watch; fw2 is its sync peer, to see the removals reach it)::

    client 192.0.2.10 -- lan0 fw1 wana 198.51.100.1/28  -- gwa 198.51.100.2   (server .101)
                              fw1 wanb 198.51.100.17/28 -- gwb 198.51.100.18  (server .102)
                              fw1 sync0 -- switch -- fw2

fw1 marks each new forwarded connection by its output interface (``ct mark set 0x1`` via
wana, ``0x2`` via wanb), as a multi-uplink firewall does. Its agent watches gateway A by
ICMP and gateway B by a TCP connect to port 8080, and removes the connections of mark
0x1/0xff, resp. 0x2/0xff, when their gateway goes down. Gateway A goes away by deleting its
namespace (probes fail at once: no route), gateway B by its link going down (probes time
out). Entries inserted with ``conntrack -I`` stand for connections the test cannot keep
alive itself, e.g. ones re-created on the fallback uplink while A was down.

The probers and the removal are also exercised directly (IPv4, IPv6, link-local).
"""

from __future__ import annotations

import ast
import asyncio
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctsync.core.select import EntryFilter, parse_mark, parse_network
from ctsync.io.probe import IcmpProber, ProbeResult, TcpProber, remove_connections
from tests.linux.agents import (
    SYNC_NOTRACK_CHAINS,
    Cluster,
    CtKey,
    Flow,
    insert_flows,
    kernel_entries,
    kernel_keys,
    wait_until,
)
from tests.linux.netns import (
    Namespace,
    NamespaceFactory,
    Process,
    add_addr,
    add_route,
    in_netns,
    traffic_cmd,
    veth,
)

pytestmark = [pytest.mark.linux, pytest.mark.timeout(180)]

PORT = 8080
METRICS_PORT = 9724
CLIENT = "192.0.2.10"

RULESET = f"""\
flush ruleset
table inet fw {{
{SYNC_NOTRACK_CHAINS}    chain forward_mark {{
        type filter hook forward priority filter; policy accept;
        ct state new oifname "wana" ct mark set 0x1
        ct state new oifname "wanb" ct mark set 0x2
    }}
}}
"""


@dataclass(frozen=True)
class Uplink:
    name: str  # the gateway namespace's role
    fw_if: str
    fw_addr: str
    gw_addr: str
    server: str  # an address behind the gateway (on its loopback)
    mark: int


UPLINKS = {
    "a": Uplink("gwa", "wana", "198.51.100.1", "198.51.100.2", "198.51.100.101", 0x1),
    "b": Uplink("gwb", "wanb", "198.51.100.17", "198.51.100.18", "198.51.100.102", 0x2),
}

WATCHES = """
[metrics]
listen = "127.0.0.1:{metrics}"

[[gateway-watch]]
name = "isp-a"
address = "198.51.100.2"
interval = 0.4
timeout = 0.3
down-after = 3
up-after = 2
flush-on = ["down", "up"]
match = {{ mark = "0x1/0xff" }}

[[gateway-watch]]
name = "isp-b"
address = "198.51.100.18"
probe = "tcp"
port = {port}
interval = 0.4
timeout = 0.3
down-after = 3
up-after = 2
[gateway-watch.match]
mark = "0x2/0xff"
"""


class Site:
    """The topology of the module docstring, with the agents' cluster."""

    def __init__(self, factory: NamespaceFactory, tmp: Path) -> None:
        self.factory = factory
        self.tmp = tmp
        self.cluster = Cluster(factory, tmp, 2, ruleset=RULESET)
        self.fw = self.cluster[1].ns
        self.fw.sysctl("net.ipv4.ip_forward", 1)
        self.client = factory.create("client")
        veth(self.client, "eth0", self.fw, "lan0")
        add_addr(self.client, "eth0", f"{CLIENT}/24")
        add_addr(self.fw, "lan0", "192.0.2.1/24")
        add_route(self.client, "default", "192.0.2.1")
        self.gateways: dict[str, Namespace] = {}
        for which in UPLINKS:
            self.attach(which)
        path = self.cluster[1].config_path
        path.write_text(path.read_text() + WATCHES.format(metrics=METRICS_PORT, port=PORT))

    def attach(self, which: str) -> Namespace:
        """(Re)create gateway ``which``: its namespace, link, routes and TCP server."""
        up = UPLINKS[which]
        gw = self.factory.create(up.name)
        veth(self.fw, up.fw_if, gw, "eth0")
        add_addr(self.fw, up.fw_if, f"{up.fw_addr}/28")
        add_addr(gw, "eth0", f"{up.gw_addr}/28")
        add_addr(gw, "lo", f"{up.server}/32")
        add_route(gw, "192.0.2.0/24", up.fw_addr)
        add_route(self.fw, f"{up.server}/32", up.gw_addr)
        gw.start(traffic_cmd("tcp-echo-server", "--port", str(PORT)))
        self.gateways[which] = gw
        return gw

    def detach(self, which: str) -> None:
        """Gateway ``which`` goes away: its namespace is deleted (fw1's link with it)."""
        self.gateways.pop(which).close()

    def connect(self, which: str, count: int) -> Process:
        """``count`` TCP connections from the client through uplink ``which``, kept open."""
        cmd = traffic_cmd(
            "tcp-client", "--host", UPLINKS[which].server, "--port", str(PORT),
            "--count", str(count), "--wait-stdin",
        )  # fmt: skip
        return self.client.start(cmd, ready="CONNECTED")

    def gateway(self, name: str) -> dict[str, Any]:
        (item,) = [g for g in self.cluster.query(1, "status")["gateways"] if g["name"] == name]
        return dict(item)

    def wait_state(self, name: str, state: str, what: str, timeout: float = 20.0) -> None:
        wait_until(
            lambda: self.gateway(name)["state"] == state,
            timeout,
            what,
            describe=lambda: f"{self.gateway(name)}\n{self.cluster.output(1)[-3000:]}",
        )

    def wait_flush(self, name: str, event: str, count: int) -> dict[str, Any]:
        """Until the watch's ``count``-th removal, on ``event``, is done."""

        def done() -> dict[str, Any] | None:
            gw = self.gateway(name)
            flush = gw["last_flush"]
            ok = gw["flushes"] >= count and flush and flush["event"] == event
            return gw if ok and not gw["flushing"] else None

        return wait_until(
            done, 20.0, f"{name}'s removal on {event}", describe=self.cluster.describe
        )

    def marked(self, mark: int) -> set[CtKey]:
        return {k for k, e in kernel_entries(self.fw).items() if e.mark & 0xFF == mark}


def scrape(ns: Namespace) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    with in_netns(ns.name), urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def external_keys(cluster: Cluster) -> set[CtKey]:
    return set(cluster.external(2, 1))


def udp(n: int) -> Flow:
    return Flow(CLIENT, "198.51.100.200", 20000 + n, 53, "udp")


# --------------------------------------------------------------------------- the agent


def test_gateway_going_away_removes_its_marked_connections_only(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> None:
    site = Site(netns_factory, tmp_path)
    cluster, fw = site.cluster, site.fw
    cluster.start()
    site.wait_state("isp-a", "up", "gateway A up")
    site.wait_state("isp-b", "up", "gateway B up")

    clients = [site.connect("a", 3), site.connect("b", 3)]
    via_a, via_b = site.marked(0x1), site.marked(0x2)
    assert len(via_a) == len(via_b) == 3, kernel_entries(fw)
    # Connections the client cannot hold open: marked for A (one with bits outside the
    # mask: 0x101 & 0xff == 0x1), for B, and not marked.
    insert_flows(fw, [udp(1)], tmp_path, mark=0x1)
    insert_flows(fw, [udp(2)], tmp_path, mark=0x101)
    insert_flows(fw, [udp(3)], tmp_path, mark=0x2)
    insert_flows(fw, [udp(4)], tmp_path, mark=0x0)
    removable = via_a | {udp(1).key, udp(2).key}
    kept = via_b | {udp(3).key, udp(4).key}
    wait_until(
        lambda: (removable | kept) <= external_keys(cluster),
        20.0,
        "fw2 to hold fw1's connections",
        describe=cluster.describe,
    )
    before = scrape(fw)
    assert before[("ctsync_gateway_up", frozenset({("gateway", "isp-a")}))] == 1

    site.detach("a")
    site.wait_state("isp-a", "down", "gateway A down")
    gw = site.wait_flush("isp-a", "down", 1)
    table = kernel_keys(fw)
    assert not removable & table, "connections marked for A are still in fw1's table"
    assert kept <= table, f"others were removed: {kept - table}"
    assert gw["last_flush"]["removed"] >= len(removable)
    assert gw["last_flush"]["error"] is None
    assert gw["probes_lost"] >= 3
    assert gw["transitions"] == {"up": 1, "down": 1}
    assert gw["last_error"] is not None and "ENETUNREACH" in gw["last_error"]
    assert site.gateway("isp-b")["state"] == "up"
    assert site.gateway("isp-b")["flushes"] == 0
    # The removals reach the peer as ordinary DESTROY events.
    wait_until(
        lambda: not removable & external_keys(cluster),
        20.0,
        "fw2 to drop fw1's connections marked for A",
        describe=cluster.describe,
    )
    assert kept <= external_keys(cluster)

    metrics = scrape(fw)
    a, b = frozenset({("gateway", "isp-a")}), frozenset({("gateway", "isp-b")})
    assert metrics[("ctsync_gateway_up", a)] == 0
    assert metrics[("ctsync_gateway_up", b)] == 1
    assert metrics[("ctsync_gateway_state", a | {("state", "down")})] == 1
    assert metrics[("ctsync_gateway_flushed_connections_total", a)] >= len(removable)
    assert metrics[("ctsync_gateway_flushed_connections_total", b)] == 0
    assert metrics[("ctsync_gateway_transitions_total", a | {("to", "down")})] == 1
    assert metrics[("ctsync_gateway_probes_total", a | {("result", "error")})] >= 3
    assert metrics[("ctsync_gateway_probes_total", b | {("result", "ok")})] >= 2
    assert ("ctsync_gateway_probe_rtt_seconds", b) in metrics

    log = cluster.output(1)
    down_lines = [
        line for line in log.splitlines() if "gateway isp-a (icmp 198.51.100.2) is down" in line
    ]
    assert len(down_lines) == 1, log
    assert (
        f"removed {gw['last_flush']['removed']} connections matching mark=0x1/0xff" in down_lines[0]
    )
    assert log.count("gateway isp-a: probe failed: ENETUNREACH") == 1, log  # once, not per probe

    # While A is down, a connection that prefers A (mark 0x1) is made through B ...
    insert_flows(fw, [udp(5)], tmp_path, mark=0x1)
    # ... and when A is back (flush-on "up"), it is removed again to move back to A.
    site.attach("a")
    site.wait_state("isp-a", "up", "gateway A back up")
    gw = site.wait_flush("isp-a", "up", 2)
    table = kernel_keys(fw)
    assert udp(5).key not in table
    assert kept <= table
    assert gw["transitions"] == {"up": 2, "down": 1}
    assert any(
        "gateway isp-a (icmp 198.51.100.2) is up (was down)" in line
        for line in cluster.output(1).splitlines()
    )
    for proc in clients:
        proc.stop()


def test_tcp_probe_times_out_when_the_link_goes_down(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> None:
    site = Site(netns_factory, tmp_path)
    cluster, fw = site.cluster, site.fw
    cluster.start(1)
    site.wait_state("isp-b", "up", "gateway B up")
    site.wait_state("isp-a", "up", "gateway A up")
    insert_flows(fw, [udp(1), udp(2)], tmp_path, mark=0x2)
    insert_flows(fw, [udp(3)], tmp_path, mark=0x1)
    gwb = site.gateways["b"]

    gwb.ip("link", "set", "eth0", "down")  # fw1's wanb loses its carrier: no answer
    site.wait_state("isp-b", "down", "gateway B down")
    gw = site.wait_flush("isp-b", "down", 1)
    table = kernel_keys(fw)
    assert udp(1).key not in table and udp(2).key not in table
    assert udp(3).key in table
    assert gw["probes"]["timeout"] >= 3, gw
    assert gw["last_flush"]["removed"] >= 2
    assert site.gateway("isp-a")["state"] == "up"

    # Back up: flush-on is ["down"] only, so nothing is removed on the way up.
    insert_flows(fw, [udp(4)], tmp_path, mark=0x2)
    gwb.ip("link", "set", "eth0", "up")
    site.wait_state("isp-b", "up", "gateway B back up")
    gw = site.gateway("isp-b")
    assert gw["flushes"] == 1 and gw["last_flush"]["event"] == "down"
    assert udp(4).key in kernel_keys(fw)
    status = cluster.ctl(1, "show", "status")
    assert [g["name"] for g in status["gateways"]] == ["isp-a", "isp-b"]
    assert status["gateways"][1]["target"] == f"tcp 198.51.100.18:{PORT}"


# --------------------------------------------------------------------------- probes and removal


def run_in(ns: Namespace, make: Callable[[], Any]) -> Any:
    """Run a coroutine on a fresh loop in this thread, moved into ``ns``: sockets opened
    by the probers during the run belong to it."""

    async def main() -> Any:
        return await make()

    with in_netns(ns.name):
        return asyncio.run(main())


def test_probers_ipv4_ipv6_and_link_local(netns_factory: NamespaceFactory) -> None:
    here = netns_factory.create("here")
    there = netns_factory.create("there")
    veth(here, "v0", there, "v1")
    for ns, suffix in ((here, 1), (there, 2)):
        iface = "v0" if ns is here else "v1"
        add_addr(ns, iface, f"192.0.2.{suffix}/24")
        add_addr(ns, iface, f"2001:db8::{suffix}/64")
        ns.ip("-6", "addr", "add", f"fe80::{suffix}/64", "dev", iface, "nodad")
    there.start(traffic_cmd("tcp-echo-server", "--port", str(PORT)))

    async def probes() -> dict[str, ProbeResult]:
        icmp4 = IcmpProber("192.0.2.2")
        icmp6 = IcmpProber("2001:db8::2")
        twin6 = IcmpProber("2001:db8::2")  # a second watch of the same address
        local6 = IcmpProber("fe80::2", interface="v0")
        sourced = IcmpProber("192.0.2.2", source="192.0.2.1", interface="v0")
        absent = IcmpProber("192.0.2.77")  # on the link, no such host: no answer
        unroutable = IcmpProber("198.51.100.1")
        tcp6 = TcpProber("2001:db8::2", PORT)
        refused = TcpProber("192.0.2.2", PORT + 1)
        bad_source = IcmpProber("192.0.2.2", source="203.0.113.9")  # not ours: bind fails
        try:
            out: dict[str, ProbeResult] = {}
            for _ in range(3):  # several rounds: sequence numbers and readers reused
                pairs = await asyncio.gather(
                    icmp4.probe(1.0), icmp6.probe(1.0), twin6.probe(1.0), local6.probe(1.0),
                    sourced.probe(1.0), tcp6.probe(1.0), refused.probe(1.0),
                )  # fmt: skip
                for name, result in zip(
                    ("icmp4", "icmp6", "twin6", "local6", "sourced", "tcp6", "refused"),
                    pairs,
                    strict=True,
                ):
                    assert name not in out or out[name].outcome == result.outcome, name
                    out[name] = result
            out["absent"] = await absent.probe(0.3)
            out["unroutable"] = await unroutable.probe(0.3)
            out["bad_source"] = await bad_source.probe(0.3)
            return out
        finally:
            for prober in (icmp4, icmp6, twin6, local6, sourced, absent, unroutable, bad_source):
                prober.close()

    results = run_in(here, probes)
    for name in ("icmp4", "icmp6", "twin6", "local6", "sourced", "tcp6"):
        result = results[name]
        assert result.outcome == "ok", (name, result)
        assert result.rtt is not None and 0 < result.rtt < 1.0, (name, result)
    assert results["refused"].outcome == "error"
    assert "ECONNREFUSED" in (results["refused"].error or "")
    assert results["absent"] == ProbeResult("timeout")
    assert results["unroutable"].outcome == "error"
    assert "ENETUNREACH" in (results["unroutable"].error or "")
    assert results["bad_source"].outcome == "error"
    assert "EADDRNOTAVAIL" in (results["bad_source"].error or "")


PING_SOCKET_PROBE = """
import asyncio
from ctsync.io.probe import IcmpProber

async def main():
    out = []
    for address in ("192.0.2.2", "2001:db8::2"):
        prober = IcmpProber(address)
        results = [await prober.probe(1.0) for _ in range(2)]
        out.append((address, prober.mode, [r.outcome for r in results]))
        prober.close()
    print(out)

asyncio.run(main())
"""


def test_icmp_prober_without_cap_net_raw_uses_a_ping_socket(
    netns_factory: NamespaceFactory,
) -> None:
    here = netns_factory.create("here")
    there = netns_factory.create("there")
    veth(here, "v0", there, "v1")
    for ns, iface, suffix in ((here, "v0", 1), (there, "v1", 2)):
        add_addr(ns, iface, f"192.0.2.{suffix}/24")
        add_addr(ns, iface, f"2001:db8::{suffix}/64")
    # Unprivileged ICMP sockets: allowed for every group in this namespace only.
    here.sysctl("net.ipv4.ping_group_range", "0 2147483647")
    done = here.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", PING_SOCKET_PROBE],
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert ast.literal_eval(done.stdout) == [
        ("192.0.2.2", "dgram", ["ok", "ok"]),
        ("2001:db8::2", "dgram", ["ok", "ok"]),
    ]


def test_remove_connections_ipv4_and_ipv6(tmp_path: Path, ct_netns: Namespace) -> None:
    ns = ct_netns
    v4 = [Flow("192.0.2.1", "198.51.100.1", 1000 + i, 443) for i in range(40)]
    v6 = [Flow("2001:db8:1::1", "2001:db8:2::1", 1000 + i, 443, "udp") for i in range(40)]
    insert_flows(ns, v4[:20], tmp_path, mark=0x11)
    insert_flows(ns, v4[20:], tmp_path, mark=0x12)
    insert_flows(ns, v6[:20], tmp_path, mark=0x11)
    insert_flows(ns, v6[20:], tmp_path, mark=0x2)

    def remove(**spec: str) -> tuple[int, int, str | None]:
        mark, mask = parse_mark(spec.pop("mark"))
        selector = EntryFilter(
            mark=mark,
            mark_mask=mask,
            src=parse_network(spec["src"]) if "src" in spec else None,
        )
        with in_netns(ns.name):
            result = remove_connections(selector)
        return result.removed, result.failed, result.error

    # IPv6 only (src prefix), mark under a mask: the IPv4 entries of mark 0x11 stay.
    assert remove(mark="0x1/0xf", src="2001:db8:1::/48") == (20, 0, None)
    table = kernel_keys(ns)
    assert not {f.key for f in v6[:20]} & table
    assert {f.key for f in v4 + v6[20:]} <= table
    # A full mask filters in the kernel; both families.
    assert remove(mark="0x11") == (20, 0, None)
    assert remove(mark="0x11") == (0, 0, None)
    table = kernel_keys(ns)
    assert {f.key for f in v4[20:] + v6[20:]} <= table
    assert not {f.key for f in v4[:20]} & table
