"""The control socket's protocol and client side, without asyncio (the CLI loads this).

See :mod:`ctsync.io.control` for the protocol and the agent's server.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any, NamedTuple

DEFAULT_PATH = "/run/ctsync/ctsync.sock"
MAX_REQUEST = 64 * 1024
#: How long a connected client may take to send its request.
REQUEST_TIMEOUT = 5.0
LISTEN_BACKLOG = 100  # conntrackd's

ERROR_DENIED = "denied"
ERROR_MALFORMED = "malformed"
ERROR_TOO_LARGE = "too-large"
ERROR_UNKNOWN_COMMAND = "unknown-command"
ERROR_FAILED = "failed"
ERROR_TIMEOUT = "timeout"
ERROR_CODES = frozenset(
    {
        ERROR_DENIED,
        ERROR_MALFORMED,
        ERROR_TOO_LARGE,
        ERROR_UNKNOWN_COMMAND,
        ERROR_FAILED,
        ERROR_TIMEOUT,
    }
)


# --------------------------------------------------------------------------- errors


class ControlError(Exception):
    """Base of the errors the client side raises."""


class AgentUnreachable(ControlError):  # noqa: N818 - the CLI's name for it
    """No conversation possible: no socket file, nothing listening, or not allowed."""


class AgentError(ControlError):
    """The agent answered with an error (the message is the agent's)."""

    def __init__(self, message: str, code: str = ERROR_FAILED) -> None:
        super().__init__(message)
        self.code = code


class ControlSocketError(Exception):
    """The server cannot take the socket path (another agent answers, not a socket...)."""


class CommandError(Exception):
    """Raised by a handler: the reply is an error with exactly this message."""


class ProtocolError(ValueError):
    """A request that cannot be served; ``code`` goes into the error reply."""

    def __init__(self, message: str, code: str = ERROR_MALFORMED) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- pure protocol


class Request(NamedTuple):
    # A NamedTuple, not a dataclass: the hook commands load this module on the failover's
    # critical path, and dataclasses (with inspect) is most of its import time.
    command: str
    args: dict[str, Any]


def _dumps(obj: object) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()


def encode_request(command: str, args: dict[str, Any] | None = None) -> bytes:
    """The request line for *command*; raises ValueError if it would not be accepted."""
    data = _dumps({"command": command, "args": args or {}})
    if len(data) > MAX_REQUEST:
        raise ValueError(f"request is {len(data)} bytes, the limit is {MAX_REQUEST}")
    return data


def decode_request(data: bytes) -> Request:
    """Parse one request (with or without its newline). Raises only :class:`ProtocolError`."""
    if len(data) > MAX_REQUEST:
        raise ProtocolError(f"request too large (limit {MAX_REQUEST} bytes)", ERROR_TOO_LARGE)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed request: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed request: not a JSON object")
    command = obj.get("command")
    if not isinstance(command, str) or not command:
        raise ProtocolError("malformed request: 'command' must be a non-empty string")
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError("malformed request: 'args' must be an object")
    unknown = set(obj) - {"command", "args"}
    if unknown:
        raise ProtocolError(f"malformed request: unknown keys {sorted(unknown)}")
    return Request(command, args)


def encode_ok(result: Any) -> bytes:
    """A success reply; raises ValueError/TypeError if *result* is not plain JSON."""
    return _dumps({"ok": True, "result": result})


def encode_error(message: str, code: str = ERROR_FAILED) -> bytes:
    return _dumps({"ok": False, "error": message, "code": code})


def decode_reply(data: bytes) -> Any:
    """The result of a reply, or raise :class:`AgentError` (:class:`AgentUnreachable` when
    the agent refused us)."""
    if not data.strip():
        raise AgentError("the agent closed the connection without a reply")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AgentError(f"malformed reply from the agent: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise AgentError("malformed reply from the agent: no 'ok' field")
    if obj["ok"]:
        return obj.get("result")
    message = obj.get("error")
    code = obj.get("code", ERROR_FAILED)
    text = message if isinstance(message, str) and message else "unspecified error"
    if code == ERROR_DENIED:
        raise AgentUnreachable(text)
    raise AgentError(text, code if isinstance(code, str) else ERROR_FAILED)


# --------------------------------------------------------------------------- client


def call(
    path: str | os.PathLike[str],
    command: str,
    args: dict[str, Any] | None = None,
    timeout: float | None = 30.0,
) -> Any:
    """Send one command to the agent and return its result (synchronous, for the CLI).

    Raises :class:`AgentUnreachable` when the socket is missing, refuses the connection,
    is not ours to use, or the agent does not answer in time; :class:`AgentError` with the
    agent's message when the command failed.
    """
    where = os.fspath(path)
    request = encode_request(command, args)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(where)
        except FileNotFoundError:
            raise AgentUnreachable(f"{where}: no such file (is the agent running?)") from None
        except ConnectionRefusedError:
            raise AgentUnreachable(
                f"{where}: connection refused (the agent is not running; stale socket)"
            ) from None
        except PermissionError:
            raise AgentUnreachable(f"{where}: permission denied (needs root)") from None
        except TimeoutError:
            raise AgentUnreachable(f"{where}: the agent did not accept within {timeout}s") from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise AgentUnreachable(f"{where}: {reason}") from None
        # The agent may have answered (and closed) without reading it all: read on.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        chunks: list[bytes] = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise AgentUnreachable(f"{where}: no reply to {command!r} within {timeout}s") from None
        except ConnectionResetError:
            pass  # what arrived before the reset is still the reply
    finally:
        sock.close()
    return decode_reply(b"".join(chunks))
