"""Frozen statistics snapshots: the one source for CLI text, JSON and metrics.

The agent assembles a :class:`Snapshot` from its parts' counters; renderers
(``ctsync.cli.render_sync``) and the Prometheus collector only read it. JSON keys are the
field names (snake_case, integers, never pre-formatted strings) under a versioned schema.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Final

from ctsync.core.cache import CacheCounters

SCHEMA: Final = "ctsync.statistics/v1"


@dataclass(frozen=True)
class CacheStats:
    """conntrackd's ``cache internal|external`` block, plus ctsync's filtered count."""

    active: int = 0
    created: int = 0
    created_failed: int = 0
    updated: int = 0
    updated_failed: int = 0
    destroyed: int = 0
    destroyed_failed: int = 0
    filtered: int = 0

    @classmethod
    def of(cls, active: int, counters: CacheCounters) -> CacheStats:
        """From a cache's counters; ``active`` is its current size."""
        fields = [name for name in cls.__dataclass_fields__ if name != "active"]
        return cls(active, *(getattr(counters, name) for name in fields))

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(*(a + b for a, b in zip(_values(self), _values(other), strict=True)))


def _values(obj: Any) -> list[int]:
    return [getattr(obj, name) for name in obj.__dataclass_fields__]


@dataclass(frozen=True)
class LinkStats:
    device: str
    kind: str  # "multicast" or "UDP", as conntrackd prints it
    status: str  # RUNNING / NO-CARRIER / DOWN
    role: str  # ACTIVE / BACKUP
    bytes_sent: int = 0
    bytes_received: int = 0
    packets_sent: int = 0
    packets_received: int = 0
    errors_send: int = 0
    errors_receive: int = 0


@dataclass(frozen=True)
class NetlinkStats:
    """conntrackd's ``netlink stats`` (-s runtime)."""

    events_received: int = 0
    events_own: int = 0
    events_unknown_type: int = 0
    catch_event_failed: int = 0
    netlink_overrun: int = 0
    resync_with_kernel_table: int = 0
    buffer_size: int = 0
    last_reconcile_seconds: float = 0.0


@dataclass(frozen=True)
class PeerStats:
    node: int
    epoch: int
    verified: bool
    up: bool
    last_heard_seconds_ago: float | None
    resync_in_progress: bool
    external_entries: int
    data_received: int = 0
    lost: int = 0


@dataclass(frozen=True)
class CommitStats:
    """The last commit of the external caches into the kernel."""

    attempted: int = 0
    committed: int = 0
    failed: int = 0
    seconds: float = 0.0
    finished_seconds_ago: float | None = None
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    node_id: int
    epoch: int
    uptime_seconds: float
    internal: CacheStats
    external: CacheStats
    external_inject: bool
    traffic_bytes: int
    traffic_packets: int
    links: tuple[LinkStats, ...]
    netlink: NetlinkStats
    sync: dict[str, int]  # SyncStats.as_dict(): every protocol counter
    queue_entries: int
    queue_bytes: int
    peers: tuple[PeerStats, ...]
    last_commit: CommitStats | None = None

    @property
    def active_link(self) -> LinkStats | None:
        for link in self.links:
            if link.role == "ACTIVE":
                return link
        return self.links[0] if self.links else None

    @property
    def malformed(self) -> int:
        """conntrackd's ``Malformed msgs``: everything that failed to parse."""
        return (
            self.sync.get("malformed", 0)
            + self.sync.get("version", 0)
            + self.sync.get("unknown_type", 0)
        )

    @property
    def lost(self) -> int:
        return self.sync.get("lost", 0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schema"] = SCHEMA
        out["message_tracking"] = {"malformed": self.malformed, "lost": self.lost}
        return out


def snapshot_from_dict(data: dict[str, Any]) -> Snapshot:
    """Rebuild a Snapshot from :meth:`Snapshot.to_dict` output (the CLI's side)."""
    if data.get("schema") != SCHEMA:
        raise ValueError(f"unknown statistics schema {data.get('schema')!r}, want {SCHEMA}")
    commit = data.get("last_commit")
    return Snapshot(
        node_id=data["node_id"],
        epoch=data["epoch"],
        uptime_seconds=data["uptime_seconds"],
        internal=CacheStats(**data["internal"]),
        external=CacheStats(**data["external"]),
        external_inject=data["external_inject"],
        traffic_bytes=data["traffic_bytes"],
        traffic_packets=data["traffic_packets"],
        links=tuple(LinkStats(**link) for link in data["links"]),
        netlink=NetlinkStats(**data["netlink"]),
        sync=dict(data["sync"]),
        queue_entries=data["queue_entries"],
        queue_bytes=data["queue_bytes"],
        peers=tuple(PeerStats(**peer) for peer in data["peers"]),
        last_commit=CommitStats(**commit) if commit else None,
    )
