"""The Prometheus endpoint of real agents in network namespaces.

Scrapes go to ``127.0.0.1`` inside the agent's namespace (urllib from a thread moved into
it): nothing listens outside the namespaces the test creates.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.linux.agents import Cluster, insert_flows, make_flows, wait_until
from tests.linux.failover_site import write_ctsync_config
from tests.linux.netns import Namespace, NamespaceFactory, in_netns

pytestmark = [pytest.mark.linux, pytest.mark.timeout(120)]

PORT = 9724
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def enable_metrics(cluster: Cluster, node_id: int, port: int = PORT) -> None:
    path = cluster[node_id].config_path
    path.write_text(path.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')


def scrape(ns: Namespace, port: int = PORT) -> Samples:
    url = f"http://127.0.0.1:{port}/metrics"
    with in_netns(ns.name), urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def get(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


def listeners(ns: Namespace) -> list[str]:
    """Local addresses of the namespace's listening TCP sockets (``ss -Hltn``)."""
    out = ns.run(["ss", "-Hltn"]).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def stop_gracefully(cluster: Cluster, node_id: int) -> int:
    node = cluster[node_id]
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGTERM)
    code = node.proc.wait(20)
    node.old_procs.append(node.proc)
    node.proc = None
    return code


def test_metrics_follow_the_sync_and_commits(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> None:
    cluster = Cluster(netns_factory, tmp_path, 2)
    enable_metrics(cluster, 1)  # fw2 keeps the default: metrics off
    cluster.start()
    fw1, fw2 = cluster[1].ns, cluster[2].ns
    assert listeners(fw1) == [f"127.0.0.1:{PORT}"]
    assert listeners(fw2) == [], "metrics.listen is empty on fw2: nothing may listen"
    log1, log2 = cluster.output(1), cluster.output(2)
    assert log1.count(f"serving Prometheus metrics on http://127.0.0.1:{PORT}/metrics") == 1
    assert "Prometheus" not in log2

    before = scrape(fw1)
    assert get(before, "ctsync_node_id") == 1
    assert get(before, "ctsync_peer_up", peer="2") == 1
    assert get(before, "ctsync_commit_duration_seconds_count") == 0
    assert not [k for k in before if k[0].startswith("ctsync_vrrp_")]  # no speaker here

    insert_flows(fw1, make_flows(1, 300), tmp_path)
    insert_flows(fw2, make_flows(2, 200), tmp_path)

    def synced() -> Samples | None:
        s = scrape(fw1)
        internal = get(s, "ctsync_cache_entries", cache="internal")
        external = get(s, "ctsync_cache_entries", cache="external")
        return s if internal >= 300 and external >= 200 else None

    after = wait_until(synced, 30, "fw1's metrics to show both bursts")
    ops = "ctsync_cache_operations_total"

    def grew(name: str, by: float, **labels: str) -> None:
        old, new = get(before, name, **labels), get(after, name, **labels)
        assert new - old >= by, f"{name}{labels}: {old} -> {new}, want +{by}"

    grew(ops, 300, cache="internal", operation="create", result="ok")
    grew(ops, 200, cache="external", operation="create", result="ok")
    grew("ctsync_netlink_events_total", 300)
    grew("ctsync_link_sent_bytes_total", 300 * 20, device="sync0")
    grew("ctsync_link_received_bytes_total", 200 * 20, device="sync0")
    grew("ctsync_link_sent_packets_total", 1, device="sync0")
    grew("ctsync_sync_messages_sent_total", 1, type="data")
    grew("ctsync_sync_data_messages_received_total", 1, result="applied")
    grew("ctsync_peer_data_messages_received_total", 1, peer="2")
    assert get(after, "ctsync_peer_external_entries", peer="2") == 200
    assert get(after, "ctsync_sync_lost_messages_total") == 0
    assert get(after, "ctsync_sync_auth_failures_total") == 0
    assert get(after, ops, cache="internal", operation="create", result="failed") == 0
    assert 0 <= get(after, "ctsync_peer_last_heard_seconds", peer="2") < 1.0
    # Process metrics come along (the agent's own, not the kernel table's).
    assert get(after, "process_resident_memory_bytes") > 0
    assert not [k for k in after if "nf_conntrack" in k[0]]

    # The same figures as `ctsync show statistics --json`. The internal cache also sees the
    # scrapes' own TCP connections on lo: its counter is bracketed by two readings.
    first = cluster.stats(1)
    now = scrape(fw1)
    second = cluster.stats(1)
    created = get(now, ops, cache="internal", operation="create", result="ok")
    assert first["internal"]["created"] <= created <= second["internal"]["created"]
    for field, operation in (("created", "create"), ("updated", "update")):
        value = get(now, ops, cache="external", operation=operation, result="ok")
        assert value == first["external"][field] == second["external"][field]
    assert get(now, "ctsync_cache_entries", cache="external") == first["external"]["active"]
    assert get(now, "ctsync_sync_lost_messages_total") == first["message_tracking"]["lost"]

    # A commit lands in the histogram, with its entries.
    result = cluster.query(1, "commit")
    assert result["committed"] >= 200 and result["failed"] == 0, result
    committed = scrape(fw1)
    assert get(committed, "ctsync_commit_duration_seconds_count") == 1
    assert get(committed, "ctsync_commit_duration_seconds_sum") == pytest.approx(result["seconds"])
    assert get(committed, "ctsync_commit_duration_seconds_bucket", le="+Inf") == 1
    assert get(committed, "ctsync_commit_entries_total", result="committed") == result["committed"]
    assert get(committed, "ctsync_last_commit_entries", result="committed") == result["committed"]

    # SIGTERM: the server stops with the agent, cleanly.
    assert stop_gracefully(cluster, 1) == 0
    log1 = cluster.output(1)
    assert "metrics server stopped" in log1 and "Traceback" not in log1, log1
    assert listeners(fw1) == []


VIP = "203.0.113.100/24"


def test_metrics_show_vrrp_states_and_the_failover_commit(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> None:
    cluster = Cluster(netns_factory, tmp_path, 2)
    for node_id, priority in ((1, 200), (2, 100)):
        write_ctsync_config(
            cluster,
            node_id,
            failover={"mechanism": "vrrp"},
            vrrp=[
                {
                    "name": "sync",
                    "interface": "sync0",
                    "virtual-router-id": 51,
                    "version": 3,
                    "priority": priority,
                    "advert-int": 0.1,
                    "virtual-address": [VIP],
                }
            ],
            vrrp_group="G1",
        )
        enable_metrics(cluster, node_id)
    cluster.start(1, wait=False)
    fw1, fw2 = cluster[1].ns, cluster[2].ns

    def state(ns: Namespace, want: str) -> Samples | None:
        s = scrape(ns)
        key = ("ctsync_vrrp_state", frozenset({("vrrp_instance", "sync"), ("state", want)}))
        return s if s.get(key) == 1 else None

    wait_until(lambda: state(fw1, "master"), 15, "fw1's speaker to be MASTER")
    cluster.start(2)

    def heard(ns: Namespace) -> Samples | None:
        s = state(ns, "backup")
        key = ("ctsync_vrrp_advertisements_received_total", frozenset({("vrrp_instance", "sync")}))
        return s if s is not None and s.get(key, 0) > 0 else None

    # BACKUP from the start (init), then the master's adverts arrive.
    s2 = wait_until(lambda: heard(fw2), 15, "fw2's speaker to be BACKUP and hear fw1")
    states = {
        dict(labels)["state"]: v for (name, labels), v in s2.items() if name == "ctsync_vrrp_state"
    }
    assert states == {"init": 0, "backup": 1, "master": 0, "fault": 0, "stop": 0}
    assert get(s2, "ctsync_vrrp_group_state", sync_group="G1", state="backup") == 1
    assert get(s2, "ctsync_failover_role", role="backup") == 1
    assert get(s2, "ctsync_vrrp_priority", vrrp_instance="sync") == 100
    assert get(s2, "ctsync_vrrp_advertisements_received_total", vrrp_instance="sync") > 0
    assert get(s2, "ctsync_vrrp_addresses_held", vrrp_instance="sync") == 0
    info = [k for k in s2 if k[0] == "ctsync_vrrp_instance_info"]
    assert len(info) == 1 and dict(info[0][1])["vrid"] == "51", info
    assert get(scrape(fw1), "ctsync_vrrp_addresses_held", vrrp_instance="sync") == 1

    insert_flows(fw1, make_flows(1, 150), tmp_path)
    wait_until(
        lambda: get(scrape(fw2), "ctsync_peer_external_entries", peer="1") >= 150,
        30,
        "fw2 to hold fw1's burst",
    )
    assert get(scrape(fw2), "ctsync_commit_duration_seconds_count") == 0
    masters_before = get(scrape(fw2), "ctsync_failover_transitions_total", to="master")

    killed = time.monotonic()
    cluster.kill(1)  # no priority-0 advert: fw2 takes over after Master_Down
    s2 = wait_until(lambda: state(fw2, "master"), 15, "fw2's speaker to be MASTER after fw1 died")
    took = time.monotonic() - killed

    def committed() -> Samples | None:
        s = scrape(fw2)
        return s if get(s, "ctsync_commit_duration_seconds_count") >= 1 else None

    s2 = wait_until(committed, 15, "fw2's failover commit in the histogram")
    assert get(s2, "ctsync_commit_duration_seconds_count") == 1
    assert get(s2, "ctsync_commit_entries_total", result="committed") >= 150
    assert get(s2, "ctsync_failover_transitions_total", to="master") == masters_before + 1
    assert get(s2, "ctsync_failover_role", role="master") == 1
    assert get(s2, "ctsync_peer_up", peer="1") in (0, 1)  # down once peer-dead-after passes
    wait_until(
        lambda: get(scrape(fw2), "ctsync_vrrp_addresses_held", vrrp_instance="sync") == 1,
        10,
        "fw2 to hold the VIP",
    )
    print(f"fw2 MASTER in the metrics {took:.2f}s after fw1 was killed")
