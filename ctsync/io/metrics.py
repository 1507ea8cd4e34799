"""Prometheus metrics: one collector over the agent's statistics, read at scrape time.

The collector keeps no counters of its own: every scrape asks the agent's loop for one
:class:`MetricsInput` (the same :class:`~ctsync.core.stats.Snapshot` that ``ctsync show
statistics`` prints, plus the failover controller's and the VRRP speaker's status) and
turns it into metric families, as node_exporter does with ``MustNewConstMetric``. The one
thing a snapshot cannot give is a distribution, so commit durations are observed as each
commit ends (:meth:`MetricsServer.observe_commit`) into :class:`CommitHistogram`.

:data:`CATALOG` names every family, its type, labels, meaning and the ``show statistics``
line it comes from; ``docs/metrics.md`` documents the same list and a test keeps the two,
and the Grafana dashboard's queries, in step with what :func:`build_families` yields.

Kernel table totals (``nf_conntrack_count``/``max``) are not exported: node_exporter's
conntrack collector already does (``node_nf_conntrack_entries``).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ctsync import __version__
from ctsync.core.gateway import FLUSH_EVENTS, PROBE_RESULTS, GatewaySnapshot, GatewayState
from ctsync.core.stats import CacheStats, CommitStats, Snapshot
from ctsync.core.wire import VERSION as WIRE_VERSION

log = logging.getLogger("ctsync.metrics")

#: Commit durations (seconds): a few hundred entries take milliseconds, 100k about a second,
#: and ``failover.commit-wait`` lets a huge table go on for tens of seconds.
COMMIT_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

#: How long a scrape waits for the agent's loop before it fails (HTTP 500).
SCRAPE_TIMEOUT: Final = 5.0

# VRRP labels say ``vrrp_instance``, not ``instance``: Prometheus sets ``instance`` to the
# scraped target, and a clash would rename ours to ``exported_instance``.
# VRRP / failover states as label values: lower case, every state present (0 or 1), so a
# state that is never entered still has a series and the timeline has no gaps.
VRRP_STATES: Final = ("init", "backup", "master", "fault", "stop")
ROLES: Final = ("master", "backup", "fault", "stop")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class MetricsInput:
    """What one scrape reads, taken on the agent's loop in one go (a consistent view)."""

    snapshot: Snapshot
    failover_role: str | None = None  # FailoverController.status()["state"]
    failover_transitions: Mapping[str, int] = field(default_factory=dict)  # role -> count
    last_transition: Mapping[str, Any] | None = None  # Transition.to_dict() of the newest
    vrrp: Mapping[str, Any] | None = None  # VrrpSpeaker.status(); None without the speaker
    gateways: tuple[GatewaySnapshot, ...] = ()  # one per [[gateway-watch]]


@dataclass(frozen=True)
class CommitTotals:
    """A frozen copy of :class:`CommitHistogram` (taken on the agent's loop)."""

    buckets: tuple[float, ...] = COMMIT_BUCKETS
    counts: tuple[int, ...] = (0,) * (len(COMMIT_BUCKETS) + 1)  # per bucket, +Inf last
    seconds: float = 0.0
    commits: int = 0
    committed: int = 0
    failed: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)


class CommitHistogram:
    """Every commit of the external caches into the kernel, as it ends (``Agent.commit``)."""

    def __init__(self, buckets: Iterable[float] = COMMIT_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)
        self._seconds = 0.0
        self._committed = 0
        self._failed = 0
        self._errors: dict[str, int] = {}

    def observe(self, commit: CommitStats) -> None:
        # ``le`` is inclusive: a value equal to a bound falls in that bucket.
        self._counts[bisect.bisect_left(self.buckets, commit.seconds)] += 1
        self._seconds += commit.seconds
        self._committed += commit.committed
        self._failed += commit.failed
        for error, count in commit.errors.items():
            self._errors[error] = self._errors.get(error, 0) + count

    def totals(self) -> CommitTotals:
        return CommitTotals(
            self.buckets,
            tuple(self._counts),
            self._seconds,
            sum(self._counts),
            self._committed,
            self._failed,
            dict(self._errors),
        )


# --------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Spec:
    kind: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    help: str
    source: str  # the ``show statistics`` line / status field it comes from


def _c(labels: tuple[str, ...], help_: str, source: str) -> Spec:
    return Spec("counter", labels, help_, source)


def _g(labels: tuple[str, ...], help_: str, source: str) -> Spec:
    return Spec("gauge", labels, help_, source)


_CACHE = "cache internal / cache external / external inject"

#: Every family, by the name it is exposed under (counters with their ``_total``).
CATALOG: Final[dict[str, Spec]] = {
    # --- the node
    "ctsync_build_info": _g(
        ("version", "wire_version"), "ctsync's version and sync wire protocol version", "-"
    ),
    "ctsync_node_id": _g((), "This node's node-id", "show status: node-id"),
    "ctsync_start_time_seconds": _g(
        (), "When the agent started (its epoch), unix time", "show status: epoch"
    ),
    # --- caches
    "ctsync_cache_entries": _g(
        ("cache",),
        "Entries in the cache now (cache: internal or external, all peers summed)",
        f"{_CACHE}: current active connections",
    ),
    "ctsync_cache_operations_total": _c(
        ("cache", "operation", "result"),
        "Cache changes (cache: internal, external or inject; operation: create, update, "
        "destroy; result: ok or failed)",
        f"{_CACHE}: connections created/updated/destroyed ... failed",
    ),
    "ctsync_cache_filtered_entries_total": _c(
        ("cache",),
        "Entries the filters kept out of the cache",
        "--json: internal.filtered, external.filtered",
    ),
    # --- traffic
    "ctsync_traffic_processed_bytes_total": _c(
        (), "Bytes of the connections processed", "traffic processed: Bytes"
    ),
    "ctsync_traffic_processed_packets_total": _c(
        (), "Packets of the connections processed", "traffic processed: Pckts"
    ),
    # --- sync links
    "ctsync_link_sent_bytes_total": _c(
        ("device",), "Bytes sent on the sync link", "... traffic (active device=D): Bytes sent"
    ),
    "ctsync_link_received_bytes_total": _c(
        ("device",),
        "Bytes received on the sync link",
        "... traffic (active device=D): Bytes recv",
    ),
    "ctsync_link_sent_packets_total": _c(
        ("device",),
        "Datagrams sent on the sync link",
        "... traffic (active device=D): Pckts sent",
    ),
    "ctsync_link_received_packets_total": _c(
        ("device",),
        "Datagrams received on the sync link",
        "... traffic (active device=D): Pckts recv",
    ),
    "ctsync_link_send_errors_total": _c(
        ("device",), "Send errors on the sync link", "... traffic (active device=D): Error send"
    ),
    "ctsync_link_receive_errors_total": _c(
        ("device",),
        "Receive errors on the sync link",
        "... traffic (active device=D): Error recv",
    ),
    "ctsync_link_up": _g(
        ("device",), "1 if the sync link is RUNNING", "--json: links[].status (RUNNING)"
    ),
    "ctsync_link_active": _g(
        ("device",),
        "1 for the active sync link (the one show statistics prints)",
        "--json: links[].role (ACTIVE)",
    ),
    # --- kernel events (netlink)
    "ctsync_netlink_events_total": _c(
        (), "Conntrack events read from the kernel", "--json: netlink.events_received"
    ),
    "ctsync_netlink_own_events_total": _c(
        (),
        "Events caused by ctsync's own writes (not sent to the peers)",
        "--json: netlink.events_own",
    ),
    "ctsync_netlink_unknown_events_total": _c(
        (), "Events of an unknown type", "--json: netlink.events_unknown_type"
    ),
    "ctsync_netlink_event_errors_total": _c(
        (), "Events that could not be handled", "--json: netlink.catch_event_failed"
    ),
    "ctsync_netlink_overruns_total": _c(
        (),
        "Event socket overruns (ENOBUFS): events lost, a resync follows",
        "--json: netlink.netlink_overrun",
    ),
    "ctsync_netlink_resyncs_total": _c(
        (),
        "Dumps of the kernel table that reconciled the internal cache",
        "--json: netlink.resync_with_kernel_table",
    ),
    "ctsync_netlink_receive_buffer_bytes": _g(
        (), "Size of the event socket's receive buffer", "--json: netlink.buffer_size"
    ),
    "ctsync_netlink_last_resync_duration_seconds": _g(
        (), "How long the last kernel table dump took", "--json: netlink.last_reconcile_seconds"
    ),
    # --- the sync protocol
    "ctsync_sync_datagrams_sent_total": _c(
        (), "Sync datagrams sent", "--json: sync.datagrams_sent"
    ),
    "ctsync_sync_datagrams_received_total": _c(
        (), "Sync datagrams received (before any check)", "--json: sync.datagrams_received"
    ),
    "ctsync_sync_sent_bytes_total": _c(
        (), "Bytes of the sync datagrams sent", "--json: sync.bytes_sent"
    ),
    "ctsync_sync_received_bytes_total": _c(
        (), "Bytes of the sync datagrams received", "--json: sync.bytes_received"
    ),
    "ctsync_sync_malformed_messages_total": _c(
        ("reason",),
        "Datagrams that failed to parse (reason: decode, version, unknown_type); the sum is "
        "conntrackd's Malformed msgs",
        "message tracking: Malformed msgs",
    ),
    "ctsync_sync_lost_messages_total": _c(
        (),
        "DATA messages never applied (given up or lost to a peer restart)",
        "message tracking: Lost msgs",
    ),
    "ctsync_sync_auth_failures_total": _c(
        (),
        "Datagrams whose MAC did not verify (wrong key or forged)",
        "sync protocol: Auth failures",
    ),
    "ctsync_sync_replayed_messages_total": _c(
        (), "Datagrams refused by the replay window", "sync protocol: Replayed"
    ),
    "ctsync_sync_ignored_messages_total": _c(
        ("reason",),
        "Valid datagrams ignored (reason: unverified peer, own looped-back multicast, "
        "duplicate_node_id, stale epoch)",
        "--json: sync.unverified, own, duplicate_node_id, stale",
    ),
    "ctsync_sync_messages_sent_total": _c(
        ("type",),
        "Protocol messages sent, by type (data, hello, alive, ack, nack, gone, digest, "
        "resync, repair)",
        "sync protocol: NACKs sent, Repairs asked; --json: sync.*_sent",
    ),
    "ctsync_sync_messages_received_total": _c(
        ("type",),
        "Protocol messages received and accepted, by type (hello, ack, nack, gone, digest, "
        "resync, repair)",
        "--json: sync.*_received, resync_requests",
    ),
    "ctsync_sync_data_messages_received_total": _c(
        ("result",),
        "DATA messages received (result: applied, duplicate, reorder_dropped)",
        "--json: sync.data_received, data_duplicate, reorder_dropped",
    ),
    "ctsync_sync_resent_messages_total": _c(
        (), "DATA messages sent again (NACK or timeout)", "sync protocol: Resent msgs"
    ),
    "ctsync_sync_transfers_sent_total": _c(
        ("kind",),
        "Transfers of the internal cache sent (kind: bulk = full resync, repair = "
        "anti-entropy buckets)",
        "sync protocol: Repairs sent; --json: sync.bulk_sent",
    ),
    "ctsync_sync_transfers_received_total": _c(
        ("kind",),
        "Transfers received into an external cache (kind: bulk, repair)",
        "--json: sync.bulk_received, repair_data_received",
    ),
    "ctsync_sync_digest_comparisons_total": _c(
        (), "Anti-entropy digests compared with an external cache", "--json: sync.digests_compared"
    ),
    "ctsync_sync_digest_mismatches_total": _c(
        (),
        "Digests that differed: a reconciliation (repair) was requested",
        "--json: sync.digest_mismatches",
    ),
    "ctsync_sync_peer_verifications_total": _c(
        (), "Peer epochs verified by HELLO", "--json: sync.peers_verified"
    ),
    "ctsync_sync_peer_transitions_total": _c(
        ("to",),
        "Peers seen coming up or going down (to: up, down)",
        "--json: sync.peer_up, peer_down",
    ),
    "ctsync_sync_queue_overflows_total": _c(
        (),
        "DATA dropped from the resend queue because it was full",
        "sync protocol: Queue overflow",
    ),
    "ctsync_sync_external_refused_entries_total": _c(
        (), "Entries an external cache refused (its size limit)", "--json: sync.external_failed"
    ),
    "ctsync_sync_queue_messages": _g(
        (), "DATA messages in the resend queue", "sync protocol: Queued msgs"
    ),
    "ctsync_sync_queue_bytes": _g((), "Bytes held by the resend queue", "--json: queue_bytes"),
    # --- peers
    "ctsync_peer_up": _g(
        ("peer",), "1 if the peer is up (heard within peer-dead-after)", "peers: node N: up / down"
    ),
    "ctsync_peer_verified": _g(
        ("peer",), "1 if the peer's epoch is verified", "--json: peers[].verified"
    ),
    "ctsync_peer_last_heard_seconds": _g(
        ("peer",),
        "Seconds since the last datagram from the peer (absent: never)",
        "peers: last heard Ns ago",
    ),
    "ctsync_peer_resync_in_progress": _g(
        ("peer",), "1 while a full resync from the peer is under way", "peers: resync-in-progress"
    ),
    "ctsync_peer_external_entries": _g(
        ("peer",), "Entries in the peer's external cache", "peers: N entries"
    ),
    "ctsync_peer_data_messages_received_total": _c(
        ("peer",), "DATA messages applied from the peer", "--json: peers[].data_received"
    ),
    "ctsync_peer_lost_messages_total": _c(
        ("peer",), "DATA messages of the peer never applied", "peers: N lost msgs"
    ),
    "ctsync_peer_start_time_seconds": _g(
        ("peer",), "When the peer's agent started (its epoch), unix time", "--json: peers[].epoch"
    ),
    # --- commits and failover
    "ctsync_commit_duration_seconds": Spec(
        "histogram",
        (),
        "Duration of each commit of the external caches into the kernel",
        "show status: last commit ... in Ns (each commit)",
    ),
    "ctsync_commit_entries_total": _c(
        ("result",),
        "Entries written by commits (result: committed, failed)",
        "show status: last commit (summed over commits)",
    ),
    "ctsync_commit_errors_total": _c(
        ("error",),
        "Commit failures by kernel error (errno name)",
        "ctsync commit --json: errors (summed over commits)",
    ),
    "ctsync_last_commit_entries": _g(
        ("result",),
        "Entries of the last commit (result: attempted, committed, failed)",
        "show status: last commit",
    ),
    "ctsync_last_commit_duration_seconds": _g(
        (), "Duration of the last commit", "show status: last commit"
    ),
    "ctsync_failover_role": _g(
        ("role",),
        "1 for the node's current role (master, backup, fault, stop)",
        "show status: state",
    ),
    "ctsync_failover_transitions_total": _c(
        ("to",),
        "Role transitions run by the failover controller, by new role",
        "show status: Failover transitions (counted)",
    ),
    "ctsync_failover_last_transition_timestamp_seconds": _g(
        (),
        "When the last role transition was requested, unix time",
        "show status: last state transition",
    ),
    "ctsync_failover_last_transition_duration_seconds": _g(
        (),
        "How long the last role transition's steps took (absent while running)",
        "show status: last state transition ... done in Ns",
    ),
    # --- ctsync's VRRP speaker
    "ctsync_vrrp_state": _g(
        ("vrrp_instance", "state"),
        "1 for the VRRP instance's current state, 0 for the others",
        "show status: vrrp NAME : STATE",
    ),
    "ctsync_vrrp_group_state": _g(
        ("sync_group", "state"),
        "1 for the sync group's current state, 0 for the others",
        "show status: vrrp sync-group",
    ),
    "ctsync_vrrp_instance_info": _g(
        ("vrrp_instance", "interface", "vrid", "version", "mode"),
        "Static facts of a VRRP instance (value 1)",
        "show status --json: vrrp.instances[]",
    ),
    "ctsync_vrrp_priority": _g(
        ("vrrp_instance",),
        "Current VRRP priority of the instance",
        "show status: vrrp NAME : ..., priority N",
    ),
    "ctsync_vrrp_addresses_held": _g(
        ("vrrp_instance",),
        "1 while this node holds the instance's virtual addresses",
        "show status --json: vrrp.instances[].holds_addresses",
    ),
    "ctsync_vrrp_advertisements_sent_total": _c(
        ("vrrp_instance",),
        "VRRP advertisements sent",
        "show status --json: vrrp.instances[].adverts_sent",
    ),
    "ctsync_vrrp_advertisements_received_total": _c(
        ("vrrp_instance",),
        "VRRP advertisements received and accepted",
        "show status --json: vrrp.instances[].adverts_received",
    ),
    "ctsync_vrrp_advertisements_rejected_total": _c(
        ("vrrp_instance", "reason"),
        "VRRP advertisements rejected, by keepalived's check",
        "show status --json: vrrp.instances[].rejected",
    ),
    "ctsync_vrrp_transitions_total": _c(
        ("vrrp_instance", "to"),
        "VRRP state changes of the instance, by the state entered",
        "show status --json: vrrp.instances[].transitions_total",
    ),
    "ctsync_vrrp_unknown_vrid_total": _c(
        (), "VRRP packets for a VRID we do not run", "show status --json: vrrp.unknown_vrid"
    ),
    "ctsync_vrrp_send_errors_total": _c(
        ("channel",), "VRRP socket send errors", "show status --json: vrrp.channels[].send_errors"
    ),
    "ctsync_vrrp_receive_errors_total": _c(
        ("channel",),
        "VRRP socket receive errors",
        "show status --json: vrrp.channels[].receive_errors",
    ),
    "ctsync_vrrp_malformed_packets_total": _c(
        ("channel", "reason"),
        "VRRP packets that did not parse",
        "show status --json: vrrp.channels[].malformed",
    ),
    # --- gateway watch ([[gateway-watch]])
    "ctsync_gateway_up": _g(
        ("gateway",),
        "1 while the watched gateway is up, 0 while down or not yet known",
        "show status: gateway NAME : STATE",
    ),
    "ctsync_gateway_state": _g(
        ("gateway", "state"),
        "1 for the gateway's current state (unknown, up, down), 0 for the others",
        "show status: gateway NAME : STATE",
    ),
    "ctsync_gateway_last_change_timestamp_seconds": _g(
        ("gateway",),
        "When the gateway entered its current state (or the watch started), unix time",
        "show status --json: gateways[].since",
    ),
    "ctsync_gateway_probe_rtt_seconds": _g(
        ("gateway",),
        "Round-trip time of the last answered probe (absent: none answered yet)",
        "show status: gateway NAME : ..., rtt",
    ),
    "ctsync_gateway_probes_total": _c(
        ("gateway", "result"),
        "Probes sent, by result (ok, timeout, error: no route, refused, socket error)",
        "show status: gateway NAME : ..., N probes (M lost)",
    ),
    "ctsync_gateway_transitions_total": _c(
        ("gateway", "to"),
        "State changes of the gateway, by the state entered (up, down)",
        "show status --json: gateways[].transitions",
    ),
    "ctsync_gateway_flushes_total": _c(
        ("gateway",),
        "Removals of the matching connections run on a state change (flush-on)",
        "show status --json: gateways[].flushes",
    ),
    "ctsync_gateway_flushed_connections_total": _c(
        ("gateway",),
        "Connections removed because the gateway changed state",
        "show status: gateway NAME : ..., last flush: N removed (summed)",
    ),
    "ctsync_gateway_flush_failed_connections_total": _c(
        ("gateway",),
        "Matching connections whose removal failed (refused, or gone in between)",
        "show status --json: gateways[].flush_failed_total",
    ),
}

#: SyncStats field -> (family, labels). A test checks that every field is here.
SYNC_COUNTERS: Final[dict[str, tuple[str, dict[str, str]]]] = {
    "datagrams_sent": ("ctsync_sync_datagrams_sent_total", {}),
    "bytes_sent": ("ctsync_sync_sent_bytes_total", {}),
    "datagrams_received": ("ctsync_sync_datagrams_received_total", {}),
    "bytes_received": ("ctsync_sync_received_bytes_total", {}),
    "malformed": ("ctsync_sync_malformed_messages_total", {"reason": "decode"}),
    "version": ("ctsync_sync_malformed_messages_total", {"reason": "version"}),
    "unknown_type": ("ctsync_sync_malformed_messages_total", {"reason": "unknown_type"}),
    "auth_failed": ("ctsync_sync_auth_failures_total", {}),
    "replayed": ("ctsync_sync_replayed_messages_total", {}),
    "unverified": ("ctsync_sync_ignored_messages_total", {"reason": "unverified"}),
    "own": ("ctsync_sync_ignored_messages_total", {"reason": "own"}),
    "duplicate_node_id": ("ctsync_sync_ignored_messages_total", {"reason": "duplicate_node_id"}),
    "stale": ("ctsync_sync_ignored_messages_total", {"reason": "stale"}),
    "hellos_sent": ("ctsync_sync_messages_sent_total", {"type": "hello"}),
    "hellos_received": ("ctsync_sync_messages_received_total", {"type": "hello"}),
    "peers_verified": ("ctsync_sync_peer_verifications_total", {}),
    "peer_up": ("ctsync_sync_peer_transitions_total", {"to": "up"}),
    "peer_down": ("ctsync_sync_peer_transitions_total", {"to": "down"}),
    "alive_sent": ("ctsync_sync_messages_sent_total", {"type": "alive"}),
    "data_sent": ("ctsync_sync_messages_sent_total", {"type": "data"}),
    "data_received": ("ctsync_sync_data_messages_received_total", {"result": "applied"}),
    "data_duplicate": ("ctsync_sync_data_messages_received_total", {"result": "duplicate"}),
    "reorder_dropped": (
        "ctsync_sync_data_messages_received_total",
        {"result": "reorder_dropped"},
    ),
    "resent": ("ctsync_sync_resent_messages_total", {}),
    "acks_sent": ("ctsync_sync_messages_sent_total", {"type": "ack"}),
    "acks_received": ("ctsync_sync_messages_received_total", {"type": "ack"}),
    "nacks_sent": ("ctsync_sync_messages_sent_total", {"type": "nack"}),
    "nacks_received": ("ctsync_sync_messages_received_total", {"type": "nack"}),
    "gone_sent": ("ctsync_sync_messages_sent_total", {"type": "gone"}),
    "gone_received": ("ctsync_sync_messages_received_total", {"type": "gone"}),
    "lost": ("ctsync_sync_lost_messages_total", {}),
    "queue_overflow": ("ctsync_sync_queue_overflows_total", {}),
    "external_failed": ("ctsync_sync_external_refused_entries_total", {}),
    "bulk_sent": ("ctsync_sync_transfers_sent_total", {"kind": "bulk"}),
    "bulk_received": ("ctsync_sync_transfers_received_total", {"kind": "bulk"}),
    "resyncs_sent": ("ctsync_sync_messages_sent_total", {"type": "resync"}),
    "resync_requests": ("ctsync_sync_messages_received_total", {"type": "resync"}),
    "digests_sent": ("ctsync_sync_messages_sent_total", {"type": "digest"}),
    "digests_received": ("ctsync_sync_messages_received_total", {"type": "digest"}),
    "digests_compared": ("ctsync_sync_digest_comparisons_total", {}),
    "digest_mismatches": ("ctsync_sync_digest_mismatches_total", {}),
    "repairs_requested": ("ctsync_sync_messages_sent_total", {"type": "repair"}),
    "repair_requests_received": ("ctsync_sync_messages_received_total", {"type": "repair"}),
    "repairs_sent": ("ctsync_sync_transfers_sent_total", {"kind": "repair"}),
    "repair_data_received": ("ctsync_sync_transfers_received_total", {"kind": "repair"}),
}


# --------------------------------------------------------------------------- building


class _Families:
    """Every family of :data:`CATALOG`, created up front (a family with no sample yet
    still shows its HELP and TYPE), filled by name with labels checked against the spec."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        for name, spec in CATALOG.items():
            if spec.kind == "counter":
                self.families[name] = CounterMetricFamily(name, spec.help, labels=spec.labels)
            elif spec.kind == "gauge":
                self.families[name] = GaugeMetricFamily(name, spec.help, labels=spec.labels)

    def add(self, name: str, value: float, **labels: str) -> None:
        spec = CATALOG[name]
        if set(labels) != set(spec.labels):
            raise ValueError(f"{name}: labels {sorted(labels)}, want {list(spec.labels)}")
        family = self.families[name]
        assert isinstance(family, CounterMetricFamily | GaugeMetricFamily)
        family.add_metric([labels[label] for label in spec.labels], float(value))


def build_families(data: MetricsInput, commits: CommitTotals) -> list[Metric]:
    """The metric families of one scrape, in :data:`CATALOG` order."""
    out = _Families()
    add = out.add
    s = data.snapshot
    add("ctsync_build_info", 1, version=__version__, wire_version=str(WIRE_VERSION))
    add("ctsync_node_id", s.node_id)
    add("ctsync_start_time_seconds", s.epoch / 1000)
    _caches(add, s)
    add("ctsync_traffic_processed_bytes_total", s.traffic_bytes)
    add("ctsync_traffic_processed_packets_total", s.traffic_packets)
    active = s.active_link
    for link in s.links:
        device = link.device
        add("ctsync_link_sent_bytes_total", link.bytes_sent, device=device)
        add("ctsync_link_received_bytes_total", link.bytes_received, device=device)
        add("ctsync_link_sent_packets_total", link.packets_sent, device=device)
        add("ctsync_link_received_packets_total", link.packets_received, device=device)
        add("ctsync_link_send_errors_total", link.errors_send, device=device)
        add("ctsync_link_receive_errors_total", link.errors_receive, device=device)
        add("ctsync_link_up", link.status == "RUNNING", device=device)
        add("ctsync_link_active", link is active, device=device)
    n = s.netlink
    add("ctsync_netlink_events_total", n.events_received)
    add("ctsync_netlink_own_events_total", n.events_own)
    add("ctsync_netlink_unknown_events_total", n.events_unknown_type)
    add("ctsync_netlink_event_errors_total", n.catch_event_failed)
    add("ctsync_netlink_overruns_total", n.netlink_overrun)
    add("ctsync_netlink_resyncs_total", n.resync_with_kernel_table)
    add("ctsync_netlink_receive_buffer_bytes", n.buffer_size)
    add("ctsync_netlink_last_resync_duration_seconds", n.last_reconcile_seconds)
    for name, (family, labels) in SYNC_COUNTERS.items():
        add(family, s.sync.get(name, 0), **labels)
    add("ctsync_sync_queue_messages", s.queue_entries)
    add("ctsync_sync_queue_bytes", s.queue_bytes)
    for p in s.peers:
        peer = str(p.node)
        add("ctsync_peer_up", p.up, peer=peer)
        add("ctsync_peer_verified", p.verified, peer=peer)
        if p.last_heard_seconds_ago is not None:
            add("ctsync_peer_last_heard_seconds", p.last_heard_seconds_ago, peer=peer)
        add("ctsync_peer_resync_in_progress", p.resync_in_progress, peer=peer)
        add("ctsync_peer_external_entries", p.external_entries, peer=peer)
        add("ctsync_peer_data_messages_received_total", p.data_received, peer=peer)
        add("ctsync_peer_lost_messages_total", p.lost, peer=peer)
        add("ctsync_peer_start_time_seconds", p.epoch / 1000, peer=peer)
    _commits(out, s.last_commit, commits)
    _failover(add, data)
    if data.vrrp is not None:
        _vrrp(add, data.vrrp)
    _gateways(add, data.gateways)
    return list(out.families.values())


Add = Callable[..., None]


def _caches(add: Add, s: Snapshot) -> None:
    blocks: list[tuple[str, CacheStats]] = [("internal", s.internal)]
    blocks.append(("inject" if s.external_inject else "external", s.external))
    for cache, c in blocks:
        if cache != "inject":  # injected entries live in the kernel table, not in a cache
            add("ctsync_cache_entries", c.active, cache=cache)
        for operation, ok, failed in (
            ("create", c.created, c.created_failed),
            ("update", c.updated, c.updated_failed),
            ("destroy", c.destroyed, c.destroyed_failed),
        ):
            add("ctsync_cache_operations_total", ok, cache=cache, operation=operation, result="ok")
            add(
                "ctsync_cache_operations_total",
                failed,
                cache=cache,
                operation=operation,
                result="failed",
            )
        add("ctsync_cache_filtered_entries_total", c.filtered, cache=cache)


def _commits(out: _Families, last: CommitStats | None, commits: CommitTotals) -> None:
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*commits.buckets, float("inf")), commits.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    out.families["ctsync_commit_duration_seconds"] = HistogramMetricFamily(
        "ctsync_commit_duration_seconds",
        CATALOG["ctsync_commit_duration_seconds"].help,
        buckets=buckets,
        sum_value=commits.seconds,
    )
    out.add("ctsync_commit_entries_total", commits.committed, result="committed")
    out.add("ctsync_commit_entries_total", commits.failed, result="failed")
    for error, count in sorted(commits.errors.items()):
        out.add("ctsync_commit_errors_total", count, error=error)
    if last is not None:
        out.add("ctsync_last_commit_entries", last.attempted, result="attempted")
        out.add("ctsync_last_commit_entries", last.committed, result="committed")
        out.add("ctsync_last_commit_entries", last.failed, result="failed")
        out.add("ctsync_last_commit_duration_seconds", last.seconds)


def _failover(add: Add, data: MetricsInput) -> None:
    role = (data.failover_role or "").lower()
    counts = {str(k).lower(): v for k, v in data.failover_transitions.items()}
    for name in ROLES:
        add("ctsync_failover_role", name == role, role=name)
        add("ctsync_failover_transitions_total", counts.get(name, 0), to=name)
    last = data.last_transition
    if last is not None:
        add("ctsync_failover_last_transition_timestamp_seconds", float(last["at"]))
        if last.get("done") is not None:
            duration = max(float(last["done"]) - float(last["at"]), 0.0)
            add("ctsync_failover_last_transition_duration_seconds", duration)


def _states(add: Add, name: str, current: str, **labels: str) -> None:
    current = current.lower()
    for state in VRRP_STATES:
        add(name, state == current, state=state, **labels)


def _vrrp(add: Add, vrrp: Mapping[str, Any]) -> None:
    _states(
        add, "ctsync_vrrp_group_state", str(vrrp.get("state", "")), sync_group=vrrp["sync_group"]
    )
    for inst in vrrp.get("instances", []):
        name = str(inst["name"])
        _states(add, "ctsync_vrrp_state", str(inst.get("state", "")), vrrp_instance=name)
        add(
            "ctsync_vrrp_instance_info",
            1,
            vrrp_instance=name,
            interface=str(inst.get("interface", "")),
            vrid=str(inst.get("virtual_router_id", "")),
            version=str(inst.get("version", "")),
            mode=str(inst.get("mode", "")),
        )
        add("ctsync_vrrp_priority", inst.get("priority", 0), vrrp_instance=name)
        add("ctsync_vrrp_addresses_held", bool(inst.get("holds_addresses")), vrrp_instance=name)
        add(
            "ctsync_vrrp_advertisements_sent_total", inst.get("adverts_sent", 0), vrrp_instance=name
        )
        add(
            "ctsync_vrrp_advertisements_received_total",
            inst.get("adverts_received", 0),
            vrrp_instance=name,
        )
        for reason, count in sorted((inst.get("rejected") or {}).items()):
            add(
                "ctsync_vrrp_advertisements_rejected_total",
                count,
                vrrp_instance=name,
                reason=str(reason),
            )
        for state, count in sorted((inst.get("transitions_total") or {}).items()):
            add(
                "ctsync_vrrp_transitions_total",
                count,
                vrrp_instance=name,
                to=str(state).lower(),
            )
    if "unknown_vrid" in vrrp:
        add("ctsync_vrrp_unknown_vrid_total", vrrp["unknown_vrid"])
    for channel in vrrp.get("channels", []):
        label = str(channel.get("channel", ""))
        add("ctsync_vrrp_send_errors_total", channel.get("send_errors", 0), channel=label)
        add("ctsync_vrrp_receive_errors_total", channel.get("receive_errors", 0), channel=label)
        for reason, count in sorted((channel.get("malformed") or {}).items()):
            add("ctsync_vrrp_malformed_packets_total", count, channel=label, reason=str(reason))


def _gateways(add: Add, gateways: Iterable[GatewaySnapshot]) -> None:
    for gw in gateways:
        name = gw.name
        add("ctsync_gateway_up", gw.state == GatewayState.UP, gateway=name)
        for state in GatewayState:
            add("ctsync_gateway_state", gw.state == state, gateway=name, state=state.value)
        add("ctsync_gateway_last_change_timestamp_seconds", gw.since, gateway=name)
        if gw.last_rtt is not None:
            add("ctsync_gateway_probe_rtt_seconds", gw.last_rtt, gateway=name)
        for result in PROBE_RESULTS:
            add(
                "ctsync_gateway_probes_total", gw.probes.get(result, 0), gateway=name, result=result
            )
        for event in FLUSH_EVENTS:
            add(
                "ctsync_gateway_transitions_total",
                gw.transitions.get(event, 0),
                gateway=name,
                to=event,
            )
        add("ctsync_gateway_flushes_total", gw.flushes, gateway=name)
        add("ctsync_gateway_flushed_connections_total", gw.removed_total, gateway=name)
        add("ctsync_gateway_flush_failed_connections_total", gw.failed_total, gateway=name)


# --------------------------------------------------------------------------- collector, server

Reader = Callable[[], tuple[MetricsInput, CommitTotals]]


class CtsyncCollector(Collector):
    """A prometheus-client collector: ``read()`` once per scrape, then build the families."""

    def __init__(self, read: Reader) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect() at registration, i.e. read
        # the agent from inside its own loop. Nothing to check for name clashes: this
        # registry is ours.
        return []

    def collect(self) -> Iterator[Metric]:
        data, commits = self._read()
        yield from build_families(data, commits)


class MetricsServer:
    """The HTTP endpoint (``[metrics] listen``): prometheus-client's server on its thread.

    Scrapes run on that thread; they hop to the agent's loop for their data
    (``run_coroutine_threadsafe``), so the snapshot is taken where the counters live.
    """

    def __init__(
        self,
        host: str,
        port: int,
        source: Callable[[], Awaitable[MetricsInput]],
        *,
        scrape_timeout: float = SCRAPE_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.source = source
        self.scrape_timeout = scrape_timeout
        self.commits = CommitHistogram()
        self.registry = CollectorRegistry(auto_describe=False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._httpd: Any = None
        self._thread: threading.Thread | None = None

    def observe_commit(self, commit: CommitStats) -> None:
        """A commit ended (called on the agent's loop)."""
        self.commits.observe(commit)

    async def _gather(self) -> tuple[MetricsInput, CommitTotals]:
        return await self.source(), self.commits.totals()

    def read(self) -> tuple[MetricsInput, CommitTotals]:
        """One scrape's data, from the HTTP thread (blocks on the agent's loop)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the agent is not running")
        future = asyncio.run_coroutine_threadsafe(self._gather(), loop)
        try:
            return future.result(self.scrape_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.warning("metrics scrape: the agent did not answer in %.0fs", self.scrape_timeout)
            raise

    @property
    def url(self) -> str:
        host = self.host or "*"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/metrics"

    async def start(self) -> None:
        """Bind and serve; raises OSError (naming ``metrics.listen``) if the bind fails."""
        self._loop = asyncio.get_running_loop()
        self.registry.register(CtsyncCollector(self.read))
        ProcessCollector(registry=self.registry)
        # "" means every address: "::" is dual-stack on Linux; plain IPv4 if IPv6 is off.
        hosts = [self.host] if self.host else ["::", "0.0.0.0"]
        error: OSError | None = None
        for host in hosts:
            try:
                self._httpd, self._thread = start_http_server(
                    self.port, addr=host, registry=self.registry
                )
            except OSError as exc:
                error = exc
                continue
            log.info("serving Prometheus metrics on %s", self.url)
            return
        assert error is not None
        raise OSError(
            error.errno, f"metrics.listen {self.url}: cannot listen: {error.strerror or error}"
        )

    async def close(self) -> None:
        """Stop serving and close the socket (in-flight scrapes end on their own threads)."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        await asyncio.to_thread(httpd.shutdown)  # waits for serve_forever's next poll
        httpd.server_close()
        if thread is not None:
            await asyncio.to_thread(thread.join, 5.0)
        log.info("metrics server stopped")
