"""A commit that uses two cores: this process and a worker forked at start.

Committing 100k entries is about 2 us of Python (building each CT_NEW) plus 2 us in the
kernel per entry; threads cannot overlap the Python half (the GIL), a second process can.
The worker is forked when the pool is created — the agent does it first thing, while it is
still single-threaded — and then sleeps on a pipe. A commit sends it half of the records
(pickled: a private pipe to our own child, never outside input), inserts the other half
itself, and adds up both results. If the worker is gone, the commit runs in one process.

Expectation records (``ctsync.core.expect``) need their master entries in the table: both
halves set them aside, and this process commits them once both halves are in.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import pickle
import signal
import struct
from collections.abc import Iterable

from ctsync.io.netlink import CommitResult, Committer

log = logging.getLogger("ctsync.netlink")

_LEN = struct.Struct("=Q")
_PR_SET_PDEATHSIG = 1
# Below this many records one process is as fast (the hand-off costs ~1 ms).
MIN_SPLIT = 2048
# Records per hand-off frame to the worker (~110 KB pickled; the pipe is enlarged to hold
# several, so that our writes do not wait for the worker while it commits).
CHUNK = 4096
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20


def _write_frame(fd: int, payload: bytes) -> None:
    view = memoryview(_LEN.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> bytes | None:
    head = _read_exact(fd, _LEN.size)
    if head is None:
        return None
    return _read_exact(fd, _LEN.unpack(head)[0])


def _worker_main(requests: int, replies: int, batch: int) -> None:
    """The child: commit what the parent sends until the pipe closes. Never returns."""
    status = 0
    try:
        # Die with the parent; leave signals to it (the parent's handlers are asyncio's).
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        committer = Committer(batch=batch)
        total: CommitResult | None = None
        while (frame := _read_frame(requests)) is not None:
            records, timeout, last = pickle.loads(frame)
            result = committer.commit_records(records, timeout, expectations=False)
            total = result if total is None else _chain(total, result)
            if last:
                _write_frame(replies, pickle.dumps(total))
                total = None
    except BaseException:  # the child must never return into the caller's code
        status = 1
    finally:
        os._exit(status)


class CommitPool:
    """``commit_records`` like :class:`Committer`, split across two processes."""

    def __init__(self, batch: int = 256, *, workers: bool = True) -> None:
        self.local = Committer(batch=batch)
        self.portid = self.local.portid
        self.worker_pid: int | None = None
        self.worker_portid: int | None = None
        self._requests = self._replies = -1
        if workers and (os.cpu_count() or 1) > 1:
            self._fork(batch)

    def _fork(self, batch: int) -> None:
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        with contextlib.suppress(OSError):  # up to /proc/sys/fs/pipe-max-size (1 MiB)
            fcntl.fcntl(to_child_w, _F_SETPIPE_SZ, _PIPE_SIZE)
        pid = os.fork()
        if pid == 0:  # child
            os.close(to_child_w)
            os.close(to_parent_r)
            _worker_main(to_child_r, to_parent_w, batch)
        os.close(to_child_r)
        os.close(to_parent_w)
        self.worker_pid, self._requests, self._replies = pid, to_child_w, to_parent_r

    @property
    def portids(self) -> list[int]:
        """Port ids whose events are our own writes (the worker's is not known in advance:
        its events are the ones a commit pauses anyway)."""
        return [self.portid]

    def commit_records(
        self, records: Iterable[tuple[bytes, bytes]], timeout: int | None = None
    ) -> CommitResult:
        items = records if isinstance(records, list) else list(records)
        if self.worker_pid is None or len(items) < MIN_SPLIT:
            return self.local.commit_records(items, timeout)
        half = len(items) // 2
        # The worker's half goes in chunks, each sent between two of our own, so that the
        # worker starts after one small chunk instead of after the whole half is pickled
        # (~20 ms per 50k records, when the kernel would otherwise sit idle).
        theirs_chunks = [items[i : i + CHUNK] for i in range(half, len(items), CHUNK)]
        mine_chunks = [items[i : min(i + CHUNK, half)] for i in range(0, half, CHUNK)]
        mine = CommitResult()
        theirs: CommitResult | None = None
        for index in range(max(len(theirs_chunks), len(mine_chunks))):
            if index < len(theirs_chunks):
                chunk = (theirs_chunks[index], timeout, index == len(theirs_chunks) - 1)
                try:
                    _write_frame(self._requests, pickle.dumps(chunk, protocol=5))
                except OSError as exc:
                    self._lost_worker(f"cannot reach the commit worker: {exc}")
                    # Ours not done yet, and all of the worker's (committing a record
                    # twice is an update): in this process.
                    rest = [r for c in mine_chunks[index:] for r in c] + items[half:]
                    done = self.local.commit_records(rest, timeout, expectations=False)
                    mine, theirs = _chain(mine, done), CommitResult()
                    break
            if index < len(mine_chunks):
                done = self.local.commit_records(mine_chunks[index], timeout, expectations=False)
                mine = _chain(mine, done)
        if theirs is None:
            frame = _read_frame(self._replies)
            if frame is None:
                self._lost_worker("the commit worker died during a commit")
                theirs = self.local.commit_records(items[half:], timeout, expectations=False)
            else:
                theirs = pickle.loads(frame)
        total = _add(mine, theirs)
        deferred = mine.deferred + theirs.deferred
        if deferred:  # after every master, whichever process committed it
            total.add_expectations(self.local.commit_expectations(deferred))
        return total

    def _lost_worker(self, why: str) -> None:
        log.error("%s; committing in one process from now on", why)
        self.close_worker()

    def close_worker(self) -> None:
        if self.worker_pid is None:
            return
        for fd in (self._requests, self._replies):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.worker_pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.worker_pid, 0)
        self.worker_pid = None

    def close(self) -> None:
        self.close_worker()
        self.local.close()

    def __enter__(self) -> CommitPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _add(a: CommitResult, b: CommitResult) -> CommitResult:
    total = CommitResult(
        attempted=a.attempted + b.attempted,
        committed=a.committed + b.committed,
        failed=a.failed + b.failed,
        retried_as_update=a.retried_as_update + b.retried_as_update,
        seconds=max(a.seconds, b.seconds),
        expect_attempted=a.expect_attempted + b.expect_attempted,
        expect_committed=a.expect_committed + b.expect_committed,
        expect_failed=a.expect_failed + b.expect_failed,
    )
    total.errors = a.errors + b.errors
    return total


def _chain(a: CommitResult, b: CommitResult) -> CommitResult:
    """Two commits one after the other in one process: times add up."""
    total = _add(a, b)
    total.seconds = a.seconds + b.seconds
    total.deferred = a.deferred + b.deferred
    return total
