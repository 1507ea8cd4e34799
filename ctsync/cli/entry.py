"""The ``ctsync`` console entry point, with a fast path for the agent's hook commands.

``commit``, ``flush``, ``resync``, ``bulk-send`` and ``failover`` run from keepalived
notify hooks, on the failover's critical path: written plainly (``-S PATH``, ``--json``,
their arguments), they are served here with the standard library and the control client only,
without loading click and the rest of the CLI (that start-up is most of a client's time).
Anything else, including ``--help`` or a typo, goes to the full CLI, which gives the same
output and exit codes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

DEFAULT_SOCKET = "/run/ctsync/ctsync.sock"
EXIT_FAILURE = 1
EXIT_AGENT_UNREACHABLE = 3


def format_commit(result: dict[str, Any]) -> str:
    errors = ", ".join(f"{name}: {n}" for name, n in result["errors"].items())
    return (
        f"{result['committed']} entries committed, {result['failed']} failed "
        f"in {result['seconds']:.3f}s" + (f" ({errors})" if errors else "")
    )


def format_flush(result: dict[str, Any]) -> str:
    return f"{result['flushed']} entries flushed"


def format_resync(result: dict[str, Any]) -> str:
    if result["resynced"] == "kernel":
        return f"internal cache resynced: {result['entries']} entries"
    return f"full transfer requested from {len(result['peers'])} peer(s)"


def format_bulk_send(result: dict[str, Any]) -> str:
    return f"{result['entries']} entries queued for sending"


def format_failover(result: dict[str, Any]) -> str:
    if result.get("skipped"):
        return f"{result['to']}: superseded by a newer request"
    steps = ", ".join(
        f"{step['step']} {step['seconds'] or 0:.3f}s" + (" FAILED" if step.get("error") else "")
        for step in result["steps"]
    )
    return f"{result['to']}: {steps or 'nothing to do'}"


_HOOKS = ("commit", "flush", "resync", "bulk-send", "failover")


def _parse(argv: list[str]) -> tuple[str, str, dict[str, Any], bool] | None:
    """(command, socket, args, as_json) of a plain hook command, else None."""
    if not argv or argv[0] not in _HOOKS:
        return None
    command, rest = argv[0], argv[1:]
    socket_path = os.environ.get("CTSYNC_SOCKET", DEFAULT_SOCKET)
    args: dict[str, Any] = {}
    as_json = False
    i = 0
    while i < len(rest):
        word = rest[i]
        if word in ("-S", "--socket") and i + 1 < len(rest):
            socket_path = rest[i + 1]
            i += 2
            continue
        if word.startswith("--socket="):
            socket_path = word.split("=", 1)[1]
        elif word == "--json":
            as_json = True
        elif word == "--kernel" and command == "resync":
            args["kernel"] = True
        elif command == "flush" and word in ("internal", "external", "all") and not args:
            args["which"] = word
        elif command == "failover" and not word.startswith("-"):
            args.setdefault("args", []).append(word)
        else:
            return None
        i += 1
    if command == "flush":
        args.setdefault("which", "all")
    if command == "resync":
        args.setdefault("kernel", False)
    if command == "failover" and not _failover_args_ok(args.get("args", [])):
        return None  # the full CLI explains the usage
    return command, socket_path, args, as_json


def _failover_args_ok(words: list[str]) -> bool:
    from ctsync.core.failover import parse_notify

    try:
        parse_notify(words)
    except ValueError:
        return False
    return True


_FORMATS = {
    "commit": format_commit,
    "flush": format_flush,
    "resync": format_resync,
    "bulk-send": format_bulk_send,
    "failover": format_failover,
}


def run_fast(argv: list[str]) -> int | None:
    """Run a plain hook command; None when the full CLI must handle ``argv``."""
    parsed = _parse(argv)
    if parsed is None:
        return None
    command, socket_path, args, as_json = parsed
    from ctsync.io.control_client import AgentError, AgentUnreachable, call

    try:
        result = call(socket_path, command, args or None, timeout=300.0)
    except AgentUnreachable as exc:
        print(f"error: cannot reach the ctsync agent at {socket_path}: {exc}", file=sys.stderr)
        return EXIT_AGENT_UNREACHABLE
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(result, indent=2) if as_json else _FORMATS[command](result))
    return exit_status(command, result)


def exit_status(command: str, result: dict[str, Any]) -> int:
    """1 when a commit (on its own, or the failover's) failed for any entry."""
    if command == "commit" and result["failed"]:
        return EXIT_FAILURE
    if command == "failover" and any(step.get("error") for step in result["steps"]):
        return EXIT_FAILURE
    if command == "failover":
        commits = [s for s in result["steps"] if s["step"] == "commit"]
        if any((s.get("result") or {}).get("failed") for s in commits):
            return EXIT_FAILURE
    return 0


def main() -> None:
    code = run_fast(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from ctsync.cli.main import main as full_cli

    full_cli()
