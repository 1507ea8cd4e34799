"""Internal/external cache behaviour: merge of partial updates, counters, reconcile."""

from __future__ import annotations

from ctsync.core import ctnetlink as nl
from ctsync.core import record
from ctsync.core.cache import DIGEST_BUCKETS, Cache, Change, bucket_of
from ctsync.core.entry import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    Entry,
    Status,
    TcpInfo,
    TcpState,
    bits_to_labels,
    make_tuple,
)
from ctsync.core.filter import EntryFilter


def event(entry: Entry) -> record.Parsed:
    """The record parts of a CT_NEW message carrying ``entry``'s attributes."""
    body = nl.encode_entry_attrs(entry)
    return record.parse_ct(body, 0, len(body))


def tcp(sport: int = 40000, state: int = TcpState.ESTABLISHED, **kw: object) -> Entry:
    fields: dict[str, object] = {
        "status": int(Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED),
        "timeout": 431999,
        "mark": 0,
        "id": 7,
        "protoinfo": TcpInfo(state, 7, 7, 0x23, 0, 0x23, 0),
    }
    fields.update(kw)
    orig = make_tuple("192.0.2.2", "203.0.113.80", IPPROTO_TCP, sport, 443)
    return Entry(orig, orig.inverted(), **fields)  # type: ignore[arg-type]


def test_new_then_partial_update_merges_fields() -> None:
    cache = Cache("internal")
    assert cache.update(event(tcp(mark=5, labels=bits_to_labels([3])))) is Change.NEW
    # An UPDATE that carries no mark, labels nor protoinfo keeps them.
    status = (tcp().status or 0) | Status.FIXED_TIMEOUT
    partial = Entry(tcp().orig, tcp().reply, status=status, timeout=120, id=7)
    assert cache.update(event(partial)) is Change.UPDATED
    (entry,) = list(cache.entries())
    assert entry.timeout == 120
    assert entry.mark == 5
    assert entry.label_bits() == [3]
    assert isinstance(entry.protoinfo, TcpInfo)
    assert entry.protoinfo.state == TcpState.ESTABLISHED
    assert cache.counters.created == 1
    assert cache.counters.updated == 1


def test_identical_update_is_unchanged_and_not_counted() -> None:
    cache = Cache("internal")
    cache.update(event(tcp()))
    assert cache.update(event(tcp())) is Change.UNCHANGED
    assert cache.counters.updated == 0


def test_nat_reply_survives_updates() -> None:
    cache = Cache("internal")
    orig = make_tuple("192.0.2.2", "203.0.113.10", IPPROTO_TCP, 40000, 80)
    reply = make_tuple("198.51.100.2", "198.51.100.1", IPPROTO_TCP, 8080, 31001)
    nat_status = int(Status.CONFIRMED | Status.SRC_NAT | Status.DST_NAT | Status.SEEN_REPLY)
    cache.update(event(Entry(orig, reply, status=nat_status, timeout=60, id=1)))
    cache.update(event(Entry(orig, reply, status=nat_status | Status.ASSURED, timeout=90, id=1)))
    (entry,) = list(cache.entries())
    assert entry.reply == reply
    assert entry.status == nat_status | Status.ASSURED


def test_destroy_counts_and_unknown_destroy_fails() -> None:
    cache = Cache("internal")
    parts = event(tcp())
    cache.update(parts)
    assert cache.destroy(parts[0]) is Change.DESTROYED
    assert cache.destroy(parts[0]) is Change.IGNORED
    assert len(cache) == 0
    assert cache.counters.destroyed == 1
    assert cache.counters.destroyed_failed == 1


def test_limit_refuses_and_counts() -> None:
    cache = Cache("external", limit=2)
    for port in (1, 2, 3):
        cache.update(event(tcp(sport=port)))
    assert len(cache) == 2
    assert cache.counters.created == 2
    assert cache.counters.created_failed == 1


def test_filter_drops_new_entries_and_ignores_rejected_updates() -> None:
    only_established = EntryFilter.build(tcp_states=["ESTABLISHED"])
    cache = Cache("internal", only_established)
    assert cache.update(event(tcp(sport=1, state=TcpState.SYN_SENT))) is Change.IGNORED
    assert cache.update(event(tcp(sport=2))) is Change.NEW
    # Moving to a state the filter rejects: conntrackd keeps the last accepted state.
    assert cache.update(event(tcp(sport=2, state=TcpState.FIN_WAIT))) is Change.IGNORED
    (entry,) = list(cache.entries())
    assert isinstance(entry.protoinfo, TcpInfo)
    assert entry.protoinfo.state == TcpState.ESTABLISHED
    assert cache.counters.filtered == 2


def test_reconcile_sweeps_what_the_dump_did_not_show() -> None:
    cache = Cache("internal")
    kept, gone, touched = event(tcp(sport=1)), event(tcp(sport=2)), event(tcp(sport=3))
    for parts in (kept, gone, touched):
        cache.update(parts)
    cache.begin_reconcile()
    cache.update(kept)  # dumped
    cache.update(event(tcp(sport=3, timeout=5)))  # an event during the dump counts as seen
    fresh = event(tcp(sport=4))
    cache.update(fresh)  # created during the dump
    removed = cache.end_reconcile()
    assert removed == [gone[0]]
    assert set(cache.keys()) == {kept[0], touched[0], fresh[0]}
    assert cache.counters.reconciled_removed == 1
    assert not cache.reconciling


def test_destroy_during_reconcile_is_not_resurrected() -> None:
    cache = Cache("internal")
    parts = event(tcp(sport=1))
    cache.update(parts)
    cache.begin_reconcile()
    cache.update(parts)
    cache.destroy(parts[0])
    assert cache.end_reconcile() == []
    assert len(cache) == 0


def test_put_stores_whole_records_without_filtering() -> None:
    cache = Cache("external", EntryFilter.build(accept_protocols=["udp"]))
    key, value = record.from_entry(tcp())
    assert cache.put(key, value) is Change.NEW
    assert cache.put(key, value) is Change.UNCHANGED
    assert record.key_proto(key) == IPPROTO_TCP != IPPROTO_UDP
    assert cache.clear() == 1


def test_digest_is_order_independent_and_tracks_every_change() -> None:
    a = Cache("a", digest=True)
    b = Cache("b", digest=True)
    parts = [event(tcp(sport=p, mark=p)) for p in range(1, 50)]
    for p in parts:
        a.update(p)
    for p in reversed(parts):
        b.put(p[0], record.value_from_parts(p))
    assert a.digest == b.digest
    a.update(event(tcp(sport=7, mark=1000)))
    assert a.digest != b.digest
    b.put(*record.from_entry(record.to_entry(parts[6][0], a.get(parts[6][0]) or b"")))
    assert a.digest == b.digest
    a.destroy(parts[0][0])
    b.clear_buckets([bucket_of(parts[0][0])])
    for key, value in a.bucket_items([bucket_of(parts[0][0])]):
        b.put(key, value)
    assert a.digest == b.digest
    b.clear()
    assert b.digest == [0] * DIGEST_BUCKETS


def test_a_timeout_only_change_is_not_news() -> None:
    """A dump shows every entry with a smaller timeout than its last event did: keeping
    the cached record avoids re-sending the whole table after each reconcile."""
    cache = Cache("internal", digest=True)
    cache.update(event(tcp(timeout=431999)))
    digest = list(cache.digest or [])
    assert cache.update(event(tcp(timeout=431000))) is Change.UNCHANGED
    assert cache.digest == digest
    (entry,) = list(cache.entries())
    assert entry.timeout == 431999
    assert cache.update(event(tcp(timeout=120, mark=3))) is Change.UPDATED
    assert next(iter(cache.entries())).timeout == 120


def test_digest_equals_a_recount_after_any_mix_of_changes() -> None:
    """The event path computes the digest inline: it must stay the XOR of
    ``entry_checksum`` per bucket, exactly (peers compare it with their own)."""
    import random

    from ctsync.core.cache import entry_checksum

    rng = random.Random(7)
    cache = Cache("internal", digest=True)
    for _ in range(3000):
        sport = rng.randrange(1, 200)
        op = rng.random()
        if op < 0.5:
            cache.update(event(tcp(sport=sport, mark=rng.randrange(4))))
        elif op < 0.6:
            cache.update(event(tcp(sport=sport, state=TcpState.TIME_WAIT, mark=1)))
        elif op < 0.85:
            cache.destroy(event(tcp(sport=sport))[0])
        else:
            cache.put(*record.from_entry(tcp(sport=sport, mark=rng.randrange(4), id=9)))
    recount = [0] * DIGEST_BUCKETS
    for key, value in cache.items():
        recount[bucket_of(key)] ^= entry_checksum(key, value)
    assert len(cache) > 50
    assert cache.digest == recount


def test_getter_reads_the_live_entries_across_clears() -> None:
    cache = Cache("internal")
    get = cache.getter()
    parts = event(tcp())
    assert get(parts[0]) is None
    cache.update(parts)
    assert get(parts[0]) == cache.get(parts[0]) is not None
    cache.clear()
    assert get(parts[0]) is None
    cache.update(parts)
    assert get(parts[0]) == cache.get(parts[0])
