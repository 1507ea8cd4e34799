"""Read keepalived's notify FIFO (``global_defs { notify_fifo PATH }``).

keepalived writes one line per state change, in order (``INSTANCE "VI_1" MASTER 100``,
``GROUP "G1" BACKUP 0``); unlike notify scripts, which it does not wait for and which can
finish out of order, the FIFO keeps the sequence. The FIFO is opened read-write so that
it always has a writer: a keepalived restart (its end closing) is then not an endless
end-of-file, and opening never blocks. Reading is non-blocking from the event loop; a
line longer than any keepalived writes is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("ctsync.fifo")

_MAX_LINE = 4096


class NotifyFifo:
    def __init__(self, path: Path, on_line: Callable[[str], None]) -> None:
        self.path = path
        self.on_line = on_line
        self.lines = 0
        self.dropped = 0
        self._fd: int | None = None
        self._partial = b""

    def open(self) -> None:
        """Create the FIFO (root-only) unless it exists, and start reading it."""
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.mkfifo(self.path, 0o600)
        else:
            if not stat.S_ISFIFO(mode):
                raise OSError(f"{self.path} exists and is not a FIFO")
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        asyncio.get_running_loop().add_reader(self._fd, self._readable)
        log.info("reading keepalived notifications from %s", self.path)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def _readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("reading %s: %s", self.path, exc)
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > _MAX_LINE:
            self._partial = b""
            self.dropped += 1
        for raw in lines:
            self.lines += 1
            try:
                line = raw.decode()
            except UnicodeDecodeError:
                self.dropped += 1
                continue
            self.on_line(line)
