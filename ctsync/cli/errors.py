"""Exit codes and the errors ``ctsync`` commands raise.

The codes follow conntrackd, VyOS op-mode and LSB ``status`` so that scripts and keepalived
notify hooks can tell the cases apart:

====  =====================================================================
0     success
1     the operation failed (netlink error, permission denied, commit failed)
2     usage error (bad option or argument; click's own code)
3     the agent is not running or its control socket cannot be reached
====  =====================================================================

An expected failure prints exactly one line, ``error: <what went wrong>``, on stderr and
never a traceback: operators read it in a terminal, scripts read the exit code.
"""

from __future__ import annotations

import errno
from typing import IO, Any

import click

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_AGENT_UNREACHABLE = 3

EXIT_CODES_HELP = (
    "Exit status: 0 ok; 1 operation failed (e.g. netlink error, permission denied); "
    "2 usage error; 3 agent not running or control socket unreachable."
)


class CliError(click.ClickException):
    """An expected failure: one ``error: ...`` line on stderr, exit status 1."""

    exit_code = EXIT_FAILURE

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=True)


class AgentUnreachableError(CliError):
    """The agent's control socket is missing or refuses the connection (exit status 3)."""

    exit_code = EXIT_AGENT_UNREACHABLE


def describe_os_error(exc: OSError) -> str:
    """A one-line description of an OSError without Python's ``[Errno N]`` decoration."""
    if isinstance(exc, PermissionError):
        return "permission denied (needs root or CAP_NET_ADMIN)"
    if exc.strerror:
        text = exc.strerror[0].lower() + exc.strerror[1:]
        name = errno.errorcode.get(exc.errno) if exc.errno is not None else None
        return f"{text} ({name})" if name else text
    text = str(exc)
    return text if text else type(exc).__name__
