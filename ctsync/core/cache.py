"""Internal and external conntrack caches.

The internal cache mirrors the local kernel table (fed by events and dumps); an external
cache holds what one peer node told us. Both map record keys to record values (see
``ctsync.core.record``) and keep conntrackd's per-cache counters, which ``show statistics``
prints as ``cache internal`` / ``cache external``.

Reconciliation after lost events is mark-and-sweep: :meth:`Cache.begin_reconcile`, feed the
dump (and any events that arrive meanwhile) through the normal update path, then
:meth:`Cache.end_reconcile` destroys whatever was neither dumped nor touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from ctsync.core import record
from ctsync.core.entry import Entry
from ctsync.core.filter import ACCEPT_ALL, EntryFilter


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

    def __init__(self, name: str, entry_filter: EntryFilter = ACCEPT_ALL, limit: int = 0) -> None:
        self.name = name
        self.filter = entry_filter
        self.limit = limit
        self.counters = CacheCounters()
        self._filtering = not entry_filter.accepts_all
        self._entries: dict[bytes, bytes] = {}
        self._seen: set[bytes] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> bytes | None:
        return self._entries.get(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self._entries.items()))

    def keys(self) -> list[bytes]:
        return list(self._entries)

    def entries(self) -> Iterator[Entry]:
        for key, value in self.items():
            yield record.to_entry(key, value)

    # --- the event path ---------------------------------------------------------------

    def update(self, parts: record.Parsed) -> Change:
        """Apply a NEW/UPDATE event or a dumped entry (the tuple ``record.parse_ct`` gives)."""
        key = parts[0]
        entries = self._entries
        old = entries.get(key)
        if self._seen is not None:
            self._seen.add(key)
        if old is None:
            value = record.value_from_parts(parts)
            if self._filtering and not self.filter.accepts(key, value):
                self.counters.filtered += 1
                return Change.IGNORED
            if self.limit and len(entries) >= self.limit:
                self.counters.created_failed += 1
                return Change.FAILED
            entries[key] = value
            self.counters.created += 1
            return Change.NEW
        value = record.merge_value(old, parts)
        if value == old:
            return Change.UNCHANGED
        if self._filtering and not self.filter.accepts(key, value):
            # conntrackd ignores updates its filter rejects; the entry keeps its last state.
            self.counters.filtered += 1
            return Change.IGNORED
        entries[key] = value
        self.counters.updated += 1
        return Change.UPDATED

    def destroy(self, key: bytes) -> Change:
        if self._seen is not None:
            self._seen.discard(key)
        if self._entries.pop(key, None) is None:
            self.counters.destroyed_failed += 1
            return Change.IGNORED
        self.counters.destroyed += 1
        return Change.DESTROYED

    def put(self, key: bytes, value: bytes) -> Change:
        """Store a whole record (from a peer, or a test); filters do not apply."""
        old = self._entries.get(key)
        if old is None:
            if self.limit and len(self._entries) >= self.limit:
                self.counters.created_failed += 1
                return Change.FAILED
            self._entries[key] = value
            self.counters.created += 1
            return Change.NEW
        if old == value:
            return Change.UNCHANGED
        self._entries[key] = value
        self.counters.updated += 1
        return Change.UPDATED

    def clear(self) -> int:
        """Flush the cache; returns how many entries it held. Counters are kept."""
        count = len(self._entries)
        self._entries.clear()
        return count

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
            del entries[key]
        self.counters.destroyed += len(gone)
        self.counters.reconciled_removed += len(gone)
        return gone

    def abort_reconcile(self) -> None:
        self._seen = None
