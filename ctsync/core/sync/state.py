"""Configuration, counters and per-peer state of a sync session (plain data, no behaviour)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ctsync.core.cache import Cache
from ctsync.core.wire import DEFAULT_MAX_DATAGRAM, ReplayWindow


@dataclass(frozen=True)
class SessionConfig:
    """Timers and bounds of a :class:`~ctsync.core.sync.session.SyncSession` (seconds, bytes).

    The defaults suit a dedicated LAN sync link. Tests shrink ``digest_interval`` so that
    anti-entropy runs often enough to be exercised in a few simulated seconds.
    """

    max_datagram: int = DEFAULT_MAX_DATAGRAM  # bytes per datagram (link MTU - IP/UDP headers)
    # sync-queue-size: bound of the resend queue, estimated as QUEUE_SEQ_COST per queued seq
    # plus QUEUE_KEY_COST per key reference it holds.
    queue_limit_bytes: int = 1 << 20
    ack_interval: float = 0.05  # cumulative ACK at most this often, while there is news
    nack_min_interval: float = 0.02  # NACKs per peer at most this often; resends per seq too
    nack_retry_interval: float = 0.1  # re-NACK a gap that a resend has not filled yet
    alive_interval: float = 1.0  # ALIVE when no DATA/ALIVE/HELLO was sent for this long
    hello_interval: float = 0.5  # HELLO retry while a heard peer epoch is unverified
    peer_dead_after: float = 3.0  # a peer is down after this long without a valid datagram
    digest_interval: float = 10.0  # anti-entropy DIGEST period
    digest_min_interval: float = 0.5  # fastest pace of the early DIGEST a GONE asks for
    resync_retry_interval: float = 2.0  # resend RESYNC if no full transfer started by then
    reorder_limit: int = 4096  # DATA datagrams held beyond a gap, per peer
    external_limit: int = 0  # max entries per external cache (0 = unbounded)

    def __post_init__(self) -> None:
        if self.max_datagram < 512:
            raise ValueError("max_datagram must be at least 512 bytes")
        for name in (
            "ack_interval",
            "nack_min_interval",
            "nack_retry_interval",
            "alive_interval",
            "hello_interval",
            "peer_dead_after",
            "digest_interval",
            "digest_min_interval",
            "resync_retry_interval",
        ):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.queue_limit_bytes < 0 or self.reorder_limit < 0 or self.external_limit < 0:
            raise ValueError("queue_limit_bytes, reorder_limit and external_limit must be >= 0")


QUEUE_SEQ_COST = 100
QUEUE_KEY_COST = 8


@dataclass
class SyncStats:
    """Session counters (monotonic). ``malformed + version + unknown_type`` is what
    ``show statistics`` prints as conntrackd's ``Malformed msgs``; ``lost`` is exact: DATA
    seqs a receiver never applied (skipped after GONE, or left behind by a peer restart)."""

    datagrams_sent: int = 0
    bytes_sent: int = 0
    datagrams_received: int = 0
    bytes_received: int = 0
    # rejected datagrams, by reason
    malformed: int = 0
    auth_failed: int = 0
    version: int = 0
    unknown_type: int = 0
    replayed: int = 0
    unverified: int = 0
    own: int = 0
    duplicate_node_id: int = 0  # authenticated datagrams from another node with our id
    stale: int = 0  # ACK/REPAIR/GONE for an older epoch of ours: ignored
    # handshake and liveness
    hellos_sent: int = 0
    hellos_received: int = 0
    peers_verified: int = 0
    peer_up: int = 0
    peer_down: int = 0
    alive_sent: int = 0
    # reliable DATA
    data_sent: int = 0
    data_received: int = 0  # DATA applied
    data_duplicate: int = 0
    reorder_dropped: int = 0
    resent: int = 0
    acks_sent: int = 0
    acks_received: int = 0
    nacks_sent: int = 0
    nacks_received: int = 0
    gone_sent: int = 0
    gone_received: int = 0
    lost: int = 0
    queue_overflow: int = 0
    external_failed: int = 0  # puts an external cache refused (external_limit)
    # full transfers and anti-entropy
    bulk_sent: int = 0
    bulk_received: int = 0
    resyncs_sent: int = 0
    resync_requests: int = 0
    digests_sent: int = 0
    digests_received: int = 0
    digests_compared: int = 0
    digest_mismatches: int = 0
    repairs_requested: int = 0
    repair_requests_received: int = 0
    repairs_sent: int = 0
    repair_data_received: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PeerCounters:
    data_received: int = 0
    lost: int = 0
    bulk_received: int = 0
    repairs_requested: int = 0
    digest_mismatches: int = 0


@dataclass
class RxState:
    """Where the ordered DATA stream of one peer epoch stands on this node."""

    start: int = 1  # the first DATA seq of this stream (next_seq of the verifying HELLO)
    next: int = 1  # the next DATA seq to apply
    top: int = 0  # the highest DATA seq known to exist (from DATA, ALIVE or GONE)
    held: dict[int, tuple[int, list[list[bytes]], list[bytes] | list[int]]] = field(
        default_factory=dict
    )  # seq -> (flags, updates, destroys), beyond a gap
    gone: list[tuple[int, int]] = field(default_factory=list)  # ranges the sender gave up
    ack_news: bool = False  # something to acknowledge since the last ACK
    last_ack: float = -math.inf
    nack_new: bool = False  # a gap appeared that no NACK named yet
    last_nack: float = -math.inf

    @property
    def has_gap(self) -> bool:
        return self.top >= self.next


@dataclass(eq=False)
class PeerState:
    """Everything this node knows about one peer node."""

    node: int
    external: Cache  # the peer's internal cache as we know it (digest kept)
    epoch: int = -1  # newest epoch heard (verified or not)
    verified: bool = False
    up: bool = False  # verified and heard within peer_dead_after
    last_heard: float = -math.inf
    mtu: int = 0  # from its HELLO caps (informational)
    resync_in_progress: bool = False  # we asked for a full transfer that has not begun
    resync_sent_at: float = -math.inf
    bulk_receiving: bool = False  # between its BULK_BEGIN and BULK_END
    acked: int = 0  # highest of OUR DATA seqs it acknowledged (this epoch of ours)
    rx: RxState = field(default_factory=RxState)
    counters: PeerCounters = field(default_factory=PeerCounters)
    # handshake
    window: ReplayWindow = field(default_factory=ReplayWindow)
    nonce_heard: bytes | None = None  # its latest HELLO nonce, echoed in our HELLOs
    challenge: int = 0  # our first nonce index sent after we heard this epoch
