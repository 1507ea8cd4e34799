"""The docker-compose cluster fails over four ways, and no flow notices more than a pause.

``docker-compose.yml``: client -- fw1/fw2 -- server; ctsync's own VRRP speaker on both
firewalls (VRRPv3, 100 ms adverts, VI_LAN + VI_WAN in one sync group, equal priorities);
the LAN VIP's echo ports forwarded to the server and SNATed to the WAN VIP; strict TCP
tracking (``nf_conntrack_tcp_loose=0``) and invalid packets dropped and counted, so that a
firewall without a flow's state breaks the flow (tests/linux/test_agents.py has that
negative control in namespaces).

One set of flows lives through the whole module: 8 long-lived TCP streams and 4 UDP flows
(an echo every 50 ms each, one thread per flow, in the client container), plus the client
container's own stream. The master is then, in turn, stopped (``docker stop``: a clean
shutdown, priority-0 adverts), killed (``docker kill``: no goodbye), frozen (``docker
pause``: its kernel keeps forwarding, its agent and speaker stop) and cut off its LAN
(``docker network disconnect``: the LAN instance goes to FAULT, the sync group takes the WAN
instance with it). Each time the backup must take over, commit every flow before it adds the
VIPs (no packet dropped as invalid), and every flow must carry on (no reset, no error, a
bounded gap); then the old master comes back (start, unpause, reconnect + restart) as
BACKUP, resyncs the new master's table into its external cache, and the flows are not
disturbed. ``ctsync show statistics --json`` is read in both containers around each step.

A last test is the negative control: the backup's copy of the state thrown away, the same
failover stalls every TCP flow.

The scenarios run in this order on one cluster: stop fw1, kill fw2, pause fw1, disconnect
fw2. A frozen master that thaws still believes it is master; with equal priorities VRRP
then keeps the node with the higher address (fw2), so the pause scenario freezes fw1, and
the test checks that it comes back as BACKUP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.compose import (
    LAN_ADDR,
    SERVER_ADDR,
    VIP_WAN,
    ComposeCluster,
    FlowDriver,
    Report,
    docker,
    peer_stats,
    transitions_to,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TCP_FLOWS = 8
UDP_FLOWS = 4
#: Generous on a shared 2-CPU box: detection (~0.4 s) + commit + one or two TCP
#: retransmissions (0.2, 0.6, 1.4 s after the first loss).
MAX_GAP = 5.0
#: Echoes every flow must make after an event to count as "carrying on".
MOVED = 5


@dataclass
class Site:
    cluster: ComposeCluster
    flows: FlowDriver
    #: The flows' conntrack keys and how many entries a commit must at least carry.
    keys: set[tuple[str, str, str, int, int]]


@pytest.fixture(scope="module")
def site(cluster: ComposeCluster) -> Iterator[Site]:
    flows = FlowDriver(cluster, tcp=TCP_FLOWS, udp=UDP_FLOWS)
    try:
        report = flows.report()
        assert len(report.tcp) == TCP_FLOWS and len(report.udp) == UDP_FLOWS
        assert not report.broken(), report.broken()
        yield Site(cluster, flows, report.keys())
    finally:
        flows.close()


def other(service: str) -> str:
    return "fw2" if service == "fw1" else "fw1"


def roles(cluster: ComposeCluster) -> dict[str, str | None]:
    return {fw: cluster.role(fw) for fw in ("fw1", "fw2")}


def wait_moving(site: Site, since: float, what: str, timeout: float = 30) -> Report:
    """Until every flow made :data:`MOVED` echoes after *since* (unix time)."""
    before = site.flows.report()
    base = before.echoes()

    def moved() -> Report | None:
        report = site.flows.report()
        ok = all(
            f.last_echo is not None
            and f.last_echo > since
            and f.echoes >= base[f.port] + (MOVED if f.proto == "tcp" else 1)
            for f in report.flows
        )
        return report if ok else None

    last: list[Report] = [before]

    def describe() -> str:
        report = last[0] = site.flows.report()
        stuck = [
            f"{f.proto} {f.port}: {f.echoes - base[f.port]} echoes, last {f.last_echo}"
            for f in report.flows
            if f.echoes < base[f.port] + MOVED
        ]
        return f"stuck flows: {stuck}; broken: {report.broken()}"

    result: Report = wait_until(moved, timeout, what, interval=0.2, describe=describe)
    return result


def assert_backup_holds_flows(
    site: Site,
    backup: str,
    master: str,
    timeout: float = 30,
    keys: set[tuple[str, str, str, int, int]] | None = None,
) -> None:
    """The backup's external cache holds every flow of the master, NATed, TCP ESTABLISHED."""
    cluster = site.cluster
    keys = site.keys if keys is None else keys

    def holds() -> bool:
        ext = cluster.external(backup, master)
        return keys <= ext.keys() and all(
            ext[k]["reply"]["dst"] == VIP_WAN
            and ext[k]["reply"]["src"] == SERVER_ADDR
            and (k[0] != "tcp" or ext[k]["tcp"]["state"] == "ESTABLISHED")
            for k in keys
        )

    wait_until(
        holds,
        timeout,
        f"{backup}'s external cache to hold {master}'s flows",
        interval=0.5,
        describe=lambda: f"{backup} statistics: {cluster.stats(backup)}",
    )


def test_the_pair_forwards_nats_and_syncs(site: Site) -> None:
    cluster = site.cluster
    assert roles(cluster) == {"fw1": "MASTER", "fw2": "BACKUP"}
    assert cluster.holds_vips("fw1") and not cluster.holds_vips("fw2")
    for fw in ("fw1", "fw2"):
        loose = cluster.exec(fw, "cat", "/proc/sys/net/netfilter/nf_conntrack_tcp_loose").stdout
        assert loose.strip() == "0", f"{fw} must track TCP strictly"
    # The flows pass fw1 NATed both ways; fw2 has them in its external cache only.
    kernel = cluster.kernel("fw1")
    assert site.keys <= kernel.keys()
    assert all(kernel[k]["reply"]["dst"] == VIP_WAN for k in site.keys)
    assert_backup_holds_flows(site, "fw2", "fw1")
    assert not site.keys & cluster.kernel("fw2").keys(), "fw2's kernel must not hold them yet"
    # Statistics: fw1 owns the entries and sends, fw2 receives and keeps them.
    s1, s2 = cluster.stats("fw1"), cluster.stats("fw2")
    assert s1["internal"]["active"] >= len(site.keys)
    assert s1["sync"]["data_sent"] > 0 and s2["sync"]["data_received"] > 0
    assert peer_stats(s2, "fw1")["up"] and peer_stats(s1, "fw2")["up"]
    assert peer_stats(s2, "fw1")["external_entries"] >= len(site.keys)
    assert s1["sync"]["auth_failed"] == 0 and s2["sync"]["auth_failed"] == 0
    # A second read: the counters move while the flows run (keepalives, updates).
    time.sleep(1.5)
    s2b = cluster.stats("fw2")
    assert s2b["links"][0]["packets_received"] > s2["links"][0]["packets_received"]
    # The server sees the WAN VIP only (SNAT), never the client.
    server_log = cluster.logs("server")
    peers = {line.split()[1] for line in server_log.splitlines() if line.startswith("ACCEPT")}
    udp_peers = {line.split()[1] for line in server_log.splitlines() if line.startswith("UDP-")}
    assert peers == {VIP_WAN} and udp_peers == {VIP_WAN}, server_log[-2000:]


# --------------------------------------------------------------------------- failovers


def _stop(cluster: ComposeCluster, fw: str) -> None:
    docker("stop", "-t", "5", cluster.container(fw))


def _kill(cluster: ComposeCluster, fw: str) -> None:
    docker("kill", cluster.container(fw))


def _pause(cluster: ComposeCluster, fw: str) -> None:
    docker("pause", cluster.container(fw))


def _disconnect(cluster: ComposeCluster, fw: str) -> None:
    docker("network", "disconnect", cluster.network("lan"), cluster.container(fw))


def _start(cluster: ComposeCluster, fw: str) -> None:
    docker("start", cluster.container(fw))


def _unpause(cluster: ComposeCluster, fw: str) -> None:
    docker("unpause", cluster.container(fw))


def _reconnect(cluster: ComposeCluster, fw: str) -> None:
    # The agent's VRRP speaker holds the interface index it started with: the re-created
    # LAN interface needs a fresh start (as a unit restart after a NIC swap would).
    cid = cluster.container(fw)
    docker("network", "connect", "--ip", LAN_ADDR[fw], cluster.network("lan"), cid)
    docker("restart", "-t", "5", cid)


Action = Callable[[ComposeCluster, str], None]

SCENARIOS: list[tuple[str, str, Action, Action]] = [
    # (name, the master then, how it fails, how it comes back)
    ("stop", "fw1", _stop, _start),
    ("kill", "fw2", _kill, _start),
    ("pause", "fw1", _pause, _unpause),
    ("disconnect", "fw2", _disconnect, _reconnect),
]


@pytest.mark.parametrize(
    ("name", "master", "fail", "rejoin"), SCENARIOS, ids=[s[0] for s in SCENARIOS]
)
def test_master_fails_backup_takes_over_flows_carry_on(
    site: Site, name: str, master: str, fail: Action, rejoin: Action
) -> None:
    cluster = site.cluster
    backup = other(master)
    assert roles(cluster) == {master: "MASTER", backup: "BACKUP"}, (
        "the scenarios run in order, each on the previous one's result"
    )
    assert_backup_holds_flows(site, backup, master)
    stats_before = {backup: cluster.stats(backup), master: cluster.stats(master)}
    invalid_before = cluster.invalid_drops(backup)
    wait_moving(site, time.time(), "the flows to run before the failure")

    # --- the master fails ---------------------------------------------------------------
    t0 = time.time()
    fail(cluster, master)
    wait_until(lambda: cluster.role(backup) == "MASTER", 15, f"{backup} to become MASTER")
    status = cluster.status(backup)
    [transition] = transitions_to(status, "MASTER", t0)
    moving = wait_moving(site, t0, f"every flow to carry on through {backup}")
    took = time.time() - t0
    steps = {s["step"]: s for s in transition["steps"]}
    order = [s["step"] for s in transition["steps"]]
    commit = steps["commit"]
    gaps = sorted(f.gap_since(t0, moving.now) for f in moving.tcp)
    print(
        f"{name} {master}: {backup} MASTER at +{transition['at'] - t0:.3f}s, commit"
        f" {commit['result']['committed']} entries in {commit['seconds'] * 1000:.1f} ms, VIPs at"
        f" +{steps['addresses']['started'] - t0:.3f}s; every flow moving after {took:.2f}s;"
        f" TCP gaps median {gaps[len(gaps) // 2]:.2f}s, longest {gaps[-1]:.2f}s"
    )
    assert not moving.broken(), f"flows broken by the failover: {moving.broken()}"
    assert gaps[-1] < MAX_GAP, gaps
    # Commit before VIP: every flow's state reached the kernel before the addresses moved,
    # and no packet met the new master without its state.
    assert order.index("commit") < order.index("addresses"), order
    assert commit["error"] is None and commit["result"]["failed"] == 0, commit
    assert commit["result"]["committed"] >= len(site.keys), commit
    assert steps["addresses"]["error"] is None, steps["addresses"]
    assert cluster.invalid_drops(backup) == invalid_before, "packets dropped as invalid"
    assert cluster.holds_vips(backup)
    kernel = cluster.kernel(backup)
    assert site.keys <= kernel.keys(), "the new master's kernel must hold every flow"
    assert all(kernel[k]["reply"]["dst"] == VIP_WAN for k in site.keys), "NAT changed"
    after = cluster.stats(backup)
    assert after["last_commit"]["committed"] >= len(site.keys), after["last_commit"]
    assert after["last_commit"]["failed"] == 0
    assert after["sync"]["auth_failed"] == 0

    # --- the old master comes back as backup and resyncs ----------------------------------
    t1 = time.time()
    rejoin(cluster, master)
    wait_until(lambda: cluster.role(master) == "BACKUP", 30, f"{master} to rejoin as BACKUP")
    assert_backup_holds_flows(site, master, backup)
    back, new_master = cluster.stats(master), cluster.stats(backup)
    assert peer_stats(back, backup)["up"] and peer_stats(new_master, master)["up"]
    assert peer_stats(back, backup)["external_entries"] >= len(site.keys)
    assert back["sync"]["data_received"] > 0
    assert new_master["sync"]["data_sent"] > after["sync"]["data_sent"], "no resync sent"
    assert new_master["internal"]["active"] >= len(site.keys)
    if name in ("stop", "kill", "disconnect"):  # a fresh agent: a fresh epoch
        assert back["epoch"] != stats_before[master]["epoch"]
    assert not cluster.holds_vips(master)
    # The new master stayed master: one transition into MASTER, none out of it since.
    status = cluster.status(backup)
    assert status["state"] == "MASTER"
    assert len(transitions_to(status, "MASTER", t0)) == 1
    assert not [
        t for t in status["failover"]["transitions"] if float(t["at"]) > transition["at"]
    ], "the new master changed state again"
    moving = wait_moving(site, time.time(), f"the flows to carry on after {master} rejoined")
    assert not moving.broken(), moving.broken()
    print(
        f"{name} {master}: back as BACKUP after {time.time() - t1:.1f}s, external cache"
        f" {peer_stats(back, backup)['external_entries']} entries; longest TCP gap since the"
        f" failure {max(f.gap_since(t0, moving.now) for f in moving.tcp):.2f}s"
    )
    assert max(f.gap_since(t1, moving.now) for f in moving.tcp) < MAX_GAP


def test_every_flow_lived_through_every_failover(site: Site) -> None:
    report = site.flows.stop()
    assert not report.broken(), report.broken()
    assert all(f.echoes > 100 for f in report.flows), report.echoes()
    cluster = site.cluster
    # No reconnection anywhere: the server accepted exactly our flows and the client
    # container's stream, all from the WAN VIP.
    accepts = [ln for ln in cluster.logs("server").splitlines() if ln.startswith("ACCEPT")]
    assert len(accepts) == TCP_FLOWS + 1, accepts
    assert {ln.split()[1] for ln in accepts} == {VIP_WAN}
    stream = cluster.logs("client")
    assert "RESET" not in stream and "BROKEN" not in stream, stream[-3000:]
    assert stream.count("connected ") == 1, stream[-3000:]


def test_negative_control_without_the_state_every_tcp_flow_stalls(site: Site) -> None:
    """The same failover with the backup's copy of the state thrown away (its external cache
    flushed, its sync link cut so that nothing repairs it): every TCP flow must stall, its
    packets dropped as invalid. This is what makes the assertions above able to fail."""
    cluster = site.cluster
    assert roles(cluster) == {"fw1": "MASTER", "fw2": "BACKUP"}
    flows = FlowDriver(cluster, tcp=4, udp=0)
    try:
        keys = flows.report().keys()
        assert_backup_holds_flows(site, "fw2", "fw1", keys=keys)
        docker("network", "disconnect", cluster.network("sync"), cluster.container("fw2"))
        cluster.ctsync("fw2", "flush", "external")
        assert not keys & cluster.external("fw2", "fw1").keys()
        invalid_before = cluster.invalid_drops("fw2")
        t0 = time.time()
        _kill(cluster, "fw1")
        wait_until(lambda: cluster.role("fw2") == "MASTER", 15, "fw2 to become MASTER")
        time.sleep(4)
        report = flows.report()
        late = [f.port for f in report.tcp if f.last_echo is not None and f.last_echo > t0 + 1]
        assert not late, f"TCP flows carried on through a firewall without their state: {late}"
        assert cluster.invalid_drops("fw2") > invalid_before, "no packet was dropped as invalid"
        print(
            f"negative control: 4/4 TCP flows stalled, invalid drops on fw2: "
            f"{cluster.invalid_drops('fw2') - invalid_before}"
        )
    finally:
        flows.close()
