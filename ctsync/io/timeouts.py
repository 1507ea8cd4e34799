"""Set the timeout of many kernel entries at once: the purge a node runs on leaving MASTER."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ctsync.io.netlink import Committer


@dataclass
class PurgeResult:
    updated: int = 0
    gone: int = 0  # expired or deleted meanwhile: nothing to purge
    failed: int = 0


def set_timeouts(keys: Iterable[bytes], timeout: int) -> PurgeResult:
    """Give each entry ``timeout`` seconds (it expires then unless traffic refreshes it)."""
    with Committer() as committer:
        result = committer.set_timeouts(keys, timeout)
    gone = result.errors["ENOENT"]
    return PurgeResult(updated=result.committed, gone=gone, failed=result.failed - gone)
