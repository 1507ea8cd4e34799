"""The ``ctsync`` command line (console script ``ctsync`` and ``python -m ctsync``).

Command tree; later work adds commands to these groups::

    ctsync version
    ctsync show conntrack table ipv4|ipv6 [-p PROTO] [-s ADDR[/PREFIX]] [-d ADDR[/PREFIX]]
                                         [--sport PORT] [--dport PORT] [-m MARK[/MASK]]
                                         [-w ZONE] [--state STATE] [--count] [--json]

Exit status (the same for every command, see :mod:`ctsync.cli.errors`):

- 0: success;
- 1: the operation failed (netlink error, permission denied, ...); one ``error: ...`` line
  on stderr, never a traceback;
- 2: usage error (click's own code: bad option, bad value);
- 3: the agent is not running or its control socket cannot be reached (agent commands).

The commands stay thin: they parse options, fetch data through an indirection that tests
replace (:data:`_dump_table`), and print what the pure renderers in
:mod:`ctsync.cli.render` return.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import click

from ctsync import __version__
from ctsync.cli.agent_cmds import register_agent_commands
from ctsync.cli.config_cmd import config_group
from ctsync.cli.connections_cmd import connections_group
from ctsync.cli.errors import CliError, describe_os_error
from ctsync.cli.flows_cmd import flows_cmd
from ctsync.cli.options import (
    CONTEXT_SETTINGS,
    EPILOG,
    FAMILIES,
    build_selector,
    network_text,
    selection_options,
)
from ctsync.cli.render import render_conntrack_json, render_conntrack_table
from ctsync.cli.timeline_cmd import timeline_group
from ctsync.cli.tracking_cmd import tracking_group
from ctsync.core.entry import Entry
from ctsync.core.select import IPNetwork

DumpTable = Callable[[int], Sequence[Entry]]
"""Reads the kernel conntrack table of one address family (AF_INET or AF_INET6)."""


def _netlink_dump_table(family: int) -> Sequence[Entry]:
    # Imported here so that the CLI (and --help) works without the netlink layer loaded.
    from ctsync.io.netlink import dump_table  # type: ignore[import-not-found,unused-ignore]

    entries: Sequence[Entry] = dump_table(family)
    return entries


# Tests replace this with a fake (monkeypatch.setattr(main, "_dump_table", fake)).
_dump_table: DumpTable = _netlink_dump_table


@click.group(context_settings=CONTEXT_SETTINGS, epilog=EPILOG)
@click.version_option(__version__, "-V", "--version", prog_name="ctsync")
def cli() -> None:
    """Connection-tracking state sync for Linux firewall clusters."""


@cli.command("version")
def version_cmd() -> None:
    """Print the ctsync version."""
    click.echo(f"ctsync {__version__}")


@cli.group(epilog=EPILOG)
def show() -> None:
    """Show state: the kernel's conntrack table, and (later) the agent's caches and statistics."""


@show.group("conntrack", epilog=EPILOG)
def show_conntrack() -> None:
    """Show the kernel's connection tracking state in this network namespace."""


@show_conntrack.command("table", epilog=EPILOG)
@click.argument("family", type=click.Choice(sorted(FAMILIES)), metavar="ipv4|ipv6")
@selection_options
@click.option("--count", is_flag=True, help="Print only the number of matching entries.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of entries.")
def show_conntrack_table(
    *,
    family: str,
    proto: int | None,
    src: IPNetwork | None,
    dst: IPNetwork | None,
    sport: int | None,
    dport: int | None,
    mark: tuple[int, int] | None,
    zone: int | None,
    state: str | None,
    count: bool,
    as_json: bool,
) -> None:
    """Show the conntrack table of this network namespace, as VyOS's
    `show conntrack table ipv4|ipv6` does.

    Filters use conntrack(8)'s flags, apply to the original direction, and combine with AND.
    --count prints a bare integer (also when --json is given).
    """
    family_number = FAMILIES[family]
    for flag, network in (("--src", src), ("--dst", dst)):
        if network is not None and f"ipv{network.version}" != family:
            raise click.BadParameter(
                f"{network_text(network)} is an IPv{network.version} address"
                f" but the table is {family}",
                param_hint=f"'{flag}'",
            )
    entry_filter = build_selector(proto, src, dst, sport, dport, mark, zone, state)

    try:
        entries = _dump_table(family_number)
    except ImportError as exc:
        raise CliError(f"netlink support is not available: {exc}") from exc
    except OSError as exc:
        raise CliError(
            f"cannot read the {family} conntrack table: {describe_os_error(exc)}"
        ) from exc

    selected = [e for e in entries if e.family == family_number and entry_filter.matches(e)]
    if count:
        click.echo(str(len(selected)))
    elif as_json:
        click.echo(render_conntrack_json(selected))
    else:
        click.echo(render_conntrack_table(selected))


cli.add_command(config_group)
cli.add_command(timeline_group)
cli.add_command(flows_cmd)
cli.add_command(connections_group)
cli.add_command(tracking_group)
register_agent_commands(cli, show)


def main() -> None:
    """Console-script entry point: run the click group and exit with its status."""
    cli(prog_name="ctsync")
