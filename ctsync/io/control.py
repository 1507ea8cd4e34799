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
from collections.abc import Awaitable, Callable, Collection
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
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None

    def register(self, name: str, handler: Handler) -> None:
        if name in self._handlers:
            raise ValueError(f"command {name!r} already registered")
        self._handlers[name] = handler

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Take the socket path and listen. Raises :class:`ControlSocketError` if another
        agent answers on it or the path is something other than a socket."""
        if self._server is not None:
            raise RuntimeError("control server already started")
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, sock=sock, limit=MAX_REQUEST
            )
        except BaseException:
            sock.close()
            self._unlink()
            raise
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
        """Stop listening and remove the socket file (if it is still ours)."""
        if self._server is not None:
            self._server.close()
            self._server = None
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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._reply(reader, writer)
            self.stats.requests += 1
            writer.write(reply)
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.debug("control client went away: %s", exc)
        except Exception:  # never into the loop's exception handler
            log.exception("control connection failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _error(self, message: str, code: str) -> bytes:
        self.stats.errors += 1
        return encode_error(message, code)

    async def _reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        sock = writer.get_extra_info("socket")
        uid = _peer_uid(sock) if sock is not None else -1
        if uid not in self.allowed_uids:
            self.stats.denied += 1
            log.warning("control request from uid %d refused", uid)
            return self._error(
                f"permission denied: uid {uid} may not control the agent", ERROR_DENIED
            )
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), self.request_timeout)
        except asyncio.IncompleteReadError as exc:
            line = exc.partial  # EOF ends a request too
        except asyncio.LimitOverrunError:
            return self._error(f"request too large (limit {MAX_REQUEST} bytes)", ERROR_TOO_LARGE)
        except TimeoutError:
            return self._error(f"no request within {self.request_timeout}s", ERROR_TIMEOUT)
        try:
            request = decode_request(line)
        except ProtocolError as exc:
            return self._error(str(exc), exc.code)
        handler = self._handlers.get(request.command)
        if handler is None:
            return self._error(
                f"unknown command {request.command!r} (known: {', '.join(self.commands)})",
                ERROR_UNKNOWN_COMMAND,
            )
        try:
            result = await handler(request.args)
        except CommandError as exc:
            return self._error(str(exc), ERROR_FAILED)
        except Exception as exc:
            log.exception("control command %r failed", request.command)
            return self._error(f"{request.command}: internal error: {exc!r}", ERROR_FAILED)
        try:
            return encode_ok(result)
        except (TypeError, ValueError) as exc:
            log.error(
                "control command %r returned a value JSON cannot encode: %s", request.command, exc
            )
            return self._error(f"{request.command}: result cannot be encoded", ERROR_FAILED)


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
