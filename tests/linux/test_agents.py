"""Real ctsync agents in network namespaces: sync, loss, restarts, failover with NAT, auth.

Every test builds its own firewalls (``tests.linux.agents.Cluster``: N namespaces on one
sync L2 segment, a bridge in a "switch" namespace), starts ``python -m ctsync agent`` in
each, changes the kernel conntrack tables (``conntrack -R`` for bursts of creates, ctnetlink
updates and deletes from the test thread moved into the namespace) and watches the agents
through the ``ctsync`` CLI and the control socket. "Converged" always means exactly: each
node's internal cache holds its kernel table, and every other node's external cache of it
is equal to it, key by key and field by field (``Cluster.divergence``).

The failover tests route real TCP and UDP flows through fw1 (SNAT to the server-side VIP,
strict TCP tracking), fail over to fw2 by hand, and check that the flows survive only when
fw2 committed the synced state: the negative control proves the check can fail.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ctsync.core.entry import status_names
from tests.linux.agents import (
    CLIENT_ADDR,
    DATA,
    FAST_SYNC,
    SERVER_ADDR,
    VIP_WAN,
    Cluster,
    CtKey,
    Eavesdropper,
    FailoverSite,
    Flow,
    build_failover_site,
    cache_view,
    datagram_header,
    delete_flows,
    insert_flows,
    kernel_entries,
    kernel_keys,
    make_flows,
    make_flows6,
    set_marks,
    tcp_progress,
    wait_until,
    write_key,
)
from tests.linux.netns import NamespaceFactory, Process, traffic_cmd

pytestmark = [pytest.mark.linux, pytest.mark.timeout(120)]

BURST = 5000
TCP_PORT = 5000
UDP_PORT = 5300
TCP_FLOWS = 10
UDP_FLOWS = 4


def run_concurrently(*jobs: Callable[[], object]) -> None:
    """Run the jobs in threads at once; re-raise the first failure."""
    errors: list[BaseException] = []

    def wrap(job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]


def external_via_cli(cluster: Cluster, viewer: int, owner: int) -> dict[CtKey, dict[str, Any]]:
    """``ctsync show cache external --json`` on *viewer*, entries of *owner* only."""
    entries = cluster.ctl(viewer, "show", "cache", "external")
    assert all("peer" in e for e in entries)
    return cache_view(e for e in entries if e["peer"] == owner)


def assert_external_is_kernel(
    cluster: Cluster, viewer: int, owner: int
) -> dict[CtKey, dict[str, Any]]:
    """*viewer*'s external cache of *owner* (via the CLI) is *owner*'s kernel table:
    same keys, and per entry the same mark, TCP state, reply tuple and ASSURED flag."""
    ext = external_via_cli(cluster, viewer, owner)
    kernel = kernel_entries(cluster[owner].ns)
    assert set(ext) == set(kernel), (
        f"fw{viewer}'s external cache of fw{owner}: {len(ext)} entries, kernel {len(kernel)}; "
        f"missing e.g. {sorted(set(kernel) - set(ext))[:3]}, "
        f"extra e.g. {sorted(set(ext) - set(kernel))[:3]}"
    )
    for key, entry in kernel.items():
        got = ext[key]
        reply = {k: str(v) for k, v in got["reply"].items() if k != "zone"}
        want = (entry.mark, entry.state, entry.reply, "ASSURED" in entry.flags)
        have = (
            got["mark"],
            (got.get("tcp") or {}).get("state"),
            reply,
            "ASSURED" in status_names(got["status"]),
        )
        assert have == want, f"{key}: external {got} vs kernel {entry.raw}"
    return ext


def sync_counter(cluster: Cluster, node_id: int, name: str) -> int:
    return int(cluster.stats(node_id)["sync"][name])


def peer_status(cluster: Cluster, node_id: int, peer: int) -> dict[str, Any] | None:
    for item in cluster.query(node_id, "status")["peers"]:
        if item["node"] == peer:
            result: dict[str, Any] = item
            return result
    return None


def assert_lost_consistent(stats: dict[str, Any]) -> None:
    """``message_tracking.lost`` is the protocol's own count, in every place it is shown."""
    lost = stats["message_tracking"]["lost"]
    assert lost == stats["sync"]["lost"] == sum(p["lost"] for p in stats["peers"]), stats


# --------------------------------------------------------------------------- 1. bursts


def test_two_nodes_burst_updates_destroys_commit_and_repair(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = make_cluster(2)
    cluster.start()
    flows = make_flows(1, BURST)
    flows6 = make_flows6(1, 500)
    insert_flows(cluster[1].ns, flows, tmp_path, mark=1)
    insert_flows(cluster[1].ns, flows6, tmp_path, mark=6)
    total = BURST + len(flows6)
    cluster.wait_converged(timeout=30)
    ext = assert_external_is_kernel(cluster, 2, 1)
    assert len(ext) == total
    assert {e["mark"] for e in ext.values()} == {1, 6}

    marks = {f.key: 0x100 + i for i, f in enumerate(flows[:1000] + flows6[:100])}
    assert set_marks(cluster[1].ns, marks) == len(marks)
    destroyed = flows[1000:2000] + flows6[400:]
    delete_flows(cluster[1].ns, destroyed)
    total -= len(destroyed)
    cluster.wait_converged(timeout=30)
    ext = assert_external_is_kernel(cluster, 2, 1)
    assert len(ext) == total
    assert all(ext[key]["mark"] == mark for key, mark in marks.items())
    assert not ext.keys() & {f.key for f in destroyed}

    count = cluster.cli(2, "show", "cache", "external", "--count")
    assert count.returncode == 0 and count.stdout.strip() == str(total)
    stats = cluster.ctl(2, "show", "statistics")
    assert stats["external"]["active"] == total
    assert stats["message_tracking"]["lost"] == 0
    assert_lost_consistent(stats)
    sender = cluster.ctl(1, "show", "statistics")
    assert sender["internal"]["active"] == total
    assert sender["queue_entries"] == 0, "every DATA acknowledged, nothing left to resend"

    # Commit: fw2's kernel table becomes fw1's, entry for entry; twice (create, then update).
    for _ in range(2):
        result = cluster.ctl(2, "commit")
        assert (result["attempted"], result["committed"], result["failed"]) == (total, total, 0)
        kernel1, kernel2 = kernel_entries(cluster[1].ns), kernel_entries(cluster[2].ns)
        assert kernel1.keys() == kernel2.keys()
        for key, entry in kernel1.items():
            other = kernel2[key]
            assert (other.mark, other.state, other.reply, other.flags) == (
                entry.mark,
                entry.state,
                entry.reply,
                entry.flags,
            ), f"{entry.raw}\n{other.raw}"
    assert cluster.ctl(2, "show", "status")["last_commit"]["committed"] == total
    # fw2 now owns those connections too: they reach fw1 as fw2's entries.
    cluster.wait_converged(timeout=30)

    # Anti-entropy: an external cache emptied behind the protocol's back is repaired by
    # the digest exchange alone (digest-interval is 1 s here), without any resync.
    flushed = cluster.cli(2, "flush", "external")
    assert flushed.returncode == 0, flushed.stderr
    assert flushed.stdout.strip() == f"{total} entries flushed"
    bulks = sync_counter(cluster, 2, "bulk_received")
    cluster.wait_converged(timeout=20)
    assert sync_counter(cluster, 2, "digest_mismatches") > 0
    assert sync_counter(cluster, 1, "repairs_sent") > 0
    assert sync_counter(cluster, 2, "bulk_received") == bulks, "repaired by digest, not resync"


def test_three_nodes_two_generating_at_once(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = make_cluster(3)
    cluster.start()
    first = make_flows(1, BURST)
    insert_flows(cluster[1].ns, first, tmp_path)
    cluster.wait_converged(timeout=30)
    for viewer in (2, 3):
        assert len(assert_external_is_kernel(cluster, viewer, 1)) == BURST

    own3 = make_flows(3, 3000)
    marks1 = {f.key: 7 for f in first[:1000]}

    def on_fw1() -> None:
        insert_flows(cluster[1].ns, make_flows(1, 2000, base=BURST), tmp_path)
        set_marks(cluster[1].ns, marks1)
        delete_flows(cluster[1].ns, first[1000:1500])

    def on_fw3() -> None:
        insert_flows(cluster[3].ns, own3, tmp_path, mark=3)
        set_marks(cluster[3].ns, {f.key: 33 for f in own3[:500]})
        delete_flows(cluster[3].ns, own3[2500:])

    run_concurrently(on_fw1, on_fw3)
    cluster.wait_converged(timeout=40)
    for viewer, owner in ((2, 1), (3, 1), (1, 3), (2, 3)):
        assert_external_is_kernel(cluster, viewer, owner)
    assert len(cluster.internal(1)) == BURST + 2000 - 500
    assert len(cluster.internal(3)) == 2500
    ext = cluster.external(2, 1)
    assert all(ext[key]["mark"] == 7 for key in marks1)
    for node_id in (1, 2, 3):
        assert_lost_consistent(cluster.ctl(node_id, "show", "statistics"))


# --------------------------------------------------------------------------- 2. loss


def change_both(
    cluster: Cluster, new1: list[Flow], new2: list[Flow], mark: int, tmp_path: Path
) -> None:
    """Creates, then mark updates, then destroys, on fw1 and fw2 at once."""
    ns1, ns2 = cluster[1].ns, cluster[2].ns
    run_concurrently(
        lambda: insert_flows(ns1, new1, tmp_path), lambda: insert_flows(ns2, new2, tmp_path)
    )
    run_concurrently(
        lambda: set_marks(ns1, {f.key: mark for f in new1[:1000]}),
        lambda: set_marks(ns2, {f.key: mark for f in new2[:300]}),
    )
    run_concurrently(
        lambda: delete_flows(ns1, new1[2000:2500]), lambda: delete_flows(ns2, new2[800:])
    )


@pytest.mark.timeout(150)
def test_lossy_sync_link_converges_exactly(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    # peer-dead-after 2 s: at 30 % loss ten ALIVEs in a row are lost only once in 170,000.
    # Loss at 10 %, then 30 %, then a partition; each time creates, updates and destroys
    # on both nodes, and exact convergence while the loss goes on.
    cluster = make_cluster(2, sync={**FAST_SYNC, "peer-dead-after": 2.0})
    cluster.start()
    settle: dict[int, float] = {}
    for round_, per_mille in enumerate((100, 300)):
        cluster.set_loss(per_mille)
        new1 = make_flows(1, 3000, base=3000 * round_)
        new2 = make_flows(2, 1000, base=3000 * round_)
        change_both(cluster, new1, new2, per_mille, tmp_path)
        settle[per_mille] = cluster.wait_converged(timeout=30)
        ext = cluster.external(2, 1)
        assert all(ext[f.key]["mark"] == per_mille for f in new1[:1000])
    print("convergence after the changes (s):", settle)

    assert cluster.dropped() > 0
    stats = {node_id: cluster.ctl(node_id, "show", "statistics") for node_id in (1, 2)}
    total = {
        name: sum(s["sync"][name] for s in stats.values())
        for name in ("resent", "nacks_sent", "nacks_received", "gone_sent", "peer_down")
    }
    print("sync counters:", total)
    assert total["resent"] > 0 and total["nacks_sent"] > 0 and total["nacks_received"] > 0
    for node_id, s in stats.items():
        assert_lost_consistent(s)
        if total["gone_sent"] == 0 and total["peer_down"] == 0:
            # Every gap was filled by a resend: nothing was lost for good.
            assert s["message_tracking"]["lost"] == 0, f"fw{node_id}: {s['sync']}"
        text = cluster.cli(node_id, "show", "statistics").stdout
        assert f"{s['message_tracking']['lost']:20d} Lost msgs" in text

    # A partition longer than peer-dead-after: each side declares the other down and drops
    # its resend queue, so every DATA sent during the partition is lost for good. The
    # receivers must count exactly those, and anti-entropy must still repair every entry.
    before = {n: cluster.stats(n) for n in (1, 2)}
    cluster.set_loss(1000)
    new1 = make_flows(1, 3000, base=6000)
    new2 = make_flows(2, 1000, base=6000)
    change_both(cluster, new1, new2, 1000, tmp_path)
    wait_until(
        lambda: not any(p["up"] for n in (1, 2) for p in cluster.stats(n)["peers"]),
        10,
        "both sides to see the other down",
    )
    sent = {
        n: cluster.stats(n)["sync"]["data_sent"] - before[n]["sync"]["data_sent"] for n in (1, 2)
    }
    cluster.set_loss(0)
    took = cluster.wait_converged(timeout=30)
    print(f"converged {took:.1f}s after the partition; DATA sent during it: {sent}")
    for receiver, sender in ((1, 2), (2, 1)):
        after = cluster.ctl(receiver, "show", "statistics")
        assert_lost_consistent(after)
        lost = {p["node"]: p["lost"] for p in after["peers"]}[sender]
        lost_before = {p["node"]: p["lost"] for p in before[receiver]["peers"]}[sender]
        assert lost - lost_before == sent[sender] > 0, f"fw{receiver}: {after['sync']}"
        assert after["sync"]["digest_mismatches"] > before[receiver]["sync"]["digest_mismatches"]


# --------------------------------------------------------------------------- 3. restarts


class CountSampler:
    """Samples *viewer*'s external entry count of *owner* every 20 ms in a thread."""

    def __init__(self, cluster: Cluster, viewer: int, owner: int) -> None:
        self.cluster, self.viewer, self.owner = cluster, viewer, owner
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            peer = peer_status(self.cluster, self.viewer, self.owner)
            self.counts.append(peer["external_entries"] if peer else 0)

    def __enter__(self) -> CountSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize("victim", [1, 2], ids=["sender", "receiver"])
def test_kill9_restart_converges(
    make_cluster: Callable[..., Cluster], tmp_path: Path, victim: int
) -> None:
    """fw1 owns 3,000 entries (the big sender), fw2 500. One agent dies with SIGKILL; both
    tables change while it is down; after a restart everything is exact again."""
    cluster = make_cluster(2)
    cluster.start()
    flows = {1: make_flows(1, 3000), 2: make_flows(2, 500)}
    for node_id, node_flows in flows.items():
        insert_flows(cluster[node_id].ns, node_flows, tmp_path)
    cluster.wait_converged(timeout=30)
    survivor = 3 - victim
    old_epoch = cluster.query(victim, "status")["epoch"]

    cluster.kill(victim)
    wait_until(
        lambda: not (peer_status(cluster, survivor, victim) or {"up": True})["up"],
        10,
        f"fw{survivor} to see fw{victim} down",
    )
    changed: dict[int, dict[CtKey, int]] = {}
    destroyed: dict[int, set[CtKey]] = {}
    for node_id, node_flows in flows.items():
        third = len(node_flows) // 10
        destroyed[node_id] = {f.key for f in node_flows[:third]}
        changed[node_id] = {f.key: 9 for f in node_flows[third : 2 * third]}
        delete_flows(cluster[node_id].ns, node_flows[:third])
        set_marks(cluster[node_id].ns, changed[node_id])
        insert_flows(cluster[node_id].ns, make_flows(node_id, 200, base=10_000), tmp_path)
    # The dead peer's last known state stays: it is what a failover would commit.
    assert set(cluster.external(survivor, victim)) == {f.key for f in flows[victim]}

    kept = len(flows[victim]) - len(destroyed[victim])  # in the table before and after
    with CountSampler(cluster, survivor, victim) as sampler:
        cluster.start(victim)
        took = cluster.wait_converged(timeout=30)
    # The full transfer replaces the old copy by mark-and-sweep: at no moment may the
    # survivor lose entries that stayed in the table (a failover then would drop them).
    assert sampler.counts and min(sampler.counts) >= kept, sampler.counts
    print(f"converged {took:.1f}s after the restart of fw{victim}")
    new_epoch = cluster.query(victim, "status")["epoch"]
    assert new_epoch > old_epoch
    assert (peer_status(cluster, survivor, victim) or {})["epoch"] == new_epoch
    for viewer, owner in ((survivor, victim), (victim, survivor)):
        ext = assert_external_is_kernel(cluster, viewer, owner)
        assert not ext.keys() & destroyed[owner], "entries destroyed while down must go"
        assert all(ext[key]["mark"] == 9 for key in changed[owner])
        assert len(ext) == len(flows[owner]) - len(destroyed[owner]) + 200
    for node_id in (1, 2):
        assert_lost_consistent(cluster.ctl(node_id, "show", "statistics"))


# --------------------------------------------------------------------------- 4. failover


@dataclass
class Traffic:
    server: Process
    client: Process
    tcp_ports: list[int]
    udp_ports: list[int]


def start_traffic(site: FailoverSite) -> Traffic:
    """10 long-lived echoed TCP flows (every 50 ms) and 4 finished UDP flows through fw1."""
    server = site.server.start(traffic_cmd("tcp-echo-server", "--port", str(TCP_PORT)))
    site.server.start(traffic_cmd("udp-echo-server", "--port", str(UDP_PORT)))
    client = site.client.popen(
        traffic_cmd(
            *("tcp-client", "--host", SERVER_ADDR, "--port", str(TCP_PORT)),
            *("--count", str(TCP_FLOWS), "--interval", "0.05", "--wait-stdin"),
            *("--timeout", "60"),
        )
    )
    client.wait_line("CONNECTED", 15)
    udp = site.client.popen(
        traffic_cmd(
            *("udp-client", "--host", SERVER_ADDR, "--port", str(UDP_PORT)),
            *("--count", str(UDP_FLOWS), "--rounds", "3"),
        )
    )
    assert udp.finish(20) == 0, udp.output()
    return Traffic(
        server=server,
        client=client,
        tcp_ports=sorted(int(x.split()[2]) for x in client.lines if x.startswith("CONN ")),
        udp_ports=sorted(int(x.split()[2]) for x in udp.lines if x.startswith("FLOW ")),
    )


def flow_keys(traffic: Traffic) -> set[CtKey]:
    tcp = {("tcp", CLIENT_ADDR, SERVER_ADDR, p, TCP_PORT) for p in traffic.tcp_ports}
    udp = {("udp", CLIENT_ADDR, SERVER_ADDR, p, UDP_PORT) for p in traffic.udp_ports}
    return tcp | udp


def wait_synced(
    site: FailoverSite, traffic: Traffic, viewer: int = 2, owner: int = 1
) -> dict[CtKey, dict[str, Any]]:
    """Until *viewer*'s external cache of *owner* holds every flow, TCP ones ESTABLISHED,
    all with the SNAT reply tuple."""
    want = flow_keys(traffic)

    def synced() -> dict[CtKey, dict[str, Any]] | None:
        ext = site.cluster.external(viewer, owner)
        if not want <= ext.keys():
            return None
        for key in want:
            entry = ext[key]
            if entry["reply"]["dst"] != VIP_WAN:
                return None
            if key[0] == "tcp" and entry["tcp"]["state"] != "ESTABLISHED":
                return None
        return ext

    return wait_until(synced, 15, f"fw{viewer}'s external cache to hold every flow of fw{owner}")


def fail_over(site: FailoverSite, old: int, new: int, *, commit: bool) -> dict[str, Any] | None:
    """*old* dies (agent SIGKILLed, links down, VIPs gone); *new* commits (or not), takes the
    VIPs and announces them with gratuitous ARP. Returns the commit's JSON result."""
    cluster = site.cluster
    cluster.kill(old)
    site.links(old, "down")
    site.del_vips(old)
    result: dict[str, Any] | None = None
    if commit:
        proc = cluster.cli(new, "commit", "--json")
        assert proc.returncode == 0, f"commit failed: {proc.stdout}\n{proc.stderr}"
        result = json.loads(proc.stdout)
    site.add_vips(new)
    site.announce_vips(new)
    return result


def wait_flows_carry_on(site: FailoverSite, traffic: Traffic, via: int) -> float:
    """Until every TCP flow made 10 more echo rounds (a round is ~12 bytes); returns the
    time that took."""
    started = time.monotonic()
    at_failover = tcp_progress(site.client, SERVER_ADDR, TCP_PORT)
    assert sorted(at_failover) == traffic.tcp_ports, "a TCP connection is gone"

    def all_moved() -> bool:
        now = tcp_progress(site.client, SERVER_ADDR, TCP_PORT)
        return sorted(now) == traffic.tcp_ports and all(
            now[port] >= at_failover[port] + 120 for port in traffic.tcp_ports
        )

    wait_until(
        all_moved,
        20,
        f"every TCP flow to carry on through fw{via}",
        describe=lambda: (
            f"{at_failover} -> {tcp_progress(site.client, SERVER_ADDR, TCP_PORT)}\n"
            f"fw{via} invalid drops: {site.invalid_drops(via)}\n"
            + site.fw(via).conntrack("-L").stdout
        ),
    )
    return time.monotonic() - started


def assert_flows_in_kernel(site: FailoverSite, traffic: Traffic, node_id: int) -> None:
    """Every flow is in the node's table with the SNAT reply tuple (reply dst = the VIP)."""
    kernel = kernel_entries(site.fw(node_id))
    for key in flow_keys(traffic):
        entry = kernel.get(key)
        assert entry is not None, f"{key} not in fw{node_id}'s table"
        assert entry.reply["src"] == SERVER_ADDR and entry.reply["dst"] == VIP_WAN, entry.raw
        if key[0] == "tcp":
            assert entry.state == "ESTABLISHED" and "ASSURED" in entry.flags, entry.raw


def test_failover_with_commit_keeps_nated_tcp_flows(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> None:
    """fw1 -> fw2 by hand with ``ctsync commit``; then fw1 comes back with an empty table
    (a rebooted node), learns fw2's state and takes the flows back the same way."""
    site = build_failover_site(netns_factory, tmp_path)
    cluster = site.cluster
    cluster.start()
    traffic = start_traffic(site)
    assert len(traffic.tcp_ports) == TCP_FLOWS and len(traffic.udp_ports) == UDP_FLOWS
    external = wait_synced(site, traffic)

    result = fail_over(site, 1, 2, commit=True)
    assert result is not None
    assert result["failed"] == 0 and result["errors"] == {}
    assert result["committed"] == result["attempted"] == len(external)
    took = wait_flows_carry_on(site, traffic, via=2)
    assert_flows_in_kernel(site, traffic, 2)
    assert site.invalid_drops(2) == 0, "fw2 dropped packets of the flows as invalid"

    # fw1 reboots: empty table, links up, agent started; it must get fw2's table back.
    site.fw(1).conntrack("-F")
    site.links(1, "up")
    cluster.start(1)
    wait_synced(site, traffic, viewer=1, owner=2)
    invalid_before = site.invalid_drops(1)
    result = fail_over(site, 2, 1, commit=True)
    assert result is not None and result["failed"] == 0
    assert result["committed"] == result["attempted"] >= len(flow_keys(traffic))
    took_back = wait_flows_carry_on(site, traffic, via=1)
    assert_flows_in_kernel(site, traffic, 1)
    assert site.invalid_drops(1) == invalid_before
    print(f"all flows moved on {took:.2f}s after the failover, {took_back:.2f}s after failback")

    traffic.client.send_line("done")
    traffic.client.wait_line("DONE", 15)
    assert traffic.client.finish(10) == 0, traffic.client.output()
    assert not any(line.startswith("ERROR") for line in traffic.client.lines)
    accepts = [line.split() for line in traffic.server.lines if line.startswith("ACCEPT")]
    assert len(accepts) == TCP_FLOWS
    assert {a[2] for a in accepts} == {VIP_WAN}, "the server must only ever see the VIP"


def test_failover_without_commit_breaks_tcp_flows(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> None:
    """Negative control: the same failover without ``ctsync commit`` on fw2 must stall the
    TCP flows (strict tracking drops their packets as invalid), or the test above is blind."""
    site = build_failover_site(netns_factory, tmp_path)
    site.cluster.start()
    traffic = start_traffic(site)
    wait_synced(site, traffic)

    assert fail_over(site, 1, 2, commit=False) is None
    at_failover = tcp_progress(site.client, SERVER_ADDR, TCP_PORT)
    # The client echoes on its flows in turn, so the first flow that stalls holds up the
    # others: wait until fw2 dropped several retransmissions (RTO 0.2, 0.4, 0.8, 1.6 s)...
    wait_until(
        lambda: site.invalid_drops(2) >= 4,
        15,
        "fw2 to drop the flows' retransmissions as invalid",
        describe=lambda: f"invalid drops {site.invalid_drops(2)}",
    )
    # ...and no flow moved on.
    now = tcp_progress(site.client, SERVER_ADDR, TCP_PORT)
    moved = [port for port in traffic.tcp_ports if now.get(port, 0) > at_failover[port]]
    assert moved == [], f"flows carried on without the synced state: {moved}"
    assert not flow_keys(traffic) & kernel_entries(site.fw(2)).keys()
    assert traffic.client.poll() is None, "the client neither finishes nor gets a reset"
    assert not any(line.startswith("ERROR") for line in traffic.client.lines)


# --------------------------------------------------------------------------- 5. auth


def test_node_with_wrong_key_injects_nothing(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = make_cluster(2)
    cluster.add_node(3, key_path=write_key(tmp_path / "other.key"))
    cluster.start(1, 2, 3, wait=False)
    cluster.wait_ready([1, 2])
    intruder_flows = make_flows(3, 1000)
    insert_flows(cluster[3].ns, intruder_flows, tmp_path)
    insert_flows(cluster[1].ns, make_flows(1, 1000), tmp_path)
    cluster.wait_converged([1, 2], timeout=20)
    intruder_data = wait_until(
        lambda: sync_counter(cluster, 3, "data_sent"), 10, "fw3 to send its entries"
    )

    def rejected_all(node_id: int) -> bool:
        return sync_counter(cluster, node_id, "auth_failed") >= intruder_data

    for node_id in (1, 2):
        wait_until(
            functools.partial(rejected_all, node_id), 10, f"fw{node_id} to reject fw3's DATA"
        )
    intruder_keys = {f.key for f in intruder_flows}
    for node_id in (1, 2):
        status = cluster.ctl(node_id, "show", "status")
        assert 3 not in {p["node"] for p in status["peers"]}
        entries = cluster.ctl(node_id, "show", "cache", "external")
        assert {e["peer"] for e in entries} <= {1, 2} - {node_id}
        assert not cache_view(entries).keys() & intruder_keys
        assert cluster.ctl(node_id, "show", "statistics")["sync"]["auth_failed"] > 0
        assert not kernel_entries(cluster[node_id].ns).keys() & intruder_keys
    # The intruder is deaf too: it authenticates nothing from the others.
    stats3 = cluster.ctl(3, "show", "statistics")
    assert stats3["peers"] == [] and stats3["external"]["active"] == 0
    assert stats3["sync"]["auth_failed"] > 0
    # A commit on fw2 writes fw1's entries only.
    commit = cluster.ctl(2, "commit")
    assert commit["failed"] == 0 and commit["committed"] == 1000
    assert not kernel_entries(cluster[2].ns).keys() & intruder_keys
    # Logged once per class with its count (and at most once a minute), never per packet;
    # peers coming up are logged too.
    log1 = cluster.output(1)
    drops = [line for line in log1.splitlines() if "failed authentication" in line]
    assert len(drops) == 1, drops
    assert "peer node 2 is up" in log1


def test_replayed_datagrams_are_rejected(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """A host on the sync segment records real, authentic datagrams and sends them again
    after the connections they created are gone: nothing may come back."""
    cluster = make_cluster(2)
    cluster.start()
    flows = make_flows(1, 500)
    with Eavesdropper(cluster) as eve:
        insert_flows(cluster[1].ns, flows, tmp_path)
        cluster.wait_converged(timeout=20)
        heard = eve.take()
        headers = [datagram_header(d) for d in heard]
        assert any(h[:2] == (DATA, 1) for h in headers), "no DATA of fw1 heard"
        delete_flows(cluster[1].ns, flows)
        cluster.wait_converged(timeout=20)
        before = {n: cluster.stats(n)["sync"] for n in (1, 2)}
        assert eve.send(heard) == len(heard)

        def counted() -> bool:
            # Each node counts the other's datagrams as replayed and its own as its own.
            after = {n: cluster.stats(n)["sync"] for n in (1, 2)}
            return all(
                after[n]["replayed"] - before[n]["replayed"]
                == sum(1 for h in headers if h[1] == 3 - n)
                and after[n]["own"] - before[n]["own"] >= sum(1 for h in headers if h[1] == n)
                for n in (1, 2)
            )

        wait_until(counted, 10, "every replayed datagram to be counted as a replay")
    assert cluster.external(2, 1) == {}
    assert cluster.divergence() == ""


# --------------------------------------------------------------------------- commands


def test_flush_resync_and_bulk_send(make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    # No anti-entropy during the test: only the commands may refill a cache.
    cluster = make_cluster(2, sync={**FAST_SYNC, "digest-interval": 3600.0})
    cluster.start()
    flows = make_flows(1, 2000)
    insert_flows(cluster[1].ns, flows, tmp_path)
    cluster.wait_converged(timeout=20)

    def cli_text(node_id: int, *args: str) -> str:
        proc = cluster.cli(node_id, *args)
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
        return proc.stdout.strip()

    def external_count(node_id: int) -> int:
        return int(cli_text(node_id, "show", "cache", "external", "--count"))

    assert cli_text(2, "flush", "external") == "2000 entries flushed"
    assert external_count(2) == 0
    assert cli_text(2, "resync") == "full transfer requested from 1 peer(s)"
    cluster.wait_converged(timeout=10)
    assert_external_is_kernel(cluster, 2, 1)

    assert cli_text(2, "flush", "external") == "2000 entries flushed"
    assert cli_text(1, "bulk-send") == "2000 entries queued for sending"
    cluster.wait_converged(timeout=10)
    assert_external_is_kernel(cluster, 2, 1)

    assert cli_text(1, "flush", "internal") == "2000 entries flushed"
    # The internal cache mirrors the kernel: a flush re-reads it at once (as VyOS's
    # reset internal-cache does: -f, -R, -B).
    assert cluster.stats(1)["internal"]["active"] == 2000
    assert cli_text(1, "resync", "--kernel") == "internal cache resynced: 2000 entries"
    cluster.wait_converged(timeout=10)
    assert_external_is_kernel(cluster, 2, 1)


def test_flushing_the_owners_internal_cache_keeps_the_peers_copy(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """With anti-entropy running, an emptied internal cache would tell the peers to drop
    their copy of our connections; the flush re-reads the kernel so that never happens."""
    cluster = make_cluster(2, sync={**FAST_SYNC, "digest-interval": 1.0})
    cluster.start()
    insert_flows(cluster[1].ns, make_flows(1, 2000), tmp_path)
    cluster.wait_converged(timeout=20)
    proc = cluster.cli(1, "flush")
    assert proc.returncode == 0, proc.stderr
    time.sleep(3.0)  # three digest rounds
    assert len(cluster.external(2, 1)) == 2000
    cluster.wait_converged(timeout=10)
    assert_external_is_kernel(cluster, 2, 1)


# --------------------------------------------------------------------------- inject mode


def test_inject_mode_restart_does_not_claim_peer_entries(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = make_cluster(2, sync={**FAST_SYNC, "disable-external-cache": True})
    cluster.start()
    own = {1: make_flows(1, 300), 2: make_flows(2, 50)}
    for node_id, node_flows in own.items():
        insert_flows(cluster[node_id].ns, node_flows, tmp_path)
    everything = {f.key for node_flows in own.values() for f in node_flows}
    for node_id in (1, 2):
        wait_until(
            functools.partial(lambda n: kernel_keys(cluster[n].ns) == everything, node_id),
            20,
            f"fw{node_id}'s kernel to hold both nodes' entries (injected)",
        )
    cluster.kill(1)
    cluster.start(1)
    # fw1's kernel holds fw2's 50 entries because fw1 injected them; they are not fw1's.
    # Reading its kernel back, fw1 claims them for a moment; fw2, which kept running, must
    # keep them, and fw1 must give them up (without the epoch rule both sides could give
    # up on each other's claim, and fw1 would end up owning fw2's connections).
    fw2_keys = {f.key for f in own[2]}
    wait_until(
        lambda: not cluster.count_divergence([1, 2]) and not set(cluster.internal(1)) & fw2_keys,
        20,
        "the restart to settle with fw1 claiming none of fw2's connections",
    )
    time.sleep(1.0)  # a few more sync rounds: the settled state holds
    claimed = set(cluster.internal(1)) & fw2_keys
    assert not claimed, f"fw1 announces {len(claimed)} of fw2's connections as its own"
    kept = set(cluster.internal(2)) & fw2_keys
    assert kept == fw2_keys, f"fw2 gave up {len(fw2_keys - kept)} of its own connections"
