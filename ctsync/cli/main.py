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

import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from ctsync import __version__
from ctsync.cli.errors import EXIT_CODES_HELP, CliError, describe_os_error
from ctsync.cli.filters import (
    U32_MAX,
    EntryFilter,
    IPNetwork,
    parse_mark,
    parse_network,
    parse_port,
    parse_proto,
    parse_state,
    parse_zone,
)
from ctsync.cli.render import render_conntrack_json, render_conntrack_table
from ctsync.core.entry import Entry

DumpTable = Callable[[int], Sequence[Entry]]
"""Reads the kernel conntrack table of one address family (AF_INET or AF_INET6)."""

FAMILIES: dict[str, int] = {"ipv4": int(socket.AF_INET), "ipv6": int(socket.AF_INET6)}


def _netlink_dump_table(family: int) -> Sequence[Entry]:
    # Imported here so that the CLI (and --help) works without the netlink layer loaded.
    from ctsync.io.netlink import dump_table  # type: ignore[import-not-found,unused-ignore]

    entries: Sequence[Entry] = dump_table(family)
    return entries


# Tests replace this with a fake (monkeypatch.setattr(main, "_dump_table", fake)).
_dump_table: DumpTable = _netlink_dump_table

T = TypeVar("T")


def _parsed(parse: Callable[[str], T]) -> Callable[[click.Context, click.Parameter, Any], T | None]:
    """A click callback around a parser that raises ValueError (-> usage error, exit 2).

    Callbacks rather than ``click.ParamType`` subclasses: ParamType became generic in click
    8.2, and a callback types the same way on every click >= 8.1.
    """

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> T | None:
        if value is None:
            return None
        try:
            return parse(str(value))
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


EPILOG = "\b\n" + EXIT_CODES_HELP.replace("; ", "\n  ").replace(": ", ":\n  ", 1)

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


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
@click.option(
    "-p",
    "--proto",
    metavar="PROTO",
    callback=_parsed(parse_proto),
    help="Protocol name (tcp, udp, icmp, ...) or number.",
)
@click.option(
    "-s",
    "--src",
    "--orig-src",
    "src",
    metavar="ADDR[/PREFIX]",
    callback=_parsed(parse_network),
    help="Original source.",
)
@click.option(
    "-d",
    "--dst",
    "--orig-dst",
    "dst",
    metavar="ADDR[/PREFIX]",
    callback=_parsed(parse_network),
    help="Original destination.",
)
@click.option(
    "--sport",
    "--orig-port-src",
    "sport",
    metavar="PORT",
    callback=_parsed(parse_port),
    help="Original source port.",
)
@click.option(
    "--dport",
    "--orig-port-dst",
    "dport",
    metavar="PORT",
    callback=_parsed(parse_port),
    help="Original destination port.",
)
@click.option(
    "-m",
    "--mark",
    metavar="MARK[/MASK]",
    callback=_parsed(parse_mark),
    help="Match entries whose mark & MASK == MARK.",
)
@click.option(
    "-w",
    "--zone",
    metavar="ZONE",
    callback=_parsed(parse_zone),
    help="Conntrack zone (no zone = zone 0).",
)
@click.option(
    "--state",
    metavar="STATE",
    callback=_parsed(parse_state),
    help="TCP state, e.g. ESTABLISHED (also SCTP/DCCP states).",
)
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
                f"{_network_text(network)} is an IPv{network.version} address"
                f" but the table is {family}",
                param_hint=f"'{flag}'",
            )
    entry_filter = EntryFilter(
        proto=proto,
        src=src,
        dst=dst,
        sport=sport,
        dport=dport,
        mark=mark[0] if mark is not None else None,
        mark_mask=mark[1] if mark is not None else U32_MAX,
        zone=zone,
        state=state,
    )

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


def _network_text(network: IPNetwork) -> str:
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def main() -> None:
    """Console-script entry point: run the click group and exit with its status."""
    cli(prog_name="ctsync")
