"""The Prometheus collector (ctsync.io.metrics) over fabricated snapshots, the metric
documentation and the Grafana dashboard's queries: no sockets, no agent."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ctsync.cli.render_sync import render_statistics
from ctsync.core.gateway import GatewaySnapshot
from ctsync.core.stats import (
    CacheStats,
    CommitStats,
    LinkStats,
    NetlinkStats,
    PeerStats,
    Snapshot,
)
from ctsync.core.sync.state import SyncStats
from ctsync.io.metrics import (
    CATALOG,
    COMMIT_BUCKETS,
    SYNC_COUNTERS,
    CommitHistogram,
    CommitTotals,
    CtsyncCollector,
    MetricsInput,
    build_families,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "ctsync-dashboard.json"
DOC = ROOT / "docs" / "metrics.md"


def _sync_counters() -> dict[str, int]:
    # Distinct values (1001, 1002, ...): a counter read from the wrong field shows.
    return {name: 1001 + i for i, name in enumerate(SyncStats().as_dict())}


def make_snapshot(*, inject: bool = False) -> Snapshot:
    return Snapshot(
        node_id=1,
        epoch=1_700_000_000_123,
        uptime_seconds=42.5,
        internal=CacheStats(11, 12, 13, 14, 15, 16, 17, 18),
        external=CacheStats(0 if inject else 21, 22, 23, 24, 25, 26, 27, 28),
        external_inject=inject,
        traffic_bytes=31,
        traffic_packets=32,
        links=(
            LinkStats("sync0", "multicast", "RUNNING", "ACTIVE", 41, 42, 43, 44, 45, 46),
            LinkStats("sync1", "UDP", "NO-CARRIER", "BACKUP", 51, 52, 53, 54, 55, 56),
        ),
        netlink=NetlinkStats(61, 62, 63, 64, 65, 66, 212992, 0.25),
        sync=_sync_counters(),
        queue_entries=71,
        queue_bytes=72,
        peers=(
            PeerStats(2, 1_700_000_000_456, True, True, 1.5, False, 81, 82, 83),
            PeerStats(3, 1_700_000_000_789, False, False, None, True, 91, 92, 93),
        ),
        last_commit=CommitStats(101, 99, 2, 0.75, 3.0, {"ENOENT": 2}),
    )


VRRP_STATUS: dict[str, Any] = {
    # The shape of VrrpSpeaker.status().
    "sync_group": "G1",
    "state": "MASTER",
    "transitions": [],
    "instances": [
        {
            "name": "lan",
            "interface": "eth1",
            "family": 4,
            "version": 3,
            "virtual_router_id": 51,
            "mode": "multicast",
            "source": "192.0.2.2",
            "virtual_addresses": ["192.0.2.1/24"],
            "state": "MASTER",
            "priority": 200,
            "adverts_sent": 111,
            "adverts_received": 112,
            "rejected": {"ttl": 113, "auth": 114},
            "transitions_total": {"BACKUP": 2, "MASTER": 1},
            "old_unicast_checksum": False,
            "holds_addresses": True,
            "transitions": [],
        },
        {
            "name": "wan",
            "interface": "eth2",
            "family": 6,
            "version": 3,
            "virtual_router_id": 52,
            "mode": "unicast",
            "source": "2001:db8::2",
            "virtual_addresses": ["2001:db8::1/64"],
            "state": "BACKUP",
            "priority": 100,
            "adverts_sent": 121,
            "adverts_received": 122,
            "rejected": {},
            "old_unicast_checksum": False,
            "holds_addresses": False,
            "transitions": [],
        },
    ],
    "unknown_vrid": 131,
    "channels": [
        {
            "channel": "eth1 IPv4 multicast",
            "source": "192.0.2.2",
            "sent": 1,
            "send_errors": 132,
            "received": 2,
            "receive_errors": 133,
            "malformed": {"checksum": 134},
        }
    ],
}


GATEWAY = GatewaySnapshot(
    name="isp-a",
    target="icmp 198.51.100.1",
    state="down",
    since=1_700_000_200.0,
    since_seconds=5.0,
    last_rtt=0.0015,
    probes={"ok": 141, "timeout": 142, "error": 143},
    transitions={"up": 144, "down": 145},
    flush_on=("down",),
    match={"mark": "0x1/0xff"},
    flushes=146,
    removed_total=147,
    failed_total=148,
)


def make_input(*, inject: bool = False, vrrp: bool = True) -> MetricsInput:
    return MetricsInput(
        make_snapshot(inject=inject),
        failover_role="MASTER",
        failover_transitions={"BACKUP": 2, "MASTER": 3},
        last_transition={"at": 1_700_000_100.0, "done": 1_700_000_100.5, "to": "MASTER"},
        vrrp=VRRP_STATUS if vrrp else None,
        gateways=(GATEWAY,),
    )


def make_commits() -> CommitTotals:
    hist = CommitHistogram()
    for seconds, committed, failed in ((0.004, 10, 0), (0.1, 500, 1), (120.0, 90_000, 3)):
        hist.observe(CommitStats(committed + failed, committed, failed, seconds, None, {}))
    hist.observe(CommitStats(5, 3, 2, 0.0, None, {"ENOENT": 1, "EINVAL": 1}))
    return hist.totals()


def exposition(data: MetricsInput, commits: CommitTotals) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CtsyncCollector(lambda: (data, commits)))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, parsed back with prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = sample.value
    return out


def value(
    parsed: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return parsed[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def parsed() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return samples(exposition(make_input(), make_commits()))


# --------------------------------------------------------------------------- names and types


def test_every_catalog_family_is_exposed_with_its_type_and_labels() -> None:
    text = exposition(make_input(), make_commits())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    want = {n.removesuffix("_total") if s.kind == "counter" else n for n, s in CATALOG.items()}
    assert set(families) == want
    for name, spec in CATALOG.items():
        family = families[name.removesuffix("_total") if spec.kind == "counter" else name]
        assert family.type == spec.kind, name
        assert family.samples, f"{name}: no sample from a full snapshot"
        for sample in family.samples:
            labels = set(sample.labels) - ({"le"} if spec.kind == "histogram" else set())
            assert labels == set(spec.labels), (name, sample)


def test_names_follow_prometheus_conventions() -> None:
    snake = re.compile(r"[a-z][a-z0-9_]*\Z")
    for name, spec in CATALOG.items():
        assert name.startswith("ctsync_") and snake.match(name), name
        assert all(snake.match(label) and label != "le" for label in spec.labels), name
        if spec.kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        base = name.removesuffix("_total")
        for unit in ("seconds", "bytes"):
            if unit in base.split("_"):
                assert base.endswith(f"_{unit}"), f"{name}: the unit goes last"
        assert "milli" not in name and "ms" not in base.split("_"), name
        # node_exporter exports the kernel table totals (nf_conntrack_count / max).
        assert "nf_conntrack" not in name and "kernel" not in name, name


def test_every_sync_counter_is_exported_under_a_catalogued_name() -> None:
    fields = set(SyncStats().as_dict())
    assert set(SYNC_COUNTERS) == fields, (
        f"SyncStats counters without a metric: {sorted(fields - set(SYNC_COUNTERS))}; "
        f"mapped but gone: {sorted(set(SYNC_COUNTERS) - fields)}"
    )
    seen = set()
    for family, labels in SYNC_COUNTERS.values():
        assert family in CATALOG and set(labels) == set(CATALOG[family].labels), family
        key = (family, tuple(sorted(labels.items())))
        assert key not in seen, f"two counters on one series: {key}"
        seen.add(key)


# --------------------------------------------------------------------------- values


def test_cache_and_traffic_values(parsed: dict[Any, float]) -> None:
    assert value(parsed, "ctsync_cache_entries", cache="internal") == 11
    assert value(parsed, "ctsync_cache_entries", cache="external") == 21
    ops = "ctsync_cache_operations_total"
    assert value(parsed, ops, cache="internal", operation="create", result="ok") == 12
    assert value(parsed, ops, cache="internal", operation="create", result="failed") == 13
    assert value(parsed, ops, cache="internal", operation="update", result="ok") == 14
    assert value(parsed, ops, cache="internal", operation="update", result="failed") == 15
    assert value(parsed, ops, cache="internal", operation="destroy", result="ok") == 16
    assert value(parsed, ops, cache="internal", operation="destroy", result="failed") == 17
    assert value(parsed, ops, cache="external", operation="destroy", result="failed") == 27
    assert value(parsed, "ctsync_cache_filtered_entries_total", cache="internal") == 18
    assert value(parsed, "ctsync_traffic_processed_bytes_total") == 31
    assert value(parsed, "ctsync_traffic_processed_packets_total") == 32


def test_inject_mode_reports_the_injections_not_an_external_cache() -> None:
    got = samples(exposition(make_input(inject=True), CommitTotals()))
    ops = "ctsync_cache_operations_total"
    assert value(got, ops, cache="inject", operation="create", result="ok") == 22
    assert ("ctsync_cache_entries", frozenset({("cache", "external")})) not in got
    assert ("ctsync_cache_entries", frozenset({("cache", "inject")})) not in got
    assert not [k for k in got if dict(k[1]).get("cache") == "external"]


def test_link_values_carry_the_device(parsed: dict[Any, float]) -> None:
    for device, base in (("sync0", 41), ("sync1", 51)):
        names = (
            "ctsync_link_sent_bytes_total",
            "ctsync_link_received_bytes_total",
            "ctsync_link_sent_packets_total",
            "ctsync_link_received_packets_total",
            "ctsync_link_send_errors_total",
            "ctsync_link_receive_errors_total",
        )
        for offset, name in enumerate(names):
            assert value(parsed, name, device=device) == base + offset, (name, device)
    assert value(parsed, "ctsync_link_up", device="sync0") == 1
    assert value(parsed, "ctsync_link_up", device="sync1") == 0
    assert value(parsed, "ctsync_link_active", device="sync0") == 1
    assert value(parsed, "ctsync_link_active", device="sync1") == 0


def test_netlink_sync_and_queue_values(parsed: dict[Any, float]) -> None:
    assert value(parsed, "ctsync_netlink_events_total") == 61
    assert value(parsed, "ctsync_netlink_overruns_total") == 65
    assert value(parsed, "ctsync_netlink_resyncs_total") == 66
    assert value(parsed, "ctsync_netlink_receive_buffer_bytes") == 212992
    assert value(parsed, "ctsync_netlink_last_resync_duration_seconds") == 0.25
    sync = _sync_counters()
    for field, (family, labels) in SYNC_COUNTERS.items():
        assert value(parsed, family, **labels) == sync[field], field
    snap = make_snapshot()
    malformed = sum(
        v for (name, _), v in parsed.items() if name == "ctsync_sync_malformed_messages_total"
    )
    assert malformed == snap.malformed  # conntrackd's "Malformed msgs"
    assert value(parsed, "ctsync_sync_lost_messages_total") == snap.lost
    assert value(parsed, "ctsync_sync_auth_failures_total") == sync["auth_failed"]
    assert value(parsed, "ctsync_sync_replayed_messages_total") == sync["replayed"]
    assert value(parsed, "ctsync_sync_resent_messages_total") == sync["resent"]
    assert value(parsed, "ctsync_sync_queue_messages") == 71
    assert value(parsed, "ctsync_sync_queue_bytes") == 72


def test_peer_values(parsed: dict[Any, float]) -> None:
    assert value(parsed, "ctsync_peer_up", peer="2") == 1
    assert value(parsed, "ctsync_peer_up", peer="3") == 0
    assert value(parsed, "ctsync_peer_verified", peer="3") == 0
    assert value(parsed, "ctsync_peer_last_heard_seconds", peer="2") == 1.5
    # Never heard: no sample rather than a made-up age.
    assert ("ctsync_peer_last_heard_seconds", frozenset({("peer", "3")})) not in parsed
    assert value(parsed, "ctsync_peer_resync_in_progress", peer="3") == 1
    assert value(parsed, "ctsync_peer_external_entries", peer="2") == 81
    assert value(parsed, "ctsync_peer_data_messages_received_total", peer="2") == 82
    assert value(parsed, "ctsync_peer_lost_messages_total", peer="3") == 93
    assert value(parsed, "ctsync_peer_start_time_seconds", peer="2") == pytest.approx(
        1_700_000_000.456
    )
    assert value(parsed, "ctsync_start_time_seconds") == pytest.approx(1_700_000_000.123)
    assert value(parsed, "ctsync_node_id") == 1


def test_failover_and_vrrp_values(parsed: dict[Any, float]) -> None:
    roles = {r: value(parsed, "ctsync_failover_role", role=r) for r in ("master", "backup")}
    assert roles == {"master": 1, "backup": 0}
    assert value(parsed, "ctsync_failover_transitions_total", to="master") == 3
    assert value(parsed, "ctsync_failover_transitions_total", to="backup") == 2
    assert value(parsed, "ctsync_failover_transitions_total", to="fault") == 0
    assert value(parsed, "ctsync_failover_last_transition_duration_seconds") == 0.5
    for instance, current in (("lan", "master"), ("wan", "backup")):
        states = {
            dict(labels)["state"]: v
            for (name, labels), v in parsed.items()
            if name == "ctsync_vrrp_state" and dict(labels)["vrrp_instance"] == instance
        }
        assert states == {
            s: float(s == current) for s in ("init", "backup", "master", "fault", "stop")
        }
    assert value(parsed, "ctsync_vrrp_group_state", sync_group="G1", state="master") == 1
    assert value(parsed, "ctsync_vrrp_priority", vrrp_instance="wan") == 100
    assert value(parsed, "ctsync_vrrp_addresses_held", vrrp_instance="lan") == 1
    assert value(parsed, "ctsync_vrrp_advertisements_sent_total", vrrp_instance="lan") == 111
    assert value(parsed, "ctsync_vrrp_advertisements_received_total", vrrp_instance="wan") == 122
    assert (
        value(
            parsed, "ctsync_vrrp_advertisements_rejected_total", vrrp_instance="lan", reason="auth"
        )
        == 114
    )
    assert value(parsed, "ctsync_vrrp_transitions_total", vrrp_instance="lan", to="master") == 1
    assert value(parsed, "ctsync_vrrp_transitions_total", vrrp_instance="lan", to="backup") == 2
    assert value(parsed, "ctsync_vrrp_unknown_vrid_total") == 131
    channel = "eth1 IPv4 multicast"
    assert value(parsed, "ctsync_vrrp_receive_errors_total", channel=channel) == 133
    assert (
        value(parsed, "ctsync_vrrp_malformed_packets_total", channel=channel, reason="checksum")
        == 134
    )
    info = [k for k in parsed if k[0] == "ctsync_vrrp_instance_info"]
    assert dict(info[0][1])["vrid"] in {"51", "52"} and len(info) == 2


def test_without_the_speaker_there_is_no_vrrp_series() -> None:
    got = samples(exposition(make_input(vrrp=False), CommitTotals()))
    assert not [k for k in got if k[0].startswith("ctsync_vrrp_")]
    assert value(got, "ctsync_failover_role", role="master") == 1


def test_commit_histogram(parsed: dict[Any, float]) -> None:
    bucket = "ctsync_commit_duration_seconds_bucket"
    assert value(parsed, bucket, le="0.001") == 1  # the 0 s commit
    assert value(parsed, bucket, le="0.005") == 2
    assert value(parsed, bucket, le="0.1") == 3  # le is inclusive
    assert value(parsed, bucket, le="60.0") == 3
    assert value(parsed, bucket, le="+Inf") == 4
    assert value(parsed, "ctsync_commit_duration_seconds_count") == 4
    assert value(parsed, "ctsync_commit_duration_seconds_sum") == pytest.approx(120.104)
    les = [float(dict(k[1])["le"]) for k in parsed if k[0] == bucket]
    assert sorted(les) == [*COMMIT_BUCKETS, float("inf")]
    assert value(parsed, "ctsync_commit_entries_total", result="committed") == 90_513
    assert value(parsed, "ctsync_commit_entries_total", result="failed") == 6
    assert value(parsed, "ctsync_commit_errors_total", error="EINVAL") == 1
    assert value(parsed, "ctsync_last_commit_entries", result="attempted") == 101
    assert value(parsed, "ctsync_last_commit_duration_seconds") == 0.75


def test_no_commit_yet_gives_an_empty_histogram() -> None:
    got = samples(exposition(make_input(), CommitTotals()))
    assert value(got, "ctsync_commit_duration_seconds_count") == 0
    assert value(got, "ctsync_commit_duration_seconds_bucket", le="+Inf") == 0
    assert value(got, "ctsync_commit_entries_total", result="committed") == 0


def test_every_number_of_show_statistics_is_a_metric() -> None:
    """Each figure ``ctsync show statistics`` prints can be read from the metrics."""
    snap = make_snapshot()
    data = dataclasses.replace(make_input(), snapshot=snap)
    got = samples(exposition(data, CommitTotals()))
    exported = set(got.values())
    exported |= {float(v) for _, labels in got for k, v in labels if k == "peer"}  # "node 2"
    # conntrackd's "Malformed msgs" is the sum of the reasons.
    exported.add(sum(v for (n, _), v in got.items() if n == "ctsync_sync_malformed_messages_total"))
    text = render_statistics(snap)
    printed = [float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", text)]
    assert len(printed) > 30
    missing = [n for n in printed if n not in exported]
    assert not missing, f"printed by show statistics, not exported: {missing}\n{text}"


def test_families_are_rebuilt_from_each_scrape() -> None:
    """No state in the collector: a new snapshot is what the next scrape shows."""
    data = make_input()
    snap = dataclasses.replace(data.snapshot, queue_entries=5)
    first = {m.name: m for m in build_families(data, CommitTotals())}
    second = {
        m.name: m for m in build_families(dataclasses.replace(data, snapshot=snap), CommitTotals())
    }
    assert first["ctsync_sync_queue_messages"].samples[0].value == 71
    assert second["ctsync_sync_queue_messages"].samples[0].value == 5


# --------------------------------------------------------------------------- docs


def test_docs_describe_every_metric() -> None:
    text = DOC.read_text()
    missing = [name for name in CATALOG if f"`{name}`" not in text]
    assert not missing, f"docs/metrics.md does not describe {missing}"
    documented = set(re.findall(r"^\| `(ctsync_[a-z0-9_]+)`", text, re.M))
    assert documented == set(CATALOG), sorted(documented ^ set(CATALOG))


# --------------------------------------------------------------------------- dashboard

PANEL_TYPES = {
    "timeseries",
    "stat",
    "state-timeline",
    "heatmap",
    "row",
    "gauge",
    "table",
    "bargauge",
    "text",
}

PROMQL_WORDS = {
    # functions and aggregation operators and keywords that can precede "(" or stand alone
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "topk",
    "bottomk",
    "histogram_quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "time",
    "vector",
    "scalar",
    "changes",
    "resets",
    "abs",
    "clamp_min",
    "clamp_max",
    "label_replace",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "last_over_time",
    "absent",
    "bool",
    "offset",
    "le",
    "sort",
    "sort_desc",
    "count_over_time",
    "deriv",
    "timestamp",
}


def _dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def _panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or values)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # dashboard variables ($__rate_interval, ...)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"\d.*|e\d*", n)}


def test_metric_name_parser() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le) (rate(ctsync_commit_duration_seconds_bucket"
        '{instance=~"$instance"}[$__rate_interval])))'
        " / on (instance) group_left max(ctsync_node_id) > bool 0"
    )
    assert metric_names(expr) == {"ctsync_commit_duration_seconds_bucket", "ctsync_node_id"}


def test_dashboard_has_grafana_essentials() -> None:
    d = _dashboard()
    for key in ("title", "uid", "panels", "schemaVersion", "templating", "time", "version"):
        assert key in d, key
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", d["uid"])
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert "__inputs" not in d or all(i["type"] == "datasource" for i in d["__inputs"])
    ids: list[int] = []
    for panel in _panels(d):
        assert panel["type"] in PANEL_TYPES, panel["type"]
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}, panel["title"]
        assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] >= 0 and grid["y"] >= 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]  # Grafana's grid is 24 wide
        assert panel.get("title"), panel["id"]
        if panel["type"] in ("row", "text"):
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert target["expr"].strip()
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # Panels must not overlap on the grid.
    cells: set[tuple[int, int]] = set()
    for panel in d["panels"]:
        g = panel["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_dashboard_covers_the_asked_for_views() -> None:
    d = _dashboard()
    exprs = " ".join(t["expr"] for p in _panels(d) for t in p.get("targets", []))
    types = {p["type"] for p in _panels(d)}
    assert {"state-timeline", "heatmap", "timeseries", "stat"} <= types
    for needed in (
        "ctsync_link_sent_bytes_total",
        "ctsync_sync_lost_messages_total",
        "ctsync_sync_malformed_messages_total",
        "ctsync_sync_auth_failures_total",
        "ctsync_cache_entries",
        "ctsync_peer_up",
        "ctsync_vrrp_state",
        "ctsync_commit_duration_seconds_bucket",
        "ctsync_sync_digest_mismatches_total",
        "ctsync_netlink_resyncs_total",
        "node_nf_conntrack_entries",
    ):
        assert needed in exprs, needed


def test_every_dashboard_query_names_an_exported_metric() -> None:
    text = exposition(make_input(), make_commits())
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    # The dashboard joins ctsync's figures with node_exporter's conntrack table size (which
    # ctsync deliberately does not export).
    exported |= {"node_nf_conntrack_entries", "node_nf_conntrack_entries_limit"}
    d = _dashboard()
    queries = [t["expr"] for p in _panels(d) for t in p.get("targets", [])]
    queries += [
        v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        for v in d["templating"]["list"]
        if v["type"] == "query"
    ]
    assert len(queries) > 15
    for expr in queries:
        names = metric_names(re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", expr))
        assert names, expr
        unknown = names - exported
        assert not unknown, f"{expr!r} names metrics the collector does not export: {unknown}"


def test_collector_output_is_a_list_of_metrics() -> None:
    families = build_families(make_input(), make_commits())
    assert all(isinstance(f, Metric) for f in families)
    assert len({f.name for f in families}) == len(families)
