"""Automatic failover end to end: the master dies, the backup takes over, no flow is reset.

Site (``tests.linux.agents.build_failover_site``): client -- LAN -- fw1/fw2 -- WAN -- server,
client traffic SNATed to the WAN VIP, ``nf_conntrack_tcp_loose=0`` and ``ct state invalid``
dropped (and counted) on both firewalls, so a firewall without the flows' state drops them:
the negative control in ``test_agents.py`` shows that such a failover stalls every TCP flow.
Here nobody moves anything by hand: the VIPs belong to VRRP.

1. ``failover.mechanism = "vrrp"``: both agents run ctsync's own speaker (VRRPv3, 100 ms
   adverts, instances VI_LAN and VI_WAN in one sync group, fw1 priority 200, fw2 100);
2. real keepalived 2.2.7 in each firewall (the same instances in ``vrrp_sync_group G1``,
   ``vrrp_notify_fifo``) drives the agents (``mechanism = "keepalived"``, ``notify-fifo``,
   ``sync-group = "G1"``).

Each test puts 20,000 synthetic entries and 20 long-lived TCP flows (an echo every 50 ms, one
thread per flow) plus 4 UDP flows through fw1, waits until fw2's external cache holds them
(and checks that fw2's kernel does not), then SIGKILLs fw1's stack at a random phase and takes
fw1's links down. It asserts: no TCP flow reset or broken, every flow resumed, the longest gap
bounded, fw2 committed every entry, the server only ever saw the VIP.

"Commit before VIP" is checked in the kernel: a watcher in fw2 reads the conntrack table's
size the moment it sees the VIP appear. With ctsync's speaker the whole state is there (and
fw2 dropped no packet as invalid); with keepalived, which adds its VIPs before it tells
anyone, it is not — that second assertion is the negative control of the first.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.linux.agents import (
    CLIENT_ADDR,
    SERVER_ADDR,
    VIP_LAN,
    VIP_WAN,
    CtKey,
    FailoverSite,
    build_failover_site,
    kernel_entries,
    tcp_progress,
    wait_until,
)
from tests.linux.failover_site import (
    KEEPALIVED,
    VRRP_ADVERT,
    VRRP_GROUP,
    CountWatch,
    FlowClient,
    FlowReport,
    Keepalived,
    VipWatch,
    create_entries,
    failover_status,
    holds_vips,
    master_transition,
    step_end,
    vrrp_tables,
    write_ctsync_config,
)
from tests.linux.netns import NamespaceFactory, Process, traffic_cmd

pytestmark = [pytest.mark.linux, pytest.mark.timeout(120)]

ENTRIES = 20_000
TCP_FLOWS = 20
UDP_FLOWS = 4
TCP_PORT = 5000
UDP_PORT = 5300
PAYLOAD = 14  # bytes of one echo of the flow client
#: Generous on a shared 2-CPU box: detection (~0.3 s) + commit + one or two TCP
#: retransmissions (0.2, 0.6, 1.4, 3.0 s after the first loss) is 0.5-2 s here.
MAX_GAP = 5.0
VIPS = (VIP_LAN, VIP_WAN)


@dataclass
class Site:
    site: FailoverSite
    server: Process
    keepalived: dict[int, Keepalived]


@pytest.fixture
def failover_site(netns_factory: NamespaceFactory, tmp_path: Path) -> Iterator[Site]:
    """The site without VIPs (VRRP adds them) and with both echo servers running; agents'
    and keepalived's logs are printed at teardown (pytest shows them on failure)."""
    site = build_failover_site(netns_factory, tmp_path)
    site.del_vips(1)
    server = site.server.start(traffic_cmd("tcp-echo-server", "--port", str(TCP_PORT)))
    site.server.start(traffic_cmd("udp-echo-server", "--port", str(UDP_PORT)))
    holder = Site(site, server, {})
    yield holder
    for node_id in (1, 2):
        print(site.cluster.output(node_id)[-15_000:])
    for node_id, ka in holder.keepalived.items():
        print(f"--- keepalived fw{node_id} ---\n{ka.output()[-8_000:]}")


def wait_role(site: FailoverSite, node_id: int, state: str, timeout: float = 15.0) -> None:
    wait_until(
        lambda: failover_status(site.cluster, node_id).get("state") == state,
        timeout,
        f"fw{node_id}'s agent to report failover state {state}",
        describe=lambda: str(failover_status(site.cluster, node_id)),
    )


def flow_keys(flows: FlowClient) -> set[CtKey]:
    tcp = {("tcp", CLIENT_ADDR, SERVER_ADDR, p, TCP_PORT) for p in flows.tcp_ports}
    udp = {("udp", CLIENT_ADDR, SERVER_ADDR, p, UDP_PORT) for p in flows.udp_ports}
    return tcp | udp


def load_and_sync(site: FailoverSite) -> FlowClient:
    """Synthetic entries in fw1, the flows through fw1; until fw2's external cache holds
    all of it (TCP flows ESTABLISHED, with the SNAT reply tuple)."""
    assert create_entries(site.fw(1).name, ENTRIES) == 0
    flows = FlowClient(
        site.client,
        SERVER_ADDR,
        tcp_port=TCP_PORT,
        tcp=TCP_FLOWS,
        udp_port=UDP_PORT,
        udp=UDP_FLOWS,
    )
    assert len(flows.tcp_ports) == TCP_FLOWS and len(flows.udp_ports) == UDP_FLOWS
    keys = flow_keys(flows)
    cluster = site.cluster

    def synced() -> bool:
        if cluster.query(2, "counts")["external"] < ENTRIES + len(keys):
            return False
        ext = cluster.external(2, 1)
        return keys <= ext.keys() and all(
            ext[k]["reply"]["dst"] == VIP_WAN
            and (k[0] != "tcp" or ext[k]["tcp"]["state"] == "ESTABLISHED")
            for k in keys
        )

    wait_until(synced, 30, "fw2's external cache to hold fw1's entries and flows", interval=0.25)
    assert_no_takeover_yet(site)
    # The state is in fw2's external cache only: what fw2 forwards after the failover, it
    # forwards because it committed it.
    assert not keys & kernel_entries(site.fw(2)).keys()
    assert site.fw(2).read_sysctl("net.netfilter.nf_conntrack_tcp_loose") == "0"
    return flows


def assert_no_takeover_yet(site: FailoverSite) -> None:
    """While fw1 lives, fw2 must never have been MASTER (a VRRP flap: e.g. adverts late
    because an agent's loop was busy with the sync load). A flap commits fw1's state into
    fw2's kernel and adds the VIPs on both nodes for a while."""
    transitions = failover_status(site.cluster, 2).get("transitions") or []
    masters = [t for t in transitions if t.get("to") == "MASTER"]
    assert not masters, f"fw2 became MASTER while fw1 was alive (flap): {masters}"


@dataclass
class Failover:
    death: float
    report: FlowReport
    vip_at: float | None
    count_at_vip: int | None
    kernel_full_at: float | None
    invalid_drops: int
    took: float


def kill_master_and_watch(site: FailoverSite, flows: FlowClient, crash: Any) -> Failover:
    """Watch fw2, kill fw1's stack at a random phase (``crash()`` returns the death time),
    take fw1's links down, wait until every TCP flow moved on; stop the client."""
    fw2 = site.fw(2).name
    target = ENTRIES + TCP_FLOWS  # fw2's own handful of entries make this a lower bound
    vip_watch = VipWatch(fw2)
    count_watch = CountWatch(fw2, target)
    try:
        invalid_before = site.invalid_drops(2)
        time.sleep(random.uniform(0.2, 0.2 + 2 * VRRP_ADVERT))
        assert_no_takeover_yet(site)
        death = crash()
        site.links(1, "down")
        # fw1 forwards until its links are down: count progress from here on.
        flows.mark()
        before = tcp_progress(site.client, SERVER_ADDR, TCP_PORT)
        assert sorted(before) == sorted(flows.tcp_ports)

        def all_moved() -> bool:
            now = tcp_progress(site.client, SERVER_ADDR, TCP_PORT)
            return sorted(now) == sorted(before) and all(
                now[port] >= before[port] + 5 * PAYLOAD for port in before
            )

        wait_until(
            all_moved,
            25,
            "every TCP flow to carry on through fw2",
            describe=lambda: (
                f"fw2 VIPs: {vip_watch.added}, invalid drops:"
                f" {site.invalid_drops(2) - invalid_before}, failover:"
                f" {failover_status(site.cluster, 2)}"
            ),
        )
        took = time.time() - death
        report = flows.stop()
        vip_at = vip_watch.first(VIPS)
        counts = [vip_watch.count_at.get(a) for a in VIPS]
        return Failover(
            death=death,
            report=report,
            vip_at=vip_at,
            count_at_vip=None if None in counts else min(c for c in counts if c is not None),
            kernel_full_at=count_watch.reached,
            invalid_drops=site.invalid_drops(2) - invalid_before,
            took=took,
        )
    finally:
        vip_watch.close()
        count_watch.close()


def master_on_fw2(site: FailoverSite, death: float) -> dict[str, Any]:
    """fw2's (finished) transition into MASTER after *death*."""

    def done() -> dict[str, Any] | None:
        transition = master_transition(failover_status(site.cluster, 2), death - 0.001)
        return transition if transition is not None and transition.get("done") else None

    result: dict[str, Any] = wait_until(done, 20, "fw2's MASTER transition to finish")
    return result


def assert_flows_survived(holder: Site, flows: FlowClient, outcome: Failover) -> None:
    report = outcome.report
    summary = report.summary()
    print("flows:", summary, f"invalid drops on fw2: {outcome.invalid_drops}")
    assert report.resets() == 0, f"TCP resets: {summary}"
    assert report.errors() == [], summary
    assert report.resumed() == TCP_FLOWS, summary
    assert report.resumed(1, report.udp) == UDP_FLOWS, summary
    assert 0 < report.longest_gap() < MAX_GAP, summary
    # Every flow (all TCP, all UDP) is in fw2's table, NATed as on fw1.
    kernel = kernel_entries(holder.site.fw(2))
    for key in flow_keys(flows):
        entry = kernel.get(key)
        assert entry is not None, f"{key} not in fw2's table"
        assert entry.reply["src"] == SERVER_ADDR and entry.reply["dst"] == VIP_WAN, entry.raw
    accepts = {line.split()[2] for line in holder.server.lines if line.startswith("ACCEPT")}
    assert accepts == {VIP_WAN}, "the server must only ever see the VIP"


def assert_committed_all(transition: dict[str, Any]) -> dict[str, Any]:
    steps = {s["step"]: s for s in transition["steps"]}
    assert "commit" in steps, transition
    commit = steps["commit"]
    assert commit["error"] is None, commit
    result = commit["result"]
    assert result["failed"] == 0 and not result.get("timed_out"), result
    assert result["committed"] == result["attempted"] >= ENTRIES + TCP_FLOWS + UDP_FLOWS, result
    return steps


# --------------------------------------------------------------------------- 1. ctsync's VRRP


def test_vrrp_speaker_failover_commits_before_the_vips(failover_site: Site) -> None:
    holder = failover_site
    site, cluster = holder.site, holder.site.cluster
    for node_id in (1, 2):
        write_ctsync_config(
            cluster,
            node_id,
            failover={"mechanism": "vrrp"},
            vrrp=vrrp_tables(node_id),
            vrrp_group=VRRP_GROUP,
        )
    # fw1 first, so that it is master from the start (no preemption in the test).
    cluster.start(1, wait=False)
    wait_until(lambda: holds_vips(site, 1), 15, "fw1's speaker to take the VIPs")
    wait_role(site, 1, "MASTER")
    cluster.start(2)
    wait_role(site, 2, "BACKUP")
    assert not holds_vips(site, 2)
    assert cluster.query(2, "status")["vrrp"], "fw2's status must show its VRRP speaker"
    flows = load_and_sync(site)

    def crash() -> float:
        death = time.time()
        cluster.kill(1)  # the speaker dies with the agent: no priority-0 advert
        return death

    outcome = kill_master_and_watch(site, flows, crash)
    transition = master_on_fw2(site, outcome.death)
    print(
        f"fw2 took over: transition at +{transition['at'] - outcome.death:.3f}s, VIPs at"
        f" +{(outcome.vip_at or 0) - outcome.death:.3f}s, all flows moving again after"
        f" {outcome.took:.2f}s; steps:",
        [(s["step"], round(s["started"] - outcome.death, 3)) for s in transition["steps"]],
    )
    assert_flows_survived(holder, flows, outcome)
    steps = assert_committed_all(transition)
    assert transition["from"] == "BACKUP"
    order = [s["step"] for s in transition["steps"]]
    assert order.index("commit") < order.index("addresses"), order
    # Commit before VIP, seen by the kernel: when the VIPs appeared, the table already held
    # every entry; and fw2 dropped nothing as invalid (no packet met it without its state).
    assert outcome.vip_at is not None, "fw2 never added the VIPs"
    commit_end = step_end(transition, "commit")
    assert commit_end is not None and commit_end <= outcome.vip_at, (commit_end, outcome.vip_at)
    assert outcome.count_at_vip is not None and outcome.count_at_vip >= ENTRIES + TCP_FLOWS, (
        f"fw2 held {outcome.count_at_vip} entries when its VIPs appeared"
    )
    assert outcome.invalid_drops == 0
    assert steps["addresses"]["error"] is None
    assert holds_vips(site, 2)
    assert cluster.query(2, "status")["state"] == "MASTER"


# --------------------------------------------------------------------------- 2. keepalived


def test_keepalived_notify_fifo_drives_the_failover(failover_site: Site, tmp_path: Path) -> None:
    assert Path(KEEPALIVED).exists(), f"this test runs real keepalived (2.2.x): {KEEPALIVED}"
    holder = failover_site
    site, cluster = holder.site, holder.site.cluster
    fifos = {node_id: tmp_path / f"fw{node_id}.fifo" for node_id in (1, 2)}
    for node_id, fifo in fifos.items():
        os.mkfifo(fifo, 0o600)  # made here: neither reader nor writer races to create it
        write_ctsync_config(
            cluster,
            node_id,
            failover={
                "mechanism": "keepalived",
                "notify-fifo": str(fifo),
                "sync-group": VRRP_GROUP,
            },
        )
    cluster.start()
    for node_id in (1, 2):
        ka = Keepalived(site.fw(node_id), node_id, tmp_path, fifo=fifos[node_id])
        holder.keepalived[node_id] = ka
        ka.start()
        if node_id == 1:
            wait_until(lambda: holds_vips(site, 1), 15, "keepalived on fw1 to take the VIPs")
            wait_role(site, 1, "MASTER")
    wait_role(site, 2, "BACKUP")
    assert not holds_vips(site, 2)
    flows = load_and_sync(site)

    def crash() -> float:
        death: float = holder.keepalived[1].crash()  # VRRP child first: no priority 0
        cluster.kill(1)
        return death

    outcome = kill_master_and_watch(site, flows, crash)
    transition = master_on_fw2(site, outcome.death)
    print(
        f"fw2 took over: VIPs at +{(outcome.vip_at or 0) - outcome.death:.3f}s, FIFO"
        f" transition at +{transition['at'] - outcome.death:.3f}s, all flows moving again"
        f" after {outcome.took:.2f}s; invalid drops {outcome.invalid_drops}; steps:",
        [(s["step"], round(s["started"] - outcome.death, 3)) for s in transition["steps"]],
    )
    assert_flows_survived(holder, flows, outcome)
    assert_committed_all(transition)
    assert "keepalived" in transition["reason"] and VRRP_GROUP in transition["reason"]
    # keepalived adds its VIPs first and only then writes the FIFO: the state reached the
    # kernel after the VIPs. This is the ordering check of the test above failing as it
    # must when the order is wrong.
    assert outcome.vip_at is not None
    assert outcome.count_at_vip is not None and outcome.count_at_vip < ENTRIES, (
        f"fw2 already held {outcome.count_at_vip} entries when keepalived added the VIPs"
    )
    assert outcome.kernel_full_at is not None and outcome.kernel_full_at > outcome.vip_at
