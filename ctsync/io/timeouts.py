"""Set the timeout of many kernel entries at once: the purge a node runs on leaving MASTER."""

from __future__ import annotations

import errno
import itertools
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from ctsync.core import ctnetlink as nl
from ctsync.core.commit import timeout_message
from ctsync.core.ctnetlink import CtnetlinkError
from ctsync.io.netlink import open_socket

_BATCH = 256
_RECV_SIZE = 1 << 16


@dataclass
class PurgeResult:
    updated: int = 0
    gone: int = 0  # expired or deleted meanwhile: nothing to purge
    failed: int = 0


def set_timeouts(keys: Iterable[bytes], timeout: int) -> PurgeResult:
    """Give each entry ``timeout`` seconds (it expires then unless traffic refreshes it)."""
    result = PurgeResult()
    seqs = itertools.count(1)
    buf = bytearray(_RECV_SIZE)
    with open_socket(rcvbuf=4 << 20) as sock:
        batch: list[bytes] = []
        for key in keys:
            try:
                batch.append(timeout_message(key, next(seqs), timeout))
            except CtnetlinkError:
                result.failed += 1
                continue
            if len(batch) >= _BATCH:
                _ship(sock, batch, buf, result)
                batch = []
        if batch:
            _ship(sock, batch, buf, result)
    return result


def _ship(sock: socket.socket, batch: list[bytes], buf: bytearray, result: PurgeResult) -> None:
    sock.sendmsg(batch)
    pending = len(batch)  # every message asks for an ACK: one answer each
    while pending:
        n = sock.recv_into(buf)
        for mtype, _flags, _seq, _pid, start, end in nl.iter_messages(buf, n):
            if mtype != nl.NLMSG_ERROR:
                continue
            pending -= 1
            err, _ = nl.decode_error(buf, start, end)
            if not err:
                result.updated += 1
            elif err == errno.ENOENT:
                result.gone += 1
            else:
                result.failed += 1
