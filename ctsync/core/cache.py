"""Internal and external conntrack caches.

Caches hold expectation records too (``ctsync.core.expect``: a key kind conntrack keys
never use), so that the sync session, its resends, full transfers and digests carry them
unchanged. They enter through :meth:`Cache.update_expectation` (the conntrack filter does
not apply: the reader filters them by helper and master) and leave through the ordinary
:meth:`Cache.destroy`; :meth:`Cache.entries` yields conntrack entries only.

The internal cache mirrors the local kernel table (fed by events and dumps); an external
cache holds what one peer node told us. Both map record keys to record values (see
``ctsync.core.record``) and keep conntrackd's per-cache counters, which ``show statistics``
prints as ``cache internal`` / ``cache external``.

Reconciliation after lost events is mark-and-sweep: :meth:`Cache.begin_reconcile`, feed the
dump (and any events that arrive meanwhile) through the normal update path, then
:meth:`Cache.end_reconcile` destroys whatever was neither dumped nor touched.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

from ctsync.core import expect, record
from ctsync.core.entry import Entry
from ctsync.core.filter import ACCEPT_ALL, EntryFilter

DIGEST_BUCKETS = 256
_ALL_FIXED = record.P_ALL_FIXED
_VAL_RARE = record.VAL_RARE
_BUCKET_MASK = DIGEST_BUCKETS - 1
_crc32 = zlib.crc32
_value_from_parts = record.value_from_parts


def bucket_of(key: bytes) -> int:
    """The anti-entropy bucket of a record key (see docs/wire-protocol.md)."""
    return _crc32(key) & (DIGEST_BUCKETS - 1)


def _mix32(x: int) -> int:
    """A 32-bit finaliser (MurmurHash3's fmix32). CRC is linear, so XOR-ing raw CRCs
    lets two entries that missed the same change cancel out; mixed values do not."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def entry_checksum(key: bytes, value: bytes) -> int:
    return _mix32(_crc32(value, _crc32(key)))


class Change(IntEnum):
    """What an update did to the cache (the sync layer forwards NEW/UPDATED/DESTROYED)."""

    IGNORED = 0
    NEW = 1
    UPDATED = 2
    DESTROYED = 3
    UNCHANGED = 4
    FAILED = 5


@dataclass
class CacheCounters:
    """conntrackd's ``cache internal|external`` counters, plus what the filter dropped."""

    created: int = 0
    created_failed: int = 0
    updated: int = 0
    updated_failed: int = 0
    destroyed: int = 0
    destroyed_failed: int = 0
    filtered: int = 0
    reconciled_removed: int = 0


class Cache:
    """A conntrack cache: record key -> record value, with filter and counters.

    ``limit`` bounds the number of entries (0 = unbounded); an insert past it fails and is
    counted, as conntrackd's HashLimit does.
    """

    def __init__(
        self,
        name: str,
        entry_filter: EntryFilter = ACCEPT_ALL,
        limit: int = 0,
        *,
        digest: bool = False,
    ) -> None:
        self.name = name
        self.filter = entry_filter
        self.limit = limit
        self.counters = CacheCounters()
        self._filtering = not entry_filter.accepts_all
        # Keys never to take (entries we injected from a peer: disable-external-cache).
        self.exclude: set[bytes] = set()
        self._entries: dict[bytes, bytes] = {}
        self._seen: set[bytes] | None = None
        # Anti-entropy digest, kept incrementally: XOR of entry checksums per bucket.
        self.digest: list[int] | None = [0] * DIGEST_BUCKETS if digest else None

    def _digest_swap(self, key: bytes, old: bytes | None, new: bytes | None) -> None:
        digest = self.digest
        if digest is None:
            return
        kc = _crc32(key)
        delta = 0
        if old is not None:
            delta = _mix32(_crc32(old, kc))
        if new is not None:
            delta ^= _mix32(_crc32(new, kc))
        digest[kc & _BUCKET_MASK] ^= delta

    def set_filter(self, entry_filter: EntryFilter) -> None:
        """Apply a new filter to what comes next (entries already cached stay)."""
        self.filter = entry_filter
        self._filtering = not entry_filter.accepts_all

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> bytes | None:
        return self._entries.get(key)

    def getter(self) -> Callable[[bytes], bytes | None]:
        """:meth:`get` without the method call (the sender's per-key loop): valid for the
        cache's whole life, clears included (the mapping object is never replaced)."""
        return self._entries.get

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self._entries.items()))

    def keys(self) -> list[bytes]:
        return list(self._entries)

    def entries(self) -> Iterator[Entry]:
        """The conntrack entries (expectation records are skipped)."""
        for key, value in self.items():
            if not expect.is_expectation_key(key):
                yield record.to_entry(key, value)

    def expectation_items(self) -> list[tuple[bytes, bytes]]:
        """The expectation records (a scan of the whole cache: for commands, not events)."""
        is_exp = expect.is_expectation_key
        return [(k, v) for k, v in self._entries.items() if is_exp(k)]

    def count_expectations(self) -> int:
        """How many records are expectations (a scan, as :meth:`expectation_items`)."""
        is_exp = expect.is_expectation_key
        return sum(1 for k in self._entries if is_exp(k))

    # --- the event path ---------------------------------------------------------------

    def update(self, parts: record.Parsed) -> Change:
        """Apply a NEW/UPDATE event or a dumped entry (the tuple ``record.parse_ct`` gives)."""
        # The hot path of every kernel event: the digest swap is inlined (same arithmetic
        # as _digest_swap) and globals are bound locally; it runs 100k+ times a second.
        key = parts[0]
        entries = self._entries
        old = entries.get(key)
        if self._seen is not None:
            self._seen.add(key)
        if old is None:
            if self.exclude and key in self.exclude:
                return Change.IGNORED
            value = _value_from_parts(parts)
            if self._filtering and not self.filter.accepts(key, value):
                self.counters.filtered += 1
                return Change.IGNORED
            if self.limit and len(entries) >= self.limit:
                self.counters.created_failed += 1
                return Change.FAILED
            entries[key] = value
            digest = self.digest
            if digest is not None:
                kc = _crc32(key)
                x = _crc32(value, kc)
                x ^= x >> 16
                x = (x * 0x85EBCA6B) & 0xFFFFFFFF
                x ^= x >> 13
                x = (x * 0xC2B2AE35) & 0xFFFFFFFF
                digest[kc & _BUCKET_MASK] ^= x ^ (x >> 16)
            self.counters.created += 1
            return Change.NEW
        if parts[1] == _ALL_FIXED and not old[0] & _VAL_RARE:
            value = _value_from_parts(parts)  # complete: nothing to merge from old
        else:
            value = record.merge_value(old, parts)
        if value == old or (value[:5] == old[:5] and value[9:] == old[9:]):
            # Only the timeout differs: it counts down in the kernel, and a dump always
            # shows a smaller one. Not news: keep the cached record (and the digest) as is.
            return Change.UNCHANGED
        if self._filtering and not self.filter.accepts(key, value):
            # conntrackd ignores updates its filter rejects; the entry keeps its last state.
            self.counters.filtered += 1
            return Change.IGNORED
        entries[key] = value
        if self.digest is not None:
            self._digest_swap(key, old, value)
        self.counters.updated += 1
        return Change.UPDATED

    def update_expectation(self, key: bytes, value: bytes) -> Change:
        """Apply an expectation record read from the kernel (EXP_NEW event or dump).

        Like :meth:`update` for a complete record: excluded keys, the limit, reconcile
        marks, the digest and the counters apply; a record that only counted down its
        timeout is UNCHANGED. The conntrack filter does not apply (see the module doc)."""
        entries = self._entries
        if self._seen is not None:
            self._seen.add(key)
        old = entries.get(key)
        if old is None:
            if self.exclude and key in self.exclude:
                return Change.IGNORED
            if self.limit and len(entries) >= self.limit:
                self.counters.created_failed += 1
                return Change.FAILED
            entries[key] = value
            self._digest_swap(key, None, value)
            self.counters.created += 1
            return Change.NEW
        if expect.same_but_timeout(old, value):
            return Change.UNCHANGED
        entries[key] = value
        self._digest_swap(key, old, value)
        self.counters.updated += 1
        return Change.UPDATED

    def destroy(self, key: bytes) -> Change:
        if self._seen is not None:
            self._seen.discard(key)
        old = self._entries.pop(key, None)
        if old is None:
            if key not in self.exclude:  # an injected entry's end is not a failure
                self.counters.destroyed_failed += 1
            return Change.IGNORED
        digest = self.digest
        if digest is not None:  # _digest_swap(key, old, None), inlined: the event path
            kc = _crc32(key)
            x = _crc32(old, kc)
            x ^= x >> 16
            x = (x * 0x85EBCA6B) & 0xFFFFFFFF
            x ^= x >> 13
            x = (x * 0xC2B2AE35) & 0xFFFFFFFF
            digest[kc & _BUCKET_MASK] ^= x ^ (x >> 16)
        self.counters.destroyed += 1
        return Change.DESTROYED

    def put(self, key: bytes, value: bytes) -> Change:
        """Store a whole record (from a peer, or a test); filters do not apply."""
        if self._seen is not None:
            self._seen.add(key)
        old = self._entries.get(key)
        if old is None:
            if self.limit and len(self._entries) >= self.limit:
                self.counters.created_failed += 1
                return Change.FAILED
            self._entries[key] = value
            self._digest_swap(key, None, value)
            self.counters.created += 1
            return Change.NEW
        if old == value:
            return Change.UNCHANGED
        self._entries[key] = value
        self._digest_swap(key, old, value)
        self.counters.updated += 1
        return Change.UPDATED

    def clear(self) -> int:
        """Flush the cache; returns how many entries it held. Counters are kept."""
        count = len(self._entries)
        self._entries.clear()
        if self.digest is not None:
            self.digest = [0] * DIGEST_BUCKETS
        return count

    def bucket_items(self, buckets: Iterable[int]) -> list[tuple[bytes, bytes]]:
        """Every (key, value) whose digest bucket is in ``buckets``."""
        wanted = set(buckets)
        return [(k, v) for k, v in self._entries.items() if bucket_of(k) in wanted]

    def clear_buckets(self, buckets: Iterable[int]) -> int:
        """Remove every entry of these buckets (a repair replaces them); returns how many."""
        doomed = self.bucket_items(buckets)
        for key, value in doomed:
            del self._entries[key]
            self._digest_swap(key, value, None)
            if self._seen is not None:
                self._seen.discard(key)
        self.counters.destroyed += len(doomed)
        return len(doomed)

    # --- reconciliation ---------------------------------------------------------------

    @property
    def reconciling(self) -> bool:
        return self._seen is not None

    def begin_reconcile(self) -> None:
        self._seen = set()

    def end_reconcile(self) -> list[bytes]:
        """Destroy every entry neither dumped nor updated since begin; returns their keys."""
        seen = self._seen
        self._seen = None
        if seen is None:
            return []
        entries = self._entries
        gone = [key for key in entries if key not in seen]
        for key in gone:
            self._digest_swap(key, entries.pop(key), None)
        self.counters.destroyed += len(gone)
        self.counters.reconciled_removed += len(gone)
        return gone

    def abort_reconcile(self) -> None:
        self._seen = None
