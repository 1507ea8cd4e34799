"""The control socket: how ``ctsync`` CLI commands talk to the running agent.

conntrackd's model (a UNIX stream socket, one request per connection, reply, close) with a
JSON body instead of a native-endian int and plain text:

- request: one JSON object ``{"command": "...", "args": {...}}`` and a newline (EOF ends a
  request too), at most :data:`MAX_REQUEST` bytes;
- reply: one JSON object, ``{"ok": true, "result": ...}`` or
  ``{"ok": false, "error": "<one line for a human>", "code": "<machine word>"}``, then the
  server closes. ``code`` is one of :data:`ERROR_CODES`.

As with ``conntrackd -c``, a reply comes when the command has finished, so a commit
through the socket is synchronous.

Who may talk to it: the socket is created 0600 (the mode is set on the socket before
``bind()``, so no umask window exists) in a directory the agent creates 0750 if missing,
and the server also checks the caller's credentials (``SO_PEERCRED``) and refuses anyone
but root and the agent's own user.

The request/reply encoding below is pure (bytes in, values out) and tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import types
from collections.abc import Awaitable, Callable, Collection, Coroutine, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctsync.io.control_client import (
    DEFAULT_PATH,
    ERROR_CODES,
    ERROR_DENIED,
    ERROR_FAILED,
    ERROR_MALFORMED,
    ERROR_TIMEOUT,
    ERROR_TOO_LARGE,
    ERROR_UNKNOWN_COMMAND,
    LISTEN_BACKLOG,
    MAX_REQUEST,
    REQUEST_TIMEOUT,
    AgentError,
    AgentUnreachable,
    CommandError,
    ControlError,
    ControlSocketError,
    ProtocolError,
    Request,
    call,
    decode_reply,
    decode_request,
    encode_error,
    encode_ok,
    encode_request,
)

log = logging.getLogger("ctsync.control")


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


# --------------------------------------------------------------------------- server


@dataclass
class ControlStats:
    requests: int = 0
    errors: int = 0
    denied: int = 0


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _socket_answers(path: str) -> bool:
    """True if something accepts connections on *path*; False if it is a stale file."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a full backlog: someone is there
    finally:
        probe.close()
    return True


class ControlServer:
    """The agent's side: ``register`` async handlers by name, ``start``, ``close``.

    A handler gets the request's ``args`` dict and returns something JSON can encode;
    raising :class:`CommandError` sends its message as the error, any other exception is
    logged and reported as an internal error. Nothing a client sends can stop the server.

    Serving is callback-driven on the loop's own readiness callbacks rather than asyncio
    streams: a monitoring client may poll a cheap command every few milliseconds while the
    agent is busiest, and streams cost a task, a reader and a writer per connection. A
    request that has arrived by the time its connection is accepted (the usual case: the
    client sends right after ``connect``) is read at once. A handler registered ``inline``
    (``counts``, ``statistics``: cheap and never waiting) then runs at once until it first
    suspends (as an eager task would), so it is answered within the accept callback, and
    continues as a task only if it does suspend; before that first ``await`` there is no
    current task. Every other handler runs in a task of its own from the start, so it may
    use what needs one (``asyncio.timeout``, ``asyncio.current_task()``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        allowed_uids: Collection[int] | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.path = os.fspath(path)
        self.allowed_uids = frozenset(
            allowed_uids if allowed_uids is not None else {0, os.geteuid()}
        )
        self.request_timeout = request_timeout
        self.stats = ControlStats()
        self._handlers: dict[str, Handler] = {}
        self._inline: set[str] = set()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inode: tuple[int, int] | None = None
        self._conns: set[_Connection] = set()  # waiting for their request or their reply
        self._tasks: set[asyncio.Task[None]] = set()  # handlers running as tasks

    def register(self, name: str, handler: Handler, *, inline: bool = False) -> None:
        """``inline``: run the handler's first step in the accept callback, outside any
        task (for cheap commands polled often; see the class doc)."""
        if name in self._handlers:
            raise ValueError(f"command {name!r} already registered")
        self._handlers[name] = handler
        if inline:
            self._inline.add(name)

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Take the socket path and listen. Raises :class:`ControlSocketError` if another
        agent answers on it or the path is something other than a socket."""
        if self._sock is not None:
            raise RuntimeError("control server already started")
        loop = asyncio.get_running_loop()
        sock = self._bind()
        try:
            loop.add_reader(sock.fileno(), self._on_acceptable)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        self._sock, self._loop = sock, loop
        log.info("control socket listening on %s", self.path)

    def _bind(self) -> socket.socket:
        parent = Path(self.path).parent
        if not parent.is_dir():
            parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            os.chmod(parent, 0o750)  # mkdir's mode is filtered by the umask
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode):
                raise ControlSocketError(f"{self.path} exists and is not a socket; not removing it")
            if _socket_answers(self.path):
                raise ControlSocketError(f"{self.path}: another agent is running (it answers)")
            log.warning("removing stale control socket %s", self.path)
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # The file bind() creates takes the socket inode's mode (minus the umask): set it
            # first, so the path is never reachable with a wider mode.
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:  # lost a race with another agent
                raise ControlSocketError(f"{self.path}: another agent took the path") from exc
            self._unlink()
            raise
        return sock

    async def close(self) -> None:
        """Stop listening and remove the socket file (if it is still ours).

        Connections still waiting for their request are closed; commands already running
        finish and answer (or are cancelled with the loop)."""
        sock, loop = self._sock, self._loop
        self._sock = None
        if sock is not None and loop is not None:
            with contextlib.suppress(Exception):  # the loop may be closing already
                loop.remove_reader(sock.fileno())
            sock.close()
        for conn in list(self._conns):
            if conn.reading:
                conn.close()
        self._unlink()

    def _unlink(self) -> None:
        if self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        self._inode = None

    # --- serving -----------------------------------------------------------------------

    def _on_acceptable(self) -> None:
        # One connection per wakeup: the listening socket is level-triggered, so others
        # come with the next loop iteration, and a lone poll costs no EAGAIN accept().
        sock, loop = self._sock, self._loop
        if sock is None or loop is None:
            return
        try:
            client, _addr = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and the like: the client will time out
            log.warning("control socket accept failed: %s", exc)
            return
        try:
            _Connection(self, loop, client).start()
        except Exception:  # never into the loop's exception handler
            log.exception("control connection failed")
            client.close()

    def _error(self, message: str, code: str) -> bytes:
        self.stats.errors += 1
        return encode_error(message, code)

    def _dispatch(self, conn: _Connection, line: bytes) -> None:
        """Decode a request and answer it: at once, or from a task if the handler waits."""
        try:
            request = decode_request(line)
        except ProtocolError as exc:
            conn.reply(self._error(str(exc), exc.code))
            return
        handler = self._handlers.get(request.command)
        if handler is None:
            conn.reply(
                self._error(
                    f"unknown command {request.command!r} (known: {', '.join(self.commands)})",
                    ERROR_UNKNOWN_COMMAND,
                )
            )
            return
        try:
            awaitable = handler(request.args)
            coro: Coroutine[Any, Any, Any] = (
                awaitable if isinstance(awaitable, Coroutine) else _as_coroutine(awaitable)
            )
        except Exception as exc:  # the handler failed before it even started
            conn.reply(self._failure(request.command, exc))
            return
        rest: Awaitable[Any] = coro
        if request.command in self._inline:
            try:
                first = coro.send(None)
            except StopIteration as done:
                conn.reply(self._result(request.command, done.value))
                return
            except Exception as exc:
                conn.reply(self._failure(request.command, exc))
                return
            rest = _resume(coro, first)  # it waits for something: on from where it stopped
        assert self._loop is not None
        task = self._loop.create_task(self._finish(conn, request.command, rest))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, conn: _Connection, command: str, rest: Awaitable[Any]) -> None:
        try:
            result = await rest
        except Exception as exc:
            conn.reply(self._failure(command, exc))
        else:
            conn.reply(self._result(command, result))

    def _failure(self, command: str, exc: Exception) -> bytes:
        if isinstance(exc, CommandError):
            return self._error(str(exc), ERROR_FAILED)
        log.error("control command %r failed", command, exc_info=exc)
        return self._error(f"{command}: internal error: {exc!r}", ERROR_FAILED)

    def _result(self, command: str, result: Any) -> bytes:
        try:
            return encode_ok(result)
        except (TypeError, ValueError) as exc:
            log.error("control command %r returned a value JSON cannot encode: %s", command, exc)
            return self._error(f"{command}: result cannot be encoded", ERROR_FAILED)


_RECV_SIZE = 65536


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], first: Any) -> Generator[Any, Any, Any]:
    """Await a coroutine that was already started and yielded ``first`` (what
    ``yield from`` does, PEP 380, minus the first ``send``): the task that awaits this
    waits on what the coroutine waits on, and forwards results, exceptions and
    cancellation to it."""
    pending = first
    while True:
        try:
            sent = yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # CancelledError included: forwarded, not swallowed
            try:
                pending = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                pending = coro.send(sent)
            except StopIteration as done:
                return done.value


class _Connection:
    """One client connection: its request is read, answered, and the socket closed."""

    def __init__(
        self, server: ControlServer, loop: asyncio.AbstractEventLoop, sock: socket.socket
    ) -> None:
        self.server = server
        self.loop = loop
        self.sock = sock
        self.reading = True
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._watching = False  # a reader or writer callback is registered
        self._out: memoryview | None = None

    def start(self) -> None:
        sock = self.sock
        sock.setblocking(False)
        server = self.server
        server._conns.add(self)
        try:
            uid = _peer_uid(sock)
        except OSError:
            uid = -1
        if uid not in server.allowed_uids:
            server.stats.denied += 1
            log.warning("control request from uid %d refused", uid)
            self.reply(
                server._error(
                    f"permission denied: uid {uid} may not control the agent", ERROR_DENIED
                )
            )
            return
        if self._read():
            return
        # Not all there yet: wait for the rest, for at most request_timeout.
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self._watching = True
        self._timer = self.loop.call_later(server.request_timeout, self._on_timeout)

    def _on_readable(self) -> None:
        try:
            self._read()
        except Exception:  # never into the loop's exception handler
            log.exception("control connection failed")
            self.close()

    def _read(self) -> bool:
        """Read what is there; True once the request is complete (and dispatched) or the
        connection is done with."""
        buf = self._buf
        while True:
            try:
                chunk = self.sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                log.debug("control client went away: %s", exc)
                self.close()
                return True
            end = chunk.find(b"\n")
            if end >= 0:
                buf += chunk[: end + 1]
            else:
                buf += chunk
            # As a stream reader limited to MAX_REQUEST: a line beyond it is refused.
            if len(buf) > MAX_REQUEST + (1 if end >= 0 else 0):
                server = self.server
                limit = f"request too large (limit {MAX_REQUEST} bytes)"
                self._request_done()
                self.reply(server._error(limit, ERROR_TOO_LARGE))
                return True
            if end >= 0 or not chunk:  # a newline, or EOF: that is the request
                self._request_done()
                self.server._dispatch(self, bytes(buf))
                return True

    def _request_done(self) -> None:
        self.reading = False
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self.reading:
            self._request_done()
            timeout = self.server.request_timeout
            self.reply(self.server._error(f"no request within {timeout}s", ERROR_TIMEOUT))

    def reply(self, data: bytes) -> None:
        """Send the reply, then close (in the background if the client reads slowly)."""
        self.reading = False
        self.server.stats.requests += 1
        self._out = memoryview(data)
        self._write()

    def _write(self) -> None:
        out = self._out
        while out:
            try:
                sent = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                if not self._watching:
                    self.loop.add_writer(self.sock.fileno(), self._on_writable)
                    self._watching = True
                self._out = out
                return
            except OSError as exc:
                log.debug("control client went away: %s", exc)
                break
            out = out[sent:]
        self.close()

    def _on_writable(self) -> None:
        try:
            self._write()
        except Exception:
            log.exception("control connection failed")
            self.close()

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            fd = self.sock.fileno()
            if fd >= 0 and not self.loop.is_closed():
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)

    def close(self) -> None:
        self.reading = False
        self._out = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unwatch()
        self.sock.close()
        self.server._conns.discard(self)


__all__ = [
    "DEFAULT_PATH",
    "ERROR_CODES",
    "ERROR_DENIED",
    "ERROR_FAILED",
    "ERROR_MALFORMED",
    "ERROR_TIMEOUT",
    "ERROR_TOO_LARGE",
    "ERROR_UNKNOWN_COMMAND",
    "LISTEN_BACKLOG",
    "MAX_REQUEST",
    "REQUEST_TIMEOUT",
    "AgentError",
    "AgentUnreachable",
    "CommandError",
    "ControlError",
    "ControlServer",
    "ControlSocketError",
    "ControlStats",
    "Handler",
    "ProtocolError",
    "Request",
    "call",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_ok",
    "encode_request",
]
