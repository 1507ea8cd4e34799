"""``ctsync`` commands that run or talk to the agent (over its root-only control socket).

``ctsync agent`` runs it; the others are conntrackd's client commands under names an
operator can read: ``commit`` (-c), ``flush`` (-f), ``resync`` (-n, and -R with
``--kernel``), ``bulk-send`` (-B), ``show statistics`` (-s), ``show cache`` (-i/-e).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ctsync.cli.entry import (
    DEFAULT_SOCKET,
    exit_status,
    format_bulk_send,
    format_commit,
    format_failover,
    format_flush,
    format_resync,
)
from ctsync.cli.errors import AgentUnreachableError, CliError
from ctsync.cli.options import CONTEXT_SETTINGS, EPILOG, build_selector, selection_options
from ctsync.core.select import IPNetwork

DEFAULT_CONFIG = Path("/etc/ctsync/ctsync.toml")

socket_option = click.option(
    "-S",
    "--socket",
    "socket_path",
    default=lambda: os.environ.get("CTSYNC_SOCKET", DEFAULT_SOCKET),
    show_default=DEFAULT_SOCKET,
    metavar="PATH",
    help="The agent's control socket (env CTSYNC_SOCKET).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def call_agent(socket_path: str, command: str, args: dict[str, Any] | None = None) -> Any:
    """One request to the agent; exit 3 if it is unreachable, 1 if it reports a failure."""
    from ctsync.io.control_client import AgentError, AgentUnreachable, call

    try:
        return call(socket_path, command, args, timeout=300.0)
    except AgentUnreachable as exc:
        raise AgentUnreachableError(
            f"cannot reach the ctsync agent at {socket_path}: {exc}"
        ) from exc
    except AgentError as exc:
        raise CliError(str(exc)) from exc


def register_agent_commands(cli: click.Group, show: click.Group) -> None:
    for command in (agent_cmd, commit_cmd, flush_cmd, resync_cmd, bulk_send_cmd, failover_cmd):
        cli.add_command(command)
    for command in (show_statistics, show_status, show_cache):
        show.add_command(command)


@click.command("agent", context_settings=CONTEXT_SETTINGS, epilog=EPILOG)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The TOML configuration file.",
)
def agent_cmd(config_path: Path) -> None:
    """Run the agent in the foreground (as systemd runs it: logs on stderr)."""
    from ctsync.agent import run_agent
    from ctsync.config import ConfigError

    try:
        raise SystemExit(run_agent(config_path))
    except ConfigError as exc:
        raise CliError(f"invalid configuration:\n{exc}") from exc
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from exc


@click.command("commit", epilog=EPILOG)
@socket_option
@json_option
def commit_cmd(socket_path: str, as_json: bool) -> None:
    """Commit the external caches into the kernel table (conntrackd -c).

    Exits 1 if any entry failed."""
    result = call_agent(socket_path, "commit")
    if as_json:
        click.echo(_json(result))
    else:
        click.echo(format_commit(result))
    code = exit_status("commit", result)
    if code:
        raise SystemExit(code)


@click.command("flush", epilog=EPILOG)
@click.argument("which", type=click.Choice(["internal", "external", "all"]), default="all")
@socket_option
@json_option
def flush_cmd(which: str, socket_path: str, as_json: bool) -> None:
    """Empty the caches (conntrackd -f). The kernel table stays; the internal cache, its
    mirror, is read again from it at once."""
    result = call_agent(socket_path, "flush", {"which": which})
    click.echo(_json(result) if as_json else format_flush(result))


@click.command("resync", epilog=EPILOG)
@click.option("--kernel", is_flag=True, help="Re-read the kernel table instead (conntrackd -R).")
@socket_option
@json_option
def resync_cmd(kernel: bool, socket_path: str, as_json: bool) -> None:
    """Ask the peers for a full transfer of their tables (conntrackd -n)."""
    result = call_agent(socket_path, "resync", {"kernel": kernel})
    click.echo(_json(result) if as_json else format_resync(result))


@click.command("bulk-send", epilog=EPILOG)
@socket_option
@json_option
def bulk_send_cmd(socket_path: str, as_json: bool) -> None:
    """Send the whole internal cache to the peers (conntrackd -B)."""
    result = call_agent(socket_path, "bulk-send")
    click.echo(_json(result) if as_json else format_bulk_send(result))


@click.command("failover", epilog=EPILOG)
@click.argument("state", nargs=-1, required=True)
@socket_option
@json_option
def failover_cmd(state: tuple[str, ...], socket_path: str, as_json: bool) -> None:
    """Tell the agent its role: master (or primary), backup, fault or stop.

    A drop-in for conntrackd's primary-backup.sh in keepalived's notify_master /
    notify_backup / notify_fault; as keepalived's generic ``notify`` it also takes
    INSTANCE|GROUP NAME STATE PRIORITY. MASTER commits the synced connections, then
    flushes the external cache, re-reads the kernel and sends everything to the peers;
    BACKUP asks the master for a full transfer (and, after being master, purges our
    entries after failover.purge-timeout). Exits 1 if a step failed.
    """
    from ctsync.core.failover import parse_notify

    try:
        parse_notify(list(state))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    result = call_agent(socket_path, "failover", {"args": list(state)})
    click.echo(_json(result) if as_json else format_failover(result))
    code = exit_status("failover", result)
    if code:
        raise SystemExit(code)


@click.command("statistics", epilog=EPILOG)
@socket_option
@json_option
def show_statistics(socket_path: str, as_json: bool) -> None:
    """Sync statistics, in the layout of `conntrackd -s` (VyOS)."""
    from ctsync.cli.render_sync import render_statistics
    from ctsync.core.stats import snapshot_from_dict

    result = call_agent(socket_path, "statistics")
    if as_json:
        click.echo(_json(result))
    else:
        click.echo(render_statistics(snapshot_from_dict(result)), nl=False)


@click.command("status", epilog=EPILOG)
@socket_option
@json_option
def show_status(socket_path: str, as_json: bool) -> None:
    """Sync status, as VyOS `show conntrack-sync status`, plus peers."""
    from ctsync.cli.render_sync import render_status

    result = call_agent(socket_path, "status")
    click.echo(_json(result) if as_json else render_status(result))


@click.command("cache", epilog=EPILOG)
@click.argument("which", type=click.Choice(["internal", "external"]))
@selection_options
@click.option("--count", is_flag=True, help="Print only the number of matching entries.")
@click.option(
    "--expect",
    is_flag=True,
    help="The synced expectations instead (expect-sync; conntrackd -i/-e expect).",
)
@socket_option
@json_option
def show_cache(
    *,
    which: str,
    expect: bool,
    proto: int | None,
    src: IPNetwork | None,
    dst: IPNetwork | None,
    sport: int | None,
    dport: int | None,
    mark: tuple[int, int] | None,
    zone: int | None,
    state: str | None,
    count: bool,
    socket_path: str,
    as_json: bool,
) -> None:
    """Entries of the internal or external cache, in conntrack(8) line format."""
    from ctsync.cli.render_sync import render_cache_lines, render_expect_lines

    selector = build_selector(proto, src, dst, sport, dport, mark, zone, state)
    if expect and not selector.is_empty:
        raise click.UsageError("--expect lists every expectation: no filters")
    args = {"which": which, "filter": selector.to_args(), "count": count}
    if expect:
        args["table"] = "expect"
    else:
        args["format"] = "records"  # decoded here, not in the agent (see Agent.cmd_cache)
    result = call_agent(socket_path, "cache", args)
    if count:
        click.echo(str(result["count"]))
        return
    entries = result["entries"] if expect else _decode_records(result["records"])
    if as_json:
        click.echo(_json(entries))
    elif expect:
        click.echo(render_expect_lines(entries), nl=False)
    else:
        click.echo(render_cache_lines(entries), nl=False)


def _decode_records(records: list[list[Any]]) -> list[dict[str, Any]]:
    """The agent's hex records as the JSON entries ``show cache --json`` prints."""
    from ctsync.core import record
    from ctsync.core.ctnetlink import CtnetlinkError
    from ctsync.core.entry import entry_to_json

    out = []
    for node, key, value in records:
        try:
            entry = record.to_entry(bytes.fromhex(key), bytes.fromhex(value))
        except (CtnetlinkError, ValueError):
            continue  # the agent skips undecodable records too
        item = entry_to_json(entry)
        if node is not None:
            item["peer"] = node
        out.append(item)
    return out


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2)
