"""A simulated sync link for SyncSession tests: fake clock, lossy multicast, no sleeping.

Every datagram a node sends is delivered to every other node (multicast), each copy
independently lost, duplicated and delayed (a random delay reorders) with a seeded
``random.Random``. Time only moves when :meth:`Cluster.run` jumps it to the next arrival
or session deadline, so a minute of protocol time costs milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ctsync.core import record
from ctsync.core.cache import Cache
from ctsync.core.entry import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    Entry,
    Status,
    TcpInfo,
    TcpState,
    make_tuple,
)
from ctsync.core.sync import SessionConfig, SyncSession
from ctsync.core.wire import Authenticator

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))

#: Short timers so that every mechanism runs within a few simulated seconds.
FAST = SessionConfig(digest_interval=1.0, digest_min_interval=0.2)


def seeded_random_bytes(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


def conn(i: int, version: int = 0) -> tuple[bytes, bytes]:
    """A synthetic conntrack record (documentation addresses only), distinct per ``i``.

    ``version`` changes the value (timeout, TCP state), as an UPDATE event would. The
    timeout change differs from key to key: identical value changes of two entries of one
    digest bucket cancel out in the CRC32-XOR digest (see test_digest_linear_crc_collision).
    """
    status = int(Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED)
    timeout = 432000 - (i * 2654435761 + version * 40503) % 100000
    if i % 5 == 4:
        orig = make_tuple(f"2001:db8::{i % 9000 + 1:x}", "2001:db8:1::53", IPPROTO_UDP,
                          10000 + i % 50000, 53)  # fmt: skip
        return record.from_entry(Entry(orig, orig.inverted(), status, timeout % 180, 0))
    orig = make_tuple(
        f"192.0.2.{i % 250 + 1}", f"198.51.100.{i // 250 % 250 + 1}", IPPROTO_TCP,
        1024 + i % 60000, 443,
    )  # fmt: skip
    reply = orig.inverted()
    if i % 3 == 0:  # SNAT to a documentation address
        reply = make_tuple(
            reply.src_text, "203.0.113.1", IPPROTO_TCP, reply.sport, 20000 + i % 40000
        )
        status |= int(Status.SRC_NAT | Status.SRC_NAT_DONE)
    state = (TcpState.ESTABLISHED, TcpState.FIN_WAIT, TcpState.TIME_WAIT)[version % 3]
    entry = Entry(orig, reply, status, timeout, i % 7, id=i,
                  protoinfo=TcpInfo(state, 7, 7, 0x23, 0, 0x23, 0))  # fmt: skip
    return record.from_entry(entry)


@dataclass
class Node:
    node_id: int
    epoch: int
    internal: Cache
    session: SyncSession


@dataclass
class LinkModel:
    loss: float = 0.0
    dup: float = 0.0
    max_delay: float = 0.0  # uniform in [0, max_delay]: reorders when > 0
    min_delay: float = 0.0001


@dataclass
class Cluster:
    """N sessions on one simulated multicast link."""

    link: LinkModel = field(default_factory=LinkModel)
    seed: int = 0
    config: SessionConfig = FAST
    now: float = 0.0
    nodes: dict[int, Node] = field(default_factory=dict)
    delivered: int = 0
    sent: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._heap: list[tuple[float, int, int, bytes]] = []
        self._order = itertools.count()
        self._blocked: set[tuple[int, int]] = set()

    # --- topology -----------------------------------------------------------------------

    def add(
        self,
        node_id: int,
        epoch: int | None = None,
        *,
        key: bytes | None = KEY,
        config: SessionConfig | None = None,
        internal: Cache | None = None,
    ) -> Node:
        epoch = 1_700_000_000_000 + node_id if epoch is None else epoch
        internal = Cache(f"internal:{node_id}", digest=True) if internal is None else internal
        session = SyncSession(
            node_id,
            epoch,
            Authenticator(key),
            internal,
            config or self.config,
            seeded_random_bytes(self.seed * 1000 + node_id * 7 + epoch % 1000),
        )
        node = Node(node_id, epoch, internal, session)
        self.nodes[node_id] = node
        return node

    def restart(self, node_id: int, epoch: int) -> Node:
        """Replace a node by a fresh session with a newer epoch and an empty cache."""
        old = self.nodes[node_id]
        assert epoch > old.epoch
        return self.add(node_id, epoch)

    def block(self, src: int, dst: int) -> None:
        self._blocked.add((src, dst))

    def unblock_all(self) -> None:
        self._blocked.clear()

    # --- local changes ------------------------------------------------------------------

    def change(self, node_id: int, i: int, version: int = 0) -> None:
        node = self.nodes[node_id]
        key, value = conn(i, version)
        node.internal.put(key, value)
        node.session.local_change(key)

    def destroy(self, node_id: int, i: int) -> None:
        node = self.nodes[node_id]
        key, _ = conn(i)
        node.internal.destroy(key)
        node.session.local_change(key)

    def flush(self, node_id: int | None = None) -> None:
        for node in self.nodes.values():
            if node_id is None or node.node_id == node_id:
                node.session.flush(self.now)
        self._collect()

    # --- the link -----------------------------------------------------------------------

    def inject(self, dst: int, data: bytes, delay: float = 0.0) -> None:
        """Deliver raw bytes to one node (an attacker on the link)."""
        heapq.heappush(self._heap, (self.now + delay, next(self._order), dst, data))

    def _collect(self) -> None:
        link = self.link
        rng = self.rng
        for src in list(self.nodes.values()):
            for data in src.session.datagrams_to_send():
                self.sent += 1
                for dst in self.nodes:
                    if dst == src.node_id or (src.node_id, dst) in self._blocked:
                        continue
                    copies = 2 if link.dup and rng.random() < link.dup else 1
                    for _ in range(copies):
                        if link.loss and rng.random() < link.loss:
                            continue
                        delay = link.min_delay + rng.random() * link.max_delay
                        heapq.heappush(self._heap, (self.now + delay, next(self._order), dst, data))

    def run(self, duration: float, max_steps: int = 2_000_000) -> None:
        """Advance the clock by ``duration``, delivering and ticking as things fall due."""
        end = self.now + duration
        self._collect()
        for _ in range(max_steps):
            t_net = self._heap[0][0] if self._heap else float("inf")
            t_timer = min(
                (d for n in self.nodes.values() if (d := n.session.next_deadline()) is not None),
                default=float("inf"),
            )
            t = min(t_net, t_timer)
            if t > end:
                break
            self.now = max(self.now, t)
            while self._heap and self._heap[0][0] <= self.now:
                _, _, dst, data = heapq.heappop(self._heap)
                node = self.nodes.get(dst)
                if node is not None:
                    node.session.receive(data, self.now)
                    self.delivered += 1
            for node in self.nodes.values():
                deadline = node.session.next_deadline()
                if deadline is not None and deadline <= self.now:
                    node.session.tick(self.now)
            self._collect()
        else:
            raise AssertionError("simulation did not settle: a deadline never moves forward")
        self.now = end

    # --- checks -------------------------------------------------------------------------

    def diverged(self) -> list[tuple[int, int]]:
        """(src, dst) pairs where dst's external cache of src differs from src's cache."""
        bad = []
        for src in self.nodes.values():
            want = dict(src.internal.items())
            for dst in self.nodes.values():
                if dst is src:
                    continue
                peer = dst.session.peers.get(src.node_id)
                have = dict(peer.external.items()) if peer is not None else {}
                if have != want:
                    bad.append((src.node_id, dst.node_id))
        return bad

    def converged(self) -> bool:
        return not self.diverged()

    def quiet(self) -> bool:
        """Every peer verified and caught up with every sender's DATA stream."""
        for dst in self.nodes.values():
            for src_id, peer in dst.session.peers.items():
                src = self.nodes.get(src_id)
                if src is None or not peer.verified or peer.epoch != src.epoch:
                    return False
                if peer.rx.next != src.session.next_seq or peer.bulk_receiving:
                    return False
        return True

    def settle(self, limit: float = 60.0, step: float = 0.5) -> float:
        """Run until quiet and every external cache equals its source; returns the time taken."""
        start = self.now
        while self.now - start < limit:
            self.run(step)
            if self.quiet() and self.converged():
                return self.now - start
        raise AssertionError(
            f"no convergence after {limit} simulated s: diverged {self.diverged()}, "
            f"quiet {self.quiet()}"
        )
