"""The sync protocol engine of one node (docs/wire-protocol.md), sans I/O.

A :class:`SyncSession` takes datagrams and the time as arguments and produces datagrams:
the agent feeds it what the transport received (:meth:`SyncSession.receive`), tells it
which internal-cache keys changed (:meth:`SyncSession.local_change`, then
:meth:`SyncSession.flush`), runs :meth:`SyncSession.tick` whenever
:meth:`SyncSession.next_deadline` has passed (and after each batch of received
datagrams), and sends whatever :meth:`SyncSession.datagrams_to_send` returns to every peer.
No clock, socket or randomness source is touched here: ``now`` is an argument and HELLO
nonces come from the injected ``random_bytes``.

``receive`` only changes state and answers what must be answered at once (resends, GONE,
RESYNC, REPAIR requests); everything that is worth coalescing over a batch of datagrams
(ACK/NACK, HELLO replies, bulk transfers, repairs) is emitted by ``tick``.

Choices where docs/wire-protocol.md is silent:

- HELLO ``caps`` also carries ``want``: the node ids whose current epoch the sender has
  heard but not verified. A node answers a HELLO (echoing its nonce) only when it is
  named there, so the handshake ends instead of ping-ponging; HELLOs are otherwise sent at
  start, on hearing a new epoch, and every ``hello_interval`` while ``want`` is not empty.
- The bulk a verification schedules and the bulk a RESYNC asks for share one timer
  (``ack_interval`` late), so a normal handshake costs one full transfer per side. A RESYNC
  we sent is repeated every ``resync_retry_interval`` until a BULK_BEGIN of that peer is
  applied (RESYNC itself is not reliable).
- GONE: the receiver skips the gone seqs (counting ``lost``) and the *sender* moves its next
  DIGEST forward (no sooner than ``digest_min_interval`` after the last one); there is no
  "send me a digest" message. A gap skipped during a full transfer cancels that transfer's
  sweep (it would destroy what the gap held); the digest repairs instead.
- DIGEST goes out only when nothing is dirty and no bulk is scheduled (``tick`` flushes
  first) and some peer is up; a receiver compares it only when its next seq equals the
  digest's and no full transfer is open.
- "Up" peers (verified, heard within ``peer_dead_after``) hold the resend queue; with none,
  the queue empties. A peer that comes back up also brings the next DIGEST forward.
- While DATA is unacknowledged, ALIVE probes the tail after ``4 * ack_interval`` instead of
  ``alive_interval``; a receiver answers every ALIVE with an ACK, so lost ACKs heal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from ctsync.core import wire
from ctsync.core.cache import DIGEST_BUCKETS, Cache, Change
from ctsync.core.sync.state import (
    QUEUE_KEY_COST,
    QUEUE_SEQ_COST,
    PeerState,
    RxState,
    SessionConfig,
    SyncStats,
)
from ctsync.core.wire import (
    DATA_BULK_BEGIN,
    DATA_BULK_END,
    DATA_REPAIR,
    DATA_RESEND,
    Authenticator,
    MsgType,
    WireError,
)

NONCE_SIZE: Final = 16
NONCES_KEPT: Final = 32  # our recent HELLO nonces a peer may echo
MAX_NACK_RANGES: Final = 100  # ~11 bytes each: one ACK stays well under the MTU
TAIL_PROBE_ACKS: Final = 4  # ALIVE after this many ack intervals while DATA is unacked
_DESTROY_OVERHEAD: Final = 5  # msgpack bin header of a key in ``destroys``, rounded up
_ENTRY_OVERHEAD: Final = wire.entry_size(b"", b"")  # per [key, value] pair, beyond the bytes

ExternalHook = Callable[[int, Change, bytes, bytes | None], None]
_INF: Final = math.inf


class _MalformedError(Exception):
    """A payload that decoded but makes no sense (counted as ``malformed``)."""


_REASONS: Final = {
    "malformed": "malformed",
    "auth": "auth_failed",
    "version": "version",
    "type": "unknown_type",
}


@dataclass(slots=True)
class _Sent:
    """A queued DATA seq: the keys it carried (re-read on resend), never the bytes."""

    flags: int
    keys: list[bytes]
    buckets: list[int]  # REPAIR only: the bucket ids the first repair datagram clears
    resent_at: float = -_INF

    @property
    def cost(self) -> int:
        return QUEUE_SEQ_COST + QUEUE_KEY_COST * (len(self.keys) + len(self.buckets))


class SyncSession:
    """One node's end of the sync protocol: reliable ordered DATA, handshake, anti-entropy.

    ``internal`` must keep a digest (``Cache(..., digest=True)``); the session reads it but
    never writes it. ``peers[node].external`` holds what each peer told us.
    """

    def __init__(
        self,
        node_id: int,
        epoch: int,
        auth: Authenticator,
        internal: Cache,
        config: SessionConfig,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        if not 1 <= node_id <= 0xFFFF:
            raise ValueError("node id must be in 1..65535")
        if epoch < 0:
            raise ValueError("epoch must be >= 0")
        if internal.digest is None:
            raise ValueError("the internal cache must keep a digest (Cache(digest=True))")
        self.node_id = node_id
        self.epoch = epoch
        self.internal = internal
        self.config = config
        self.peers: dict[int, PeerState] = {}
        self.stats = SyncStats()
        self.on_external_change: ExternalHook | None = None
        self._auth = auth
        self._encode = wire.Encoder(auth).encode
        self._random = random_bytes
        self._out: list[bytes] = []
        self._packet = 0
        self._next_seq = 1
        self._dirty: dict[bytes, None] = {}
        self._queue: dict[int, _Sent] = {}
        self._queue_lo = 1  # lowest seq still queued; == _next_seq when empty
        self._queue_bytes = 0
        self._nonces: dict[bytes, int] = {}
        self._nonce_count = 0
        self._hello_due = -_INF  # the first tick says hello
        self._last_announce = -_INF  # last DATA/ALIVE/HELLO sent
        self._digest_due = -_INF
        self._last_digest = -_INF
        self._bulk_due: float | None = None
        self._repair_buckets: set[int] = set()
        self._repair_due = _INF

    # --- inputs -----------------------------------------------------------------------

    def local_change(self, key: bytes) -> None:
        """The internal cache changed for ``key`` (new, updated or destroyed)."""
        self._dirty[key] = None

    def flush(self, now: float) -> None:
        """Send every dirty key now, with its current value (absent = destroyed)."""
        keys = self._dirty
        if not keys:
            return
        self._dirty = {}
        self._send_keys(keys, now)

    def request_resync(self, now: float) -> None:
        """Ask every verified peer for a full transfer (``ctsync resync``)."""
        for peer in self.peers.values():
            if peer.verified:
                self._send_resync(peer, now)

    def bulk_send(self, now: float) -> None:
        """Send the whole internal cache as one full transfer (``ctsync bulk-send``)."""
        self.flush(now)
        self._bulk(now)

    def receive(self, data: bytes, now: float) -> None:
        """Process one datagram from the sync link (any sender, any content)."""
        stats = self.stats
        stats.datagrams_received += 1
        stats.bytes_received += len(data)
        try:
            dg = wire.decode(self._auth, data)
        except WireError as exc:
            name = _REASONS.get(exc.reason, "malformed")
            setattr(stats, name, getattr(stats, name) + 1)
            return
        if dg.node == self.node_id:
            if dg.epoch == self.epoch:
                stats.own += 1  # our own multicast, looped back
            else:
                stats.duplicate_node_id += 1  # another node uses our node id
            return
        peer = self.peers.get(dg.node)
        if peer is None:
            external = Cache(f"external:{dg.node}", limit=self.config.external_limit, digest=True)
            peer = self.peers[dg.node] = PeerState(dg.node, external)
        if not peer.window.check(dg.epoch, dg.packet):
            stats.replayed += 1
            return
        if dg.epoch != peer.epoch:  # the window refuses older epochs: this one is newer
            self._new_epoch(peer, dg.epoch, now)
        peer.last_heard = now
        try:
            if dg.type is MsgType.HELLO:
                self._on_hello(peer, dg.payload, now)
                return
            if not peer.verified:
                stats.unverified += 1
                return
            if not peer.up:
                self._peer_came_up(peer, now)
            handler = self._HANDLERS[dg.type]
            handler(self, peer, dg.payload, now)
        except _MalformedError:
            stats.malformed += 1

    def tick(self, now: float) -> None:
        """Run every timer that is due: HELLO, flush, bulk, repair, ACK/NACK, DIGEST, ALIVE."""
        cfg = self.config
        for peer in self.peers.values():
            # Deadlines are compared as ``now >= due`` with ``due`` computed exactly as in
            # next_deadline(): float rounding must not leave a due timer that never fires.
            if peer.up and now >= peer.last_heard + cfg.peer_dead_after:
                peer.up = False
                self.stats.peer_down += 1
                self._trim()
        if self._hello_due <= now:
            self._send_hello(now)
        self.flush(now)
        if self._bulk_due is not None and self._bulk_due <= now:
            self._bulk(now)
        if self._repair_buckets and self._repair_due <= now:
            self._send_repair(now)
        for peer in self.peers.values():
            if not peer.verified:
                continue
            if (
                peer.resync_in_progress
                and peer.up
                and now >= peer.resync_sent_at + cfg.resync_retry_interval
            ):
                self._send_resync(peer, now)
            self._maybe_ack(peer, now)
        if self._digest_due <= now:
            self._maybe_digest(now)
        if self._alive_due() <= now:
            self._emit(MsgType.ALIVE, [self._next_seq])
            self.stats.alive_sent += 1
            self._last_announce = now

    def next_deadline(self) -> float | None:
        """The time by which :meth:`tick` must run next (``-inf``: at once)."""
        cfg = self.config
        if self._dirty:
            return -_INF
        due = [self._hello_due, self._digest_due, self._alive_due(), self._repair_due]
        if self._bulk_due is not None:
            due.append(self._bulk_due)
        for peer in self.peers.values():
            if not peer.verified:
                continue
            if peer.up:
                due.append(peer.last_heard + cfg.peer_dead_after)
                if peer.resync_in_progress:
                    due.append(peer.resync_sent_at + cfg.resync_retry_interval)
            rx = peer.rx
            if rx.ack_news:
                due.append(rx.last_ack + cfg.ack_interval)
            if rx.has_gap:
                due.append(self._nack_due(rx))
        best = min(due)
        return None if best == _INF else best

    # --- outputs ----------------------------------------------------------------------

    def datagrams_to_send(self) -> list[bytes]:
        """Drain the datagrams to send (each to the group, or to every unicast peer)."""
        out, self._out = self._out, []
        return out

    @property
    def next_seq(self) -> int:
        """The seq our next DATA will carry."""
        return self._next_seq

    @property
    def queue_len(self) -> int:
        return len(self._queue)

    @property
    def queue_bytes(self) -> int:
        return self._queue_bytes

    @property
    def pending(self) -> bool:
        """Dirty keys, a scheduled bulk or repair, or DATA some up peer has not acked."""
        return bool(
            self._dirty or self._bulk_due is not None or self._repair_buckets or self._unacked()
        )

    # --- sending ----------------------------------------------------------------------

    def _emit(self, mtype: MsgType, payload: list[Any]) -> None:
        self._packet += 1
        data = self._encode(mtype, self.node_id, self.epoch, self._packet, payload)
        self._out.append(data)
        self.stats.datagrams_sent += 1
        self.stats.bytes_sent += len(data)

    def _send_keys(
        self,
        keys: Iterable[bytes],
        now: float,
        *,
        bulk: bool = False,
        buckets: list[int] | None = None,
    ) -> None:
        """Pack keys with their current values into numbered DATA and queue them.

        ``bulk`` flags the first BULK_BEGIN and the last BULK_END (one empty datagram for
        an empty cache); ``buckets`` makes a repair: every datagram is flagged REPAIR and
        the first lists the buckets to clear. A record larger than a datagram travels alone.
        """
        # Per key this is the sender's hot loop: locals only, entry_size inlined, updates
        # as (key, value) tuples (msgpack packs a tuple as the same array as a list).
        room = self.config.max_datagram - wire.DATA_OVERHEAD
        get = self.internal.getter()
        repair = buckets is not None
        chunks: list[tuple[list[bytes], list[tuple[bytes, bytes]], list[bytes]]] = []
        cur_keys: list[bytes] = []
        updates: list[tuple[bytes, bytes]] = []
        destroys: list[bytes] = []
        add_key = cur_keys.append
        budget = room - (3 + 2 * len(buckets) if buckets else 0)
        size = 0
        for key in keys:
            value = get(key)
            if value is None:
                if repair:
                    continue  # the bucket clear covers it
                n = len(key) + _DESTROY_OVERHEAD
            else:
                n = len(key) + len(value) + _ENTRY_OVERHEAD
            if size + n > budget and cur_keys:
                chunks.append((cur_keys, updates, destroys))
                cur_keys, updates, destroys, size, budget = [], [], [], 0, room
                add_key = cur_keys.append
            add_key(key)
            if value is None:
                destroys.append(key)
            else:
                updates.append((key, value))
            size += n
        if cur_keys or not chunks:
            chunks.append((cur_keys, updates, destroys))
        last = len(chunks) - 1
        for i, (ckeys, cupdates, cdestroys) in enumerate(chunks):
            flags = 0
            if bulk:
                flags |= (DATA_BULK_BEGIN if i == 0 else 0) | (DATA_BULK_END if i == last else 0)
            first_buckets: list[int] = []
            if repair:
                flags |= DATA_REPAIR
                first_buckets = list(buckets or ()) if i == 0 else []
            seq = self._next_seq
            self._next_seq += 1
            self._emit(MsgType.DATA, [seq, flags, cupdates, first_buckets if repair else cdestroys])
            self.stats.data_sent += 1
            self._enqueue(seq, _Sent(flags, ckeys, first_buckets))
        self._last_announce = now

    def _enqueue(self, seq: int, sent: _Sent) -> None:
        self._queue[seq] = sent
        self._queue_bytes += sent.cost
        self._trim()
        limit = self.config.queue_limit_bytes
        while self._queue_bytes > limit and self._queue:
            self._pop_oldest()
            self.stats.queue_overflow += 1

    def _pop_oldest(self) -> None:
        sent = self._queue.pop(self._queue_lo)
        self._queue_bytes -= sent.cost
        self._queue_lo += 1

    def _trim(self) -> None:
        """Drop the seqs every up peer acknowledged (all of them when no peer is up)."""
        floor = self._next_seq - 1
        for peer in self.peers.values():
            if peer.up and peer.acked < floor:
                floor = peer.acked
        while self._queue_lo <= floor and self._queue:
            self._pop_oldest()
        if not self._queue:
            self._queue_lo = self._next_seq

    def _unacked(self) -> bool:
        top = self._next_seq - 1
        return any(p.up and p.acked < top for p in self.peers.values())

    def _alive_due(self) -> float:
        interval = self.config.alive_interval
        if self._unacked():
            interval = min(interval, TAIL_PROBE_ACKS * self.config.ack_interval)
        return self._last_announce + interval

    def _resend(self, seq: int, now: float) -> None:
        sent = self._queue.get(seq)
        if sent is None or now - sent.resent_at < self.config.nack_min_interval:
            return
        sent.resent_at = now
        get = self.internal.getter()
        updates: list[tuple[bytes, bytes]] = []
        destroys: list[bytes] = []
        for key in sent.keys:
            value = get(key)
            if value is not None:
                updates.append((key, value))
            elif not sent.flags & DATA_REPAIR:
                destroys.append(key)
        tail: list[Any] = list(sent.buckets) if sent.flags & DATA_REPAIR else destroys
        self._emit(MsgType.DATA, [seq, sent.flags | DATA_RESEND, updates, tail])
        self.stats.resent += 1

    def _bulk(self, now: float) -> None:
        self._bulk_due = None
        self._send_keys(self.internal.keys(), now, bulk=True)
        self.stats.bulk_sent += 1

    def _schedule_bulk(self, now: float) -> None:
        # A short delay lets the RESYNC of a peer we just verified (which usually follows
        # our own verification of it) ride on the same full transfer.
        due = now + self.config.ack_interval
        if self._bulk_due is None or due < self._bulk_due:
            self._bulk_due = due

    def _send_repair(self, now: float) -> None:
        buckets = sorted(self._repair_buckets)
        self._repair_buckets.clear()
        self._repair_due = _INF
        keys = [key for key, _ in self.internal.bucket_items(buckets)]
        self._send_keys(keys, now, buckets=buckets)
        self.stats.repairs_sent += 1

    def _send_resync(self, peer: PeerState, now: float) -> None:
        self._emit(MsgType.RESYNC, [peer.node])
        self.stats.resyncs_sent += 1
        peer.resync_in_progress = True
        peer.resync_sent_at = now

    def _send_hello(self, now: float) -> None:
        nonce = self._random(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise ValueError("random_bytes returned the wrong number of bytes")
        self._nonces[nonce] = self._nonce_count
        self._nonce_count += 1
        while len(self._nonces) > NONCES_KEPT:
            del self._nonces[next(iter(self._nonces))]
        dead_after = self.config.peer_dead_after
        echoes: list[list[Any]] = []
        want: list[int] = []
        for peer in self.peers.values():
            if peer.nonce_heard is not None:
                echoes.append([peer.node, peer.epoch, peer.nonce_heard])
            if not peer.verified and now - peer.last_heard < dead_after:
                want.append(peer.node)
        caps = {"next_seq": self._next_seq, "mtu": self.config.max_datagram, "want": want}
        self._emit(MsgType.HELLO, [nonce, echoes, caps])
        self.stats.hellos_sent += 1
        self._last_announce = now
        self._hello_due = now + self.config.hello_interval if want else _INF

    def _maybe_digest(self, now: float) -> None:
        cfg = self.config
        if not any(p.up for p in self.peers.values()):
            self._digest_due = now + cfg.digest_interval
            return
        if self._bulk_due is not None:  # exact "as of next_seq" needs nothing pending
            self._digest_due = self._bulk_due
            return
        digest = self.internal.digest
        assert digest is not None
        self._emit(MsgType.DIGEST, [self._next_seq, list(digest)])
        self.stats.digests_sent += 1
        self._last_digest = now
        self._digest_due = now + cfg.digest_interval

    def _digest_soon(self, now: float) -> None:
        due = max(now, self._last_digest + self.config.digest_min_interval)
        self._digest_due = min(self._digest_due, due)

    def _maybe_ack(self, peer: PeerState, now: float) -> None:
        cfg = self.config
        rx = peer.rx
        nack_due = rx.has_gap and now >= self._nack_due(rx)
        ack_due = rx.ack_news and now >= rx.last_ack + cfg.ack_interval
        if not (nack_due or ack_due):
            return
        # An ACK also names the gaps whenever the NACK rate limit allows (nack_due implies it).
        with_nacks = rx.has_gap and now >= rx.last_nack + cfg.nack_min_interval
        nacks = _nack_ranges(rx) if with_nacks else []
        self._emit(MsgType.ACK, [peer.node, peer.epoch, rx.next - 1, nacks])
        self.stats.acks_sent += 1
        rx.last_ack = now
        rx.ack_news = False
        if with_nacks:
            rx.last_nack = now
            rx.nack_new = False
            if nacks:
                self.stats.nacks_sent += 1

    def _nack_due(self, rx: RxState) -> float:
        cfg = self.config
        wait = cfg.nack_min_interval
        if not rx.nack_new:
            wait = max(wait, cfg.nack_retry_interval)
        return rx.last_nack + wait

    # --- receiving --------------------------------------------------------------------

    def _new_epoch(self, peer: PeerState, epoch: int, now: float) -> None:
        """A newer epoch of ``peer``: it restarted. Unverified until it answers a fresh nonce."""
        if peer.verified:
            # DATA of the old epoch we knew of and never applied will never come.
            missing = max(0, peer.rx.top - peer.rx.next + 1)
            self.stats.lost += missing
            peer.counters.lost += missing
        if peer.bulk_receiving:
            peer.external.abort_reconcile()
            peer.bulk_receiving = False
        if peer.up:
            self.stats.peer_down += 1
        peer.epoch = epoch
        peer.verified = False
        peer.up = False
        peer.rx = RxState()
        peer.acked = 0
        peer.resync_in_progress = False
        peer.nonce_heard = None
        peer.challenge = self._nonce_count  # only nonces from now on prove it is live
        self._hello_due = min(self._hello_due, now)
        self._trim()

    def _peer_came_up(self, peer: PeerState, now: float) -> None:
        peer.up = True
        self.stats.peer_up += 1
        # It may have missed DATA we no longer queue: let the digest find out soon.
        self._digest_soon(now)

    def _on_hello(self, peer: PeerState, payload: list[Any], now: float) -> None:
        nonce, echoes, caps = payload
        next_seq = caps.get("next_seq")
        want = caps.get("want", [])
        if (
            len(nonce) != NONCE_SIZE
            or type(next_seq) is not int
            or not 1 <= next_seq < 1 << 63
            or not isinstance(want, list)
        ):
            raise _MalformedError
        self.stats.hellos_received += 1
        peer.nonce_heard = nonce
        mtu = caps.get("mtu")
        if type(mtu) is int:
            peer.mtu = mtu
        if self.node_id in want:
            self._hello_due = min(self._hello_due, now)  # it waits for our echo
        if peer.verified:
            if not peer.up:
                self._peer_came_up(peer, now)
            return
        for node, epoch, echoed in echoes:
            if node == self.node_id and epoch == self.epoch:
                index = self._nonces.get(echoed)
                if index is not None and index >= peer.challenge:
                    self._verify(peer, next_seq, now)
                break

    def _verify(self, peer: PeerState, next_seq: int, now: float) -> None:
        peer.verified = True
        self.stats.peers_verified += 1
        self._peer_came_up(peer, now)
        peer.rx = RxState(start=next_seq, next=next_seq, top=next_seq - 1)
        peer.acked = self._next_seq - 1  # keep everything from now on for it
        # It restarted or is new: it lost our state, we lost its.
        self._send_resync(peer, now)
        self._schedule_bulk(now)

    def _on_alive(self, peer: PeerState, payload: list[Any], now: float) -> None:
        (next_seq,) = payload
        rx = peer.rx
        if next_seq - 1 > rx.top:
            rx.top = next_seq - 1
            rx.nack_new = True
        rx.ack_news = True  # re-ACK: the sender may be probing because our ACK was lost

    def _on_data(self, peer: PeerState, payload: list[Any], now: float) -> None:
        seq, flags, updates, destroys = payload
        rx = peer.rx
        if seq < rx.next or seq in rx.held:
            self.stats.data_duplicate += 1
            rx.ack_news = True
            return
        if seq > rx.top:
            if seq > rx.top + 1:
                rx.nack_new = True
            rx.top = seq
        if seq == rx.next:
            self._apply(peer, flags, updates, destroys)
            rx.next += 1
            self._advance(peer)
            rx.ack_news = True
        elif len(rx.held) < self.config.reorder_limit:
            rx.held[seq] = (flags, updates, destroys)
        else:
            self.stats.reorder_dropped += 1

    def _advance(self, peer: PeerState) -> None:
        """Apply held DATA in order; skip what the sender declared gone."""
        rx = peer.rx
        held = rx.held
        while True:
            item = held.pop(rx.next, None)
            if item is not None:
                self._apply(peer, *item)
                rx.next += 1
                continue
            if rx.next > rx.top:
                break
            end = _gone_end(rx.gone, rx.next)
            if end is None:
                break
            stop = min([end + 1, *(s for s in held if s > rx.next)])
            skipped = stop - rx.next
            self.stats.lost += skipped
            peer.counters.lost += skipped
            rx.next = stop
            if peer.bulk_receiving:  # the sweep would destroy what the gap held
                peer.external.abort_reconcile()
                peer.bulk_receiving = False
        rx.gone = [(a, b) for a, b in rx.gone if b >= rx.next]

    def _apply(
        self,
        peer: PeerState,
        flags: int,
        updates: list[list[bytes]],
        destroys: list[bytes] | list[int],
    ) -> None:
        ext = peer.external
        hook = self.on_external_change
        node = peer.node
        stats = self.stats
        if flags & DATA_BULK_BEGIN:
            ext.begin_reconcile()
            peer.bulk_receiving = True
            peer.resync_in_progress = False
            stats.bulk_received += 1
            peer.counters.bulk_received += 1
        if flags & DATA_REPAIR:
            stats.repair_data_received += 1
            buckets = [b for b in destroys if type(b) is int and b < DIGEST_BUCKETS]
            old: dict[bytes, bytes] = {}
            if buckets:
                if hook is not None:
                    old = dict(ext.bucket_items(buckets))
                ext.clear_buckets(buckets)
            for key, value in updates:
                change = ext.put(key, value)
                if change is Change.FAILED:
                    stats.external_failed += 1
                elif hook is not None:
                    # Report the net effect of clear + refill, not a destroy/create pair.
                    if key in old:
                        if old.pop(key) != value:
                            hook(node, Change.UPDATED, key, value)
                    elif change is not Change.UNCHANGED:
                        hook(node, change, key, value)
            if hook is not None:
                for key in old:  # cleared and not refilled by this datagram
                    hook(node, Change.DESTROYED, key, None)
        else:
            for gone_key in destroys:
                assert isinstance(gone_key, bytes)
                if ext.destroy(gone_key) is Change.DESTROYED and hook is not None:
                    hook(node, Change.DESTROYED, gone_key, None)
            for key, value in updates:
                change = ext.put(key, value)
                if change is Change.FAILED:
                    stats.external_failed += 1
                elif hook is not None and change is not Change.UNCHANGED:
                    hook(node, change, key, value)
        if flags & DATA_BULK_END and peer.bulk_receiving:
            peer.bulk_receiving = False
            for key in ext.end_reconcile():
                if hook is not None:
                    hook(node, Change.DESTROYED, key, None)
        stats.data_received += 1
        peer.counters.data_received += 1

    def _for_us(self, target: int, target_epoch: int) -> bool:
        if target != self.node_id:
            return False  # addressed to another node of the group
        if target_epoch != self.epoch:
            self.stats.stale += 1
            return False
        return True

    def _on_ack(self, peer: PeerState, payload: list[Any], now: float) -> None:
        target, target_epoch, upto, nacks = payload
        if not self._for_us(target, target_epoch):
            return
        self.stats.acks_received += 1
        upto = min(upto, self._next_seq - 1)
        if upto > peer.acked:
            peer.acked = upto
            self._trim()
        if not nacks:
            return
        self.stats.nacks_received += 1
        top = self._next_seq - 1
        for nack_first, nack_last in nacks[:MAX_NACK_RANGES]:
            first = max(nack_first, 1)
            last = min(nack_last, top)
            if first > last:
                continue
            if first < self._queue_lo:
                gone_last = min(last, self._queue_lo - 1)
                self._emit(MsgType.GONE, [peer.node, peer.epoch, first, gone_last])
                self.stats.gone_sent += 1
                self._digest_soon(now)
            for seq in range(max(first, self._queue_lo), last + 1):
                self._resend(seq, now)

    def _on_resync(self, peer: PeerState, payload: list[Any], now: float) -> None:
        if payload[0] != self.node_id:
            return
        self.stats.resync_requests += 1
        self._schedule_bulk(now)

    def _on_digest(self, peer: PeerState, payload: list[Any], now: float) -> None:
        seq, crcs = payload
        if len(crcs) != DIGEST_BUCKETS:
            raise _MalformedError
        self.stats.digests_received += 1
        if peer.rx.next != seq or peer.bulk_receiving:
            return  # not exactly where the digest was taken: wait for the next one
        self.stats.digests_compared += 1
        mine = peer.external.digest
        assert mine is not None
        differ = [b for b in range(DIGEST_BUCKETS) if mine[b] != crcs[b]]
        if not differ:
            return
        self.stats.digest_mismatches += 1
        peer.counters.digest_mismatches += 1
        self._emit(MsgType.REPAIR, [peer.node, peer.epoch, differ])
        self.stats.repairs_requested += 1
        peer.counters.repairs_requested += 1

    def _on_repair(self, peer: PeerState, payload: list[Any], now: float) -> None:
        target, target_epoch, buckets = payload
        if not self._for_us(target, target_epoch):
            return
        self.stats.repair_requests_received += 1
        wanted = {b for b in buckets if b < DIGEST_BUCKETS}
        if wanted:
            self._repair_buckets |= wanted
            self._repair_due = min(self._repair_due, now)  # coalesce requests of a batch

    def _on_gone(self, peer: PeerState, payload: list[Any], now: float) -> None:
        target, target_epoch, first, last = payload
        if not self._for_us(target, target_epoch):
            return
        self.stats.gone_received += 1
        rx = peer.rx
        first = max(first, rx.next)
        if first > last:
            return
        rx.top = max(rx.top, last)
        rx.gone.append((first, last))
        rx.ack_news = True
        self._advance(peer)

    _HANDLERS: Final[dict[MsgType, Callable[[SyncSession, PeerState, list[Any], float], None]]] = {
        MsgType.ALIVE: _on_alive,
        MsgType.DATA: _on_data,
        MsgType.ACK: _on_ack,
        MsgType.RESYNC: _on_resync,
        MsgType.DIGEST: _on_digest,
        MsgType.REPAIR: _on_repair,
        MsgType.GONE: _on_gone,
    }


def _gone_end(gone: Iterable[tuple[int, int]], seq: int) -> int | None:
    """The end of the GONE range holding ``seq`` (the furthest one), if any."""
    end: int | None = None
    for first, last in gone:
        if first <= seq <= last and (end is None or last > end):
            end = last
    return end


def _nack_ranges(rx: RxState) -> list[list[int]]:
    """The missing seqs between what we applied and what we know exists, as ranges."""
    ranges: list[list[int]] = []
    start = rx.next
    for seq in sorted(rx.held):
        if seq > start:
            ranges.extend(_minus_gone(start, seq - 1, rx.gone))
        start = seq + 1
        if len(ranges) >= MAX_NACK_RANGES:
            return ranges[:MAX_NACK_RANGES]
    if start <= rx.top:
        ranges.extend(_minus_gone(start, rx.top, rx.gone))
    return ranges[:MAX_NACK_RANGES]


def _minus_gone(first: int, last: int, gone: list[tuple[int, int]]) -> list[list[int]]:
    parts = [[first, last]]
    for g_first, g_last in gone:
        nxt: list[list[int]] = []
        for a, b in parts:
            if g_last < a or g_first > b:
                nxt.append([a, b])
                continue
            if a < g_first:
                nxt.append([a, g_first - 1])
            if g_last < b:
                nxt.append([g_last + 1, b])
        parts = nxt
    return parts
