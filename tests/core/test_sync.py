"""SyncSession: sessions joined by a simulated link (tests/core/sync_harness.py).

The property every test comes back to: once traffic stops and the clock runs, every node's
external cache of a peer equals that peer's internal cache exactly. Around it: the
handshake, ordered reliable DATA, GONE + digest repair, full transfers, restarts, and the
security rules (nothing unauthenticated, replayed or unverified touches a cache).
"""

from __future__ import annotations

import ast
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctsync.core import ctnetlink as nl
from ctsync.core import record, wire
from ctsync.core import sync as sync_pkg
from ctsync.core.cache import Cache, Change, bucket_of
from ctsync.core.sync import SessionConfig, SyncSession
from ctsync.core.wire import (
    DATA_BULK_BEGIN,
    DATA_BULK_END,
    DATA_REPAIR,
    DATA_RESEND,
    Authenticator,
    MsgType,
)
from tests.core import strategies as cst
from tests.core.sync_harness import FAST, KEY, OTHER_KEY, Cluster, LinkModel, conn

SIM = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def started(n: int = 2, **kw: Any) -> Cluster:
    cluster = Cluster(**kw)
    for node_id in range(1, n + 1):
        cluster.add(node_id)
    cluster.run(1.0)
    return cluster


def snapshot(cluster: Cluster) -> dict[tuple[int, int], dict[bytes, bytes]]:
    """Every cache of every node: (node, 0) internal, (node, peer) external."""
    snap = {}
    for node in cluster.nodes.values():
        snap[(node.node_id, 0)] = dict(node.internal.items())
        for peer_id, peer in node.session.peers.items():
            snap[(node.node_id, peer_id)] = dict(peer.external.items())
    return snap


def decoded(data: bytes) -> wire.Datagram:
    return wire.decode(Authenticator(KEY), data)


# --- handshake ----------------------------------------------------------------------------


def test_handshake_verifies_both_sides_and_runs_one_full_transfer_each() -> None:
    c = Cluster()
    a, b = c.add(1), c.add(2)
    for i in range(50):
        c.change(1, i)
    c.run(1.0)
    for me, other in ((a, b), (b, a)):
        peer = me.session.peers[other.node_id]
        assert peer.verified and peer.up and peer.epoch == other.epoch
        assert me.session.stats.bulk_sent == 1  # our own bulk and its RESYNC coalesced
        assert me.session.stats.resyncs_sent == 1
    assert c.converged()


def test_session_rejects_an_internal_cache_without_digest() -> None:
    with pytest.raises(ValueError, match="digest"):
        SyncSession(1, 1, Authenticator(KEY), Cache("i"), FAST, random.Random(0).randbytes)


def test_hello_payload_follows_the_spec() -> None:
    c = Cluster()
    a = c.add(1)
    a.session.tick(0.0)
    (data,) = a.session.datagrams_to_send()
    dg = decoded(data)
    assert dg.type is MsgType.HELLO
    nonce, echoes, caps = dg.payload
    assert len(nonce) == 16 and echoes == []
    assert caps["next_seq"] == 1 and caps["mtu"] == FAST.max_datagram


# --- convergence --------------------------------------------------------------------------


def test_two_nodes_bursts_converge_both_ways() -> None:
    c = started(2)
    for i in range(600):
        c.change(1, i)
        c.change(2, 10_000 + i)
    c.flush()
    for i in range(0, 600, 3):
        c.change(1, i, version=1)
        c.destroy(2, 10_000 + i)
    c.flush()
    c.settle(limit=5)
    assert len(c.nodes[2].session.peers[1].external) == 600
    assert len(c.nodes[1].session.peers[2].external) == 400
    for node in c.nodes.values():
        assert node.session.stats.lost == 0
        assert node.session.stats.malformed == node.session.stats.auth_failed == 0


def test_three_nodes_all_generating_converge() -> None:
    c = started(3, link=LinkModel(loss=0.1, max_delay=0.005), seed=7)
    rng = random.Random(1)
    for burst in range(5):
        for node_id in (1, 2, 3):
            for _ in range(120):
                i = node_id * 100_000 + rng.randrange(300)
                if rng.random() < 0.25:
                    c.destroy(node_id, i)
                else:
                    c.change(node_id, i, version=burst)
        c.flush()
        c.run(0.02)
    c.settle(limit=30)
    for node in c.nodes.values():
        assert set(node.session.peers) == {1, 2, 3} - {node.node_id}


@settings(SIM, max_examples=10)
@given(st.lists(cst.entries(record_only=True, consistent_nat=True), min_size=1, max_size=40))
def test_rich_records_from_ctnetlink_travel_unchanged(entries: list[Any]) -> None:
    """Records built the way the kernel path builds them (parse_ct of ctnetlink attrs)."""
    c = started(2)
    for entry in entries:
        body = nl.encode_entry_attrs(entry)
        c.nodes[1].internal.update(record.parse_ct(body, 0, len(body)))
    for key, _ in c.nodes[1].internal.items():
        c.nodes[1].session.local_change(key)
    c.flush()
    c.settle(limit=5)
    assert len(c.nodes[2].session.peers[1].external) == len(c.nodes[1].internal) > 0


@settings(SIM, max_examples=60)
@given(
    seed=st.integers(0, 2**32 - 1),
    nodes=st.sampled_from([2, 3]),
    loss=st.sampled_from([0.0, 0.05, 0.2, 0.5]),
    dup=st.sampled_from([0.0, 0.1, 0.3]),
    max_delay=st.sampled_from([0.0, 0.003, 0.05, 0.3]),
    bursts=st.integers(1, 6),
)
def test_lossy_duplicating_reordering_link_converges(
    seed: int, nodes: int, loss: float, dup: float, max_delay: float, bursts: int
) -> None:
    c = Cluster(link=LinkModel(loss=loss, dup=dup, max_delay=max_delay), seed=seed)
    for node_id in range(1, nodes + 1):
        c.add(node_id)
    rng = random.Random(seed)
    c.run(rng.random())
    for _ in range(bursts):
        for _ in range(rng.randint(1, 300)):
            node_id = rng.randint(1, nodes)
            i = node_id * 100_000 + rng.randrange(400)
            if rng.random() < 0.2:
                c.destroy(node_id, i)
            else:
                c.change(node_id, i, version=rng.randrange(6))
        if rng.random() < 0.8:
            c.flush()  # otherwise the next tick flushes
        c.run(rng.random() * 0.3)  # changes interleave with delivery
    c.settle(limit=60)  # traffic stopped: converge within a bounded simulated time
    for src in c.nodes.values():
        for dst in c.nodes.values():
            if src is not dst:
                peer = dst.session.peers[src.node_id]
                # lost is exact: every DATA seq was either applied or skipped after GONE
                applied_or_lost = peer.counters.data_received + peer.counters.lost
                assert applied_or_lost == src.session.next_seq - peer.rx.start


def test_dirty_keys_are_sent_once_with_their_current_value() -> None:
    c = started(2)
    a = c.nodes[1]
    for version in range(4):
        c.change(1, 7, version=version)
    key, value = conn(7, version=3)
    a.session.flush(c.now)
    (data,) = a.session.datagrams_to_send()
    seq, flags, updates, destroys = decoded(data).payload
    assert flags == 0 and updates == [[key, value]] and destroys == []
    # created then destroyed before a flush: a destroy
    c.change(1, 8)
    c.destroy(1, 8)
    a.session.flush(c.now)
    (data,) = a.session.datagrams_to_send()
    assert decoded(data).payload[1:] == [0, [], [conn(8)[0]]]
    assert decoded(data).payload[0] == seq + 1


def test_datagrams_respect_max_datagram() -> None:
    config = replace(FAST, max_datagram=600)
    c = Cluster(config=config)
    c.add(1)
    c.add(2)
    c.run(1)
    for i in range(500):
        c.change(1, i)
    c.nodes[1].session.flush(c.now)
    out = c.nodes[1].session.datagrams_to_send()
    assert len(out) > 30
    assert all(len(d) <= 600 for d in out)
    for d in out:
        c.inject(2, d)
    c.settle(limit=5)


def test_resend_keeps_its_seq_flags_resend_and_carries_the_current_value() -> None:
    c = started(2)
    a = c.nodes[1]
    c.change(1, 1)
    c.change(1, 2)
    a.session.flush(c.now)
    (lost,) = a.session.datagrams_to_send()  # never delivered
    lost_seq = decoded(lost).payload[0]
    c.change(1, 1, version=2)  # the current value is no longer what the lost one carried
    tap = Tap(c, 1)
    c.flush()  # seq + 1 reveals the gap: NACK, resend
    c.run(0.5)
    assert c.converged()
    assert c.nodes[2].session.stats.nacks_sent >= 1
    resends = [
        dg.payload
        for dg in map(decoded, tap.frames)
        if dg.type is MsgType.DATA and dg.payload[1] & DATA_RESEND
    ]
    assert resends
    seq, _, updates, destroys = resends[0]
    assert seq == lost_seq and destroys == []
    assert {k: v for k, v in updates} == dict([conn(1, 2), conn(2)])


def test_tail_loss_is_revealed_by_alive() -> None:
    c = started(2)
    c.block(1, 2)
    for i in range(10):
        c.change(1, i)
    c.flush()
    c.unblock_all()
    assert not c.converged()
    c.run(0.15)
    assert not c.converged()  # nothing reveals the loss yet
    c.run(1.0)
    assert c.converged()
    assert c.nodes[2].session.stats.lost == 0
    assert c.nodes[1].session.stats.alive_sent >= 1


def test_receiver_applies_in_seq_order_and_holds_beyond_a_gap() -> None:
    c = started(2)
    a, b = c.nodes[1], c.nodes[2]
    c.change(1, 1, version=0)
    a.session.flush(c.now)
    first = a.session.datagrams_to_send()
    c.change(1, 1, version=1)
    a.session.flush(c.now)
    second = a.session.datagrams_to_send()
    key, value1 = conn(1, 1)
    for d in second:  # the newer one first
        b.session.receive(d, c.now)
    assert key not in b.session.peers[1].external
    assert len(b.session.peers[1].rx.held) == 1
    for d in first:
        b.session.receive(d, c.now)
    assert b.session.peers[1].external.get(key) == value1


def test_sender_trims_its_queue_once_every_up_peer_acked() -> None:
    c = started(3)
    for i in range(100):
        c.change(1, i)
    c.flush()
    assert c.nodes[1].session.queue_len > 0
    c.run(0.5)
    assert c.nodes[1].session.queue_len == 0
    # with a peer that never acks, the queue keeps its seqs until the peer is down
    c.block(3, 1)
    for i in range(100):
        c.change(1, i, version=1)
    c.flush()
    c.run(0.5)
    assert c.nodes[1].session.queue_len > 0
    c.run(FAST.peer_dead_after + 1)
    assert not c.nodes[1].session.peers[3].up
    assert c.nodes[1].session.queue_len == 0
    c.unblock_all()
    c.settle(limit=10)
    assert c.nodes[1].session.peers[3].up


# --- GONE, digests, repairs ---------------------------------------------------------------


@settings(SIM, max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), loss=st.sampled_from([0.2, 0.35]))
def test_queue_overflow_converges_through_gone_and_digest_repair(seed: int, loss: float) -> None:
    config = replace(FAST, queue_limit_bytes=2000)  # a handful of seqs
    c = Cluster(link=LinkModel(loss=loss, max_delay=0.01), seed=seed, config=config)
    c.add(1)
    c.add(2)
    c.run(2)
    for version in range(2):
        for i in range(500):
            c.change(1, i, version)
        c.flush()
        c.run(0.05)
    c.settle(limit=60)  # handshake and full transfers done: they cannot do the repair below
    # The last changes go out while the link is down: the queue cannot hold them, no later
    # DATA supersedes them, so only GONE + digest repair can bring node 2 up to date.
    c.block(1, 2)
    for i in range(500):
        c.change(1, i, 2)
    for i in range(0, 500, 7):
        c.destroy(1, i)
    c.flush()
    c.run(0.05)
    c.unblock_all()
    c.settle(limit=60)
    sender, receiver = c.nodes[1].session, c.nodes[2].session
    assert sender.stats.queue_overflow > 0
    assert sender.stats.gone_sent > 0 and receiver.stats.gone_received > 0
    assert receiver.stats.lost > 0
    assert receiver.stats.repairs_requested > 0 and sender.stats.repairs_sent > 0
    peer = receiver.peers[1]
    assert peer.counters.data_received + peer.counters.lost == sender.next_seq - peer.rx.start


def test_digest_finds_and_repairs_silent_divergence() -> None:
    c = started(2)
    for i in range(300):
        c.change(1, i)
    c.flush()
    c.settle(limit=5)
    ext = c.nodes[2].session.peers[1].external
    # Corrupt the receiver behind the protocol's back: an extra, a changed, a missing entry.
    ext.put(*conn(99_999))
    key5, _ = conn(5)
    ext.put(key5, conn(5, version=4)[1])
    ext.destroy(conn(6)[0])
    assert not c.converged()
    c.run(FAST.digest_interval + 0.5)
    assert c.converged()
    sender, receiver = c.nodes[1].session, c.nodes[2].session
    assert receiver.stats.digest_mismatches >= 1
    assert sender.stats.repairs_sent >= 1
    assert receiver.stats.repair_data_received >= 1
    assert receiver.stats.lost == 0


def test_repair_first_datagram_clears_the_buckets_it_lists() -> None:
    c = started(2)
    for i in range(40):
        c.change(1, i)
    c.flush()
    c.settle(limit=5)
    bucket = bucket_of(conn(3)[0])
    request = wire.encode(Authenticator(KEY), MsgType.REPAIR, 2, c.nodes[2].epoch, 10**6,
                          [1, c.nodes[1].epoch, [bucket]])  # fmt: skip
    c.nodes[1].session.receive(request, c.now)
    c.nodes[1].session.tick(c.now)
    data = [decoded(d) for d in c.nodes[1].session.datagrams_to_send()]
    repair = [dg for dg in data if dg.type is MsgType.DATA]
    assert len(repair) == 1
    _, flags, updates, buckets = repair[0].payload
    assert flags & DATA_REPAIR and buckets == [bucket]
    assert {k for k, _ in updates} == {
        k for k, _ in c.nodes[1].internal.items() if bucket_of(k) == bucket
    }


def test_digest_is_only_compared_exactly_where_it_was_taken() -> None:
    c = started(2)
    for i in range(20):
        c.change(1, i)
    c.flush()
    c.settle(limit=5)
    a, b = c.nodes[1], c.nodes[2]
    compared = b.session.stats.digests_compared
    digest = a.internal.digest
    assert digest is not None
    stale = wire.encode(Authenticator(KEY), MsgType.DIGEST, 1, a.epoch, 10**6,
                        [a.session.next_seq + 5, [0] * 256])  # fmt: skip
    b.session.receive(stale, c.now)
    assert b.session.stats.digests_compared == compared
    assert b.session.stats.repairs_requested == 0


def test_digest_linear_crc_collision() -> None:
    from tests.core.test_cache import tcp  # a realistic entry with a fixed timeout

    groups: dict[tuple[int, int, int], list[int]] = {}
    for sport in range(20_000, 40_000):
        key, value = record.from_entry(tcp(sport=sport))
        groups.setdefault((bucket_of(key), len(key), len(value)), []).append(sport)
    pair = next(ports for ports in groups.values() if len(ports) >= 2)[:2]
    missed, seen = Cache("sender", digest=True), Cache("receiver", digest=True)
    for sport in pair:
        missed.put(*record.from_entry(tcp(sport=sport, timeout=120)))  # the same transition
        seen.put(*record.from_entry(tcp(sport=sport)))
    assert dict(missed.items()) != dict(seen.items())
    assert missed.digest != seen.digest


# --- full transfers and restarts ----------------------------------------------------------


def test_bulk_send_and_resync_commands() -> None:
    c = started(3)
    for i in range(200):
        c.change(2, i)
    c.flush()
    c.settle(limit=5)
    bulk_before = c.nodes[2].session.stats.bulk_sent
    c.nodes[1].session.request_resync(c.now)
    c.run(0.5)
    assert c.nodes[2].session.stats.resync_requests >= 1
    assert c.nodes[2].session.stats.bulk_sent == bulk_before + 1  # 3 got it too, no harm
    c.nodes[3].session.bulk_send(c.now)
    c.run(0.5)
    assert c.converged()


def test_bulk_sweeps_entries_the_sender_no_longer_has() -> None:
    c = started(2)
    for i in range(100):
        c.change(1, i)
    c.flush()
    c.settle(limit=5)
    # Entries vanish from node 1 without sync noticing (e.g. a reconcile after ENOBUFS
    # whose destroys were never marked dirty): a bulk send repairs the peer.
    for i in range(50):
        c.nodes[1].internal.destroy(conn(i)[0])
    c.nodes[1].session.bulk_send(c.now)
    raw = c.nodes[1].session.datagrams_to_send()
    flags = [dg.payload[1] for dg in map(decoded, raw) if dg.type is MsgType.DATA]
    assert len(flags) > 1 and flags[0] == DATA_BULK_BEGIN and flags[-1] == DATA_BULK_END
    assert not any(f & (DATA_BULK_BEGIN | DATA_BULK_END) for f in flags[1:-1])
    for frame in raw:
        c.nodes[2].session.receive(frame, c.now)
    assert dict(c.nodes[2].session.peers[1].external.items()) == dict(c.nodes[1].internal.items())
    assert c.nodes[2].session.peers[1].external.counters.reconciled_removed == 50


def test_empty_bulk_is_one_datagram_that_sweeps_everything() -> None:
    c = started(2)
    for i in range(30):
        c.change(1, i)
    c.flush()
    c.settle(limit=5)
    c.nodes[1].internal.clear()
    c.nodes[1].session.bulk_send(c.now)
    c.run(0.5)
    assert len(c.nodes[2].session.peers[1].external) == 0


@pytest.mark.parametrize("loss", [0.0, 0.2])
def test_restart_with_newer_epoch_sweeps_old_entries_and_converges(loss: float) -> None:
    c = started(3, link=LinkModel(loss=loss, max_delay=0.01), seed=11)
    for i in range(300):
        c.change(1, i)
        c.change(2, 10_000 + i)
        c.change(3, 20_000 + i)
    c.flush()
    c.settle(limit=30)
    old = c.nodes[2]
    new = c.restart(2, old.epoch + 60_000)  # empty cache: the kernel table was flushed
    c.settle(limit=30)
    for other in (1, 3):
        peer = c.nodes[other].session.peers[2]
        assert peer.epoch == new.epoch and peer.verified
    assert c.converged()  # peers swept every entry of the old incarnation
    assert len(c.nodes[1].session.peers[2].external) == 0
    # the restarted node got everybody's state back
    assert len(new.session.peers[1].external) == 300
    for i in range(150):
        c.change(2, 30_000 + i)
    c.flush()
    c.settle(limit=30)
    assert len(c.nodes[3].session.peers[2].external) == 150


def test_on_external_change_mirrors_the_external_cache() -> None:
    """disable-external-cache mode: the hook's events replayed on a dict give the cache."""
    c = Cluster(link=LinkModel(loss=0.3, max_delay=0.02), seed=3,
                config=replace(FAST, queue_limit_bytes=3000))  # fmt: skip
    c.add(1)
    c.add(2)
    mirror: dict[bytes, bytes] = {}
    events: list[Change] = []

    def hook(node: int, change: Change, key: bytes, value: bytes | None) -> None:
        assert node == 1
        events.append(change)
        if change is Change.DESTROYED:
            del mirror[key]
        else:
            assert value is not None and change in (Change.NEW, Change.UPDATED)
            mirror[key] = value

    c.nodes[2].session.on_external_change = hook
    c.run(1)
    rng = random.Random(2)
    for burst in range(5):
        for _ in range(200):
            i = rng.randrange(300)
            if rng.random() < 0.3:
                c.destroy(1, i)
            else:
                c.change(1, i, burst)
        c.flush()
        c.run(0.1)
    c.nodes[1].internal.destroy(conn(1)[0])  # not marked dirty: only the bulk sweeps it
    c.nodes[1].session.bulk_send(c.now)
    c.settle(limit=60)
    assert mirror == dict(c.nodes[2].session.peers[1].external.items())
    assert {Change.NEW, Change.UPDATED, Change.DESTROYED} <= set(events)


def test_peer_down_after_silence_and_up_again() -> None:
    c = started(2)
    c.block(2, 1)
    c.run(FAST.peer_dead_after + 0.5)
    peer = c.nodes[1].session.peers[2]
    assert peer.verified and not peer.up
    assert c.nodes[1].session.stats.peer_down == 1
    c.unblock_all()
    c.run(2)
    assert peer.up and c.nodes[1].session.stats.peer_up == 2


def test_next_deadline_is_in_the_future_after_tick() -> None:
    c = started(2)
    for i in range(50):
        c.change(1, i)
    s = c.nodes[1].session
    assert s.next_deadline() == float("-inf")  # dirty keys: at once
    s.tick(c.now)
    deadline = s.next_deadline()
    assert deadline is not None and deadline > c.now


# --- security -----------------------------------------------------------------------------


class Tap:
    """Records every datagram a node sends (what an attacker on the link sees)."""

    def __init__(self, cluster: Cluster, node_id: int) -> None:
        self.frames: list[bytes] = []
        session = cluster.nodes[node_id].session
        original = session.datagrams_to_send

        def tapped() -> list[bytes]:
            out = original()
            self.frames.extend(out)
            return out

        session.datagrams_to_send = tapped  # type: ignore[method-assign]

    def of_type(self, mtype: MsgType) -> list[bytes]:
        return [f for f in self.frames if decoded(f).type is mtype]


def _converged_pair() -> tuple[Cluster, Tap]:
    c = Cluster()
    c.add(1)
    c.add(2)
    tap = Tap(c, 1)
    c.run(1)
    for i in range(100):
        c.change(1, i)
        c.change(2, 1000 + i)
    c.flush()
    c.settle(limit=5)
    return c, tap


def _signed(body: Any, key: bytes = KEY) -> bytes:
    raw: bytes = msgpack.packb(body, use_bin_type=True)
    return raw + Authenticator(key).sign(raw)


def _counter(c: Cluster, name: str) -> int:
    return int(getattr(c.nodes[2].session.stats, name))


def test_forged_truncated_flipped_and_random_datagrams_are_rejected() -> None:
    c, tap = _converged_pair()
    a = c.nodes[1]
    before = snapshot(c)
    destroy_all = [a.session.next_seq, 0, [], [conn(i)[0] for i in range(100)]]
    good = tap.of_type(MsgType.DATA)[-1]
    cases: list[tuple[bytes, str]] = [
        (wire.encode(Authenticator(OTHER_KEY), MsgType.DATA, 1, a.epoch, 10**6, destroy_all),
         "auth_failed"),
        (good[:-1], "auth_failed"),
        (good[:-5] + bytes(5), "auth_failed"),
        (good[:10], "malformed"),
        (b"", "malformed"),
        (bytes([good[0] ^ 0x01]) + good[1:], "auth_failed"),
        (good[:20] + bytes([good[20] ^ 0x80]) + good[21:], "auth_failed"),
        (random.Random(1).randbytes(300), "auth_failed"),
        (_signed([2, 3, 1, a.epoch, 10**6, destroy_all]), "version"),
        (_signed([1, 42, 1, a.epoch, 10**6 + 1, destroy_all]), "unknown_type"),
        (_signed([1, 3, 1, a.epoch, 10**6 + 2, [1, 0, [[b"", b""]], []]]), "malformed"),
        (_signed(b"\xc1 garbage body with a valid MAC"), "malformed"),
        (Authenticator(KEY).sign(b"x") + b"\xc1\xc1", "auth_failed"),
    ]  # fmt: skip
    for data, reason in cases:
        count = _counter(c, reason)
        c.nodes[2].session.receive(data, c.now)
        assert _counter(c, reason) == count + 1, reason
    assert snapshot(c) == before
    c.run(1)
    assert snapshot(c) == before


def test_replayed_datagrams_are_rejected() -> None:
    c, tap = _converged_pair()
    before = snapshot(c)
    data_frames = tap.of_type(MsgType.DATA)
    # 1. the same datagram twice
    replayed = _counter(c, "replayed")
    c.nodes[2].session.receive(data_frames[-1], c.now)
    assert _counter(c, "replayed") == replayed + 1
    # 2. an old datagram after newer ones, beyond the window: DATA that destroyed entries,
    #    replayed once the entries exist again, must not destroy them.
    c.destroy(1, 5)
    c.flush()
    destroy_frame = tap.frames[-1]
    assert decoded(destroy_frame).payload[3] == [conn(5)[0]]
    c.run(0.5)
    c.change(1, 5, version=2)
    for n in range(70):  # push the window beyond it
        c.change(1, 500 + n)
        c.flush()
    c.settle(limit=5)
    before = snapshot(c)
    replayed = _counter(c, "replayed")
    c.nodes[2].session.receive(destroy_frame, c.now)
    assert _counter(c, "replayed") == replayed + 1
    assert snapshot(c) == before


def test_old_epoch_datagrams_are_rejected_after_a_restart() -> None:
    c, tap = _converged_pair()
    old_frames = list(tap.frames)
    c.restart(1, c.nodes[1].epoch + 1000)
    for i in range(10):
        c.change(1, i)
    c.flush()
    c.settle(limit=10)
    before = snapshot(c)
    replayed = _counter(c, "replayed")
    for frame in old_frames:
        c.nodes[2].session.receive(frame, c.now)
    assert _counter(c, "replayed") == replayed + len(old_frames)
    assert snapshot(c) == before
    assert c.nodes[2].session.peers[1].epoch == c.nodes[1].epoch


def test_replayed_old_epoch_cannot_be_adopted_by_a_node_that_just_restarted() -> None:
    """Node 2 restarts and remembers nothing; an attacker replays node 1's old HELLOs and
    DATA while node 1's real datagrams do not reach node 2: nothing verifies, nothing lands."""
    c, tap = _converged_pair()
    old_frames = list(tap.frames)
    c.block(1, 2)
    c.restart(2, c.nodes[2].epoch + 1000)
    c.run(0.1)
    for n, frame in enumerate(old_frames):
        c.inject(2, frame, delay=0.01 * n)
    c.run(5)
    peer = c.nodes[2].session.peers[1]
    assert not peer.verified
    assert len(peer.external) == 0
    assert c.nodes[2].session.stats.unverified > 0
    c.unblock_all()
    c.settle(limit=10)  # the live epoch verifies normally afterwards


def test_node_with_a_wrong_key_injects_nothing() -> None:
    c = started(2)
    for i in range(50):
        c.change(1, i)
    c.flush()
    c.settle(limit=5)
    intruder = c.add(3, key=OTHER_KEY)
    for i in range(50):
        c.change(3, 5000 + i)
    c.flush()
    c.run(5)
    for node_id in (1, 2):
        session = c.nodes[node_id].session
        assert 3 not in session.peers
        assert session.stats.auth_failed > 0
    assert intruder.session.peers == {}  # it cannot read us either
    assert intruder.session.stats.peers_verified == 0
    assert len(c.nodes[1].session.peers[2].external) == 0  # node 2 has nothing of its own
    assert len(c.nodes[2].session.peers[1].external) == 50


def test_unverified_data_is_dropped_and_counted() -> None:
    c = Cluster()
    a, b = c.add(1), c.add(2)
    c.change(1, 1)
    a.session.tick(0.0)  # HELLO + DATA, before any handshake
    frames = a.session.datagrams_to_send()
    for frame in frames:
        b.session.receive(frame, 0.0)
    assert b.session.stats.unverified >= 1
    assert len(b.session.peers[1].external) == 0
    assert not b.session.peers[1].verified


def test_own_datagrams_are_ignored() -> None:
    c = Cluster()
    a = c.add(1)
    a.session.tick(0.0)
    for frame in a.session.datagrams_to_send():
        a.session.receive(frame, 0.0)
    assert a.session.stats.own >= 1 and a.session.peers == {}


def test_targeted_messages_for_another_node_are_ignored() -> None:
    c = started(3)
    for i in range(20):
        c.change(1, i)
    c.flush()
    c.settle(limit=5)
    s1 = c.nodes[1].session
    queued = s1.next_seq
    resyncs, repairs = s1.stats.resync_requests, s1.stats.repair_requests_received
    n3 = c.nodes[3]
    # RESYNC / ACK-with-NACK / REPAIR / GONE from 3 naming node 2: node 1 does nothing
    aimed_at_2: list[tuple[MsgType, list[Any]]] = [
        (MsgType.RESYNC, [2]),
        (MsgType.ACK, [2, c.nodes[2].epoch, 0, [[1, 5]]]),
        (MsgType.REPAIR, [2, c.nodes[2].epoch, [1, 2, 3]]),
        (MsgType.GONE, [2, c.nodes[2].epoch, 1, 5]),
    ]
    for n, (mtype, payload) in enumerate(aimed_at_2):
        s1.receive(wire.encode(Authenticator(KEY), mtype, 3, n3.epoch, 10**6 + n, payload), c.now)
    s1.tick(c.now)
    sent = [decoded(d).type for d in s1.datagrams_to_send()]
    assert MsgType.DATA not in sent and MsgType.GONE not in sent
    assert s1.next_seq == queued and s1.stats.resent == 0 and s1.stats.gone_sent == 0
    assert s1.stats.resync_requests == resyncs
    assert s1.stats.repair_requests_received == repairs


# --- robustness: authenticated nonsense from a verified peer -------------------------------

u64 = st.integers(0, (1 << 64) - 1)
small = st.integers(0, 300)
num = st.one_of(small, u64)
keys_ = st.binary(min_size=1, max_size=40)


def _payloads(
    me: int, my_epoch: int, peer_epoch: int
) -> st.SearchStrategy[tuple[MsgType, list[Any]]]:
    target = st.sampled_from([me, 2, 3, 0])
    epoch = st.sampled_from([my_epoch, my_epoch - 1, peer_epoch, 0])
    hello = st.tuples(
        st.binary(min_size=0, max_size=20),
        st.lists(st.tuples(num, num, st.binary(max_size=17)).map(list), max_size=3),
        st.dictionaries(
            st.sampled_from(["next_seq", "mtu", "want", "x"]),
            st.one_of(num, st.text(max_size=3), st.lists(num, max_size=3)),
        ),
    ).map(list)
    data = st.tuples(
        num,
        st.integers(0, 15),
        st.lists(st.tuples(keys_, st.binary(max_size=40)).map(list), max_size=4),
        st.lists(keys_, max_size=4),
    ).map(list)
    repair_data = st.tuples(
        num,
        st.integers(0, 15).map(lambda f: f | DATA_REPAIR),
        st.lists(st.tuples(keys_, st.binary(max_size=40)).map(list), max_size=4),
        st.lists(st.integers(0, 0xFFFFFFFF), max_size=4),
    ).map(list)
    ranges = st.lists(st.tuples(num, num).map(list), max_size=4)
    return st.one_of(
        hello.map(lambda p: (MsgType.HELLO, p)),
        st.tuples(num).map(lambda p: (MsgType.ALIVE, list(p))),
        data.map(lambda p: (MsgType.DATA, p)),
        repair_data.map(lambda p: (MsgType.DATA, p)),
        st.tuples(target, epoch, num, ranges).map(lambda p: (MsgType.ACK, list(p))),
        st.tuples(target).map(lambda p: (MsgType.RESYNC, list(p))),
        st.tuples(num, st.lists(st.integers(0, 0xFFFFFFFF), min_size=250, max_size=256)).map(
            lambda p: (MsgType.DIGEST, list(p))
        ),
        st.tuples(target, epoch, st.lists(st.integers(0, 0xFFFFFFFF), max_size=5)).map(
            lambda p: (MsgType.REPAIR, list(p))
        ),
        st.tuples(target, epoch, num, num).map(lambda p: (MsgType.GONE, list(p))),
    )


@settings(SIM, max_examples=40)
@given(st.data())
def test_authenticated_nonsense_from_a_verified_peer_never_crashes(data: st.DataObject) -> None:
    c = started(2)
    for i in range(20):
        c.change(1, i)
    c.flush()
    c.settle(limit=5)
    me, peer = c.nodes[1], c.nodes[2]
    auth = Authenticator(KEY)
    messages = data.draw(st.lists(_payloads(1, me.epoch, peer.epoch), min_size=1, max_size=12))
    for n, (mtype, payload) in enumerate(messages):
        frame = wire.encode(auth, mtype, 2, peer.epoch, 10**9 + n, payload)
        me.session.receive(frame, c.now)
        me.session.tick(c.now)
        c.now += 0.01
    me.session.datagrams_to_send()
    me.session.tick(c.now + 5)
    assert isinstance(me.session.datagrams_to_send(), list)
    assert me.session.next_deadline() is not None


def test_core_sync_is_pure() -> None:
    """No asyncio, sockets, clock, randomness or files in ctsync/core/sync."""
    banned = {"asyncio", "socket", "time", "random", "os", "secrets", "selectors", "io"}
    paths = list(Path(sync_pkg.__file__).parent.glob("*.py"))
    assert len(paths) >= 2
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            assert not set(names) & banned, f"{path}: imports {names}"
        assert "open(" not in path.read_text()


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SessionConfig(ack_interval=0)
    with pytest.raises(ValueError):
        SessionConfig(max_datagram=100)
    with pytest.raises(ValueError):
        SyncSession(0, 1, Authenticator(KEY), Cache("i", digest=True), FAST, bytes)
