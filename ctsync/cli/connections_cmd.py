"""``ctsync connections [delete]``: the live conntrack table the way RouterOS shows it.

``ctsync connections`` lists the kernel table of the network namespace it runs in with
RouterOS's ``/ip firewall connection print`` columns and flag letters; ``--interval S`` takes
two dumps S seconds apart and adds per-connection rates. ``ctsync connections delete`` removes
the connections a filter selects (batched ctnetlink deletes), refuses an empty filter
without ``--all``, and with ``--dry-run`` only lists what would go.

Filters are conntrack(8)'s (see :mod:`ctsync.cli.options`) plus the reply direction, the
address family and NAT; the derived fields, rates and sorting are
:mod:`ctsync.core.connections`, flags and durations :mod:`ctsync.core.routeros`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from ctsync.cli.errors import CliError, describe_os_error
from ctsync.cli.options import EPILOG, FAMILIES, build_selector, parsed, selection_options
from ctsync.core import connections as conns
from ctsync.core.entry import CtTuple, Entry, proto_name
from ctsync.core.routeros import FLAGS_LEGEND, flag_letters, format_duration, format_quantity
from ctsync.core.select import EntryFilter, parse_network
from ctsync.io.sysctl import Sysctls

MAX_INTERVAL = 3600.0
ACCT_SYSCTL = "nf_conntrack_acct"
ACCOUNTING_NOTE = (
    "note: connection accounting is off here (net.netfilter.nf_conntrack_acct = 0), so there"
    " are no byte/packet counters or rates; enable it with `ctsync tracking set accounting"
    " yes` or `ctsync connections --enable-accounting` (it counts connections created"
    " from then on)"
)
NO_CONNECTIONS = "no connections"

DumpTable = Callable[[int], Sequence[Entry]]
DeleteMany = Callable[[list[tuple[CtTuple, int | None]]], tuple[int, int]]


def _netlink_dump(family: int) -> Sequence[Entry]:
    from ctsync.io.netlink import dump_table

    return dump_table(family)


def _netlink_delete(targets: list[tuple[CtTuple, int | None]]) -> tuple[int, int]:
    from ctsync.io.netlink import Committer

    with Committer() as committer:
        return committer.delete_many(targets)


# Indirections tests replace (monkeypatch.setattr(connections_cmd, "_dump", fake)).
_dump: DumpTable = _netlink_dump
_delete: DeleteMany = _netlink_delete
_sysctls: Callable[[], Sysctls] = Sysctls
_sleep: Callable[[float], None] = time.sleep
_clock: Callable[[], float] = time.monotonic


# --- pure rendering ---------------------------------------------------------------------------


def _row(
    index: int, conn: conns.Connection, *, reply: bool, counters: bool, rates: bool, zone: bool
) -> list[str]:
    entry = conn.entry
    row = [
        str(index),
        flag_letters(entry, padded=True),
        proto_name(entry.proto),
        conns.endpoint(entry.orig, True),
        conns.endpoint(entry.orig, False),
    ]
    if reply:
        r = entry.reply
        row += [conns.endpoint(r, True), conns.endpoint(r, False)] if r else ["", ""]
    row += [
        conns.tcp_state(entry),
        format_duration(entry.timeout) if entry.timeout is not None else "",
    ]
    if rates:
        rate = conn.rate
        row += (
            [
                format_quantity(rate.orig_bytes, "B/s"),
                format_quantity(rate.reply_bytes, "B/s"),
                format_quantity(rate.orig_packets),
                format_quantity(rate.reply_packets),
            ]
            if rate is not None
            else ["", "", "", ""]
        )
    if counters:
        co, cr = entry.counters_orig, entry.counters_reply
        row += [
            str(co.packets) if co else "",
            str(cr.packets) if cr else "",
            str(co.bytes) if co else "",
            str(cr.bytes) if cr else "",
        ]
    row.append(f"{entry.mark:#x}" if entry.mark else "")
    if zone:
        row.append(str(entry.zone or 0))
    return row


_RIGHT = frozenset(
    {
        "#",
        "TIMEOUT",
        "ORIG-RATE",
        "REPL-RATE",
        "ORIG-PPS",
        "REPL-PPS",
        "ORIG-PACKETS",
        "REPL-PACKETS",
        "ORIG-BYTES",
        "REPL-BYTES",
        "ZONE",
    }
)


def render_connections(
    connections: Sequence[conns.Connection], *, reply: bool = False, rates: bool = False
) -> str:
    """RouterOS ``/ip firewall connection print`` layout: a flags legend, a header, one row
    per connection. Counter columns appear when any connection has counters, rate columns
    with ``rates``, a ZONE column when any connection is in a zone other than 0."""
    if not connections:
        return NO_CONNECTIONS
    counters = any(conns.has_counters(c.entry) for c in connections)
    zone = any(c.entry.zone for c in connections)
    headers = ["#", "", "PROTOCOL", "SRC-ADDRESS", "DST-ADDRESS"]
    if reply:
        headers += ["REPLY-SRC-ADDRESS", "REPLY-DST-ADDRESS"]
    headers += ["TCP-STATE", "TIMEOUT"]
    if rates:
        headers += ["ORIG-RATE", "REPL-RATE", "ORIG-PPS", "REPL-PPS"]
    if counters:
        headers += ["ORIG-PACKETS", "REPL-PACKETS", "ORIG-BYTES", "REPL-BYTES"]
    headers.append("CONNECTION-MARK")
    if zone:
        headers.append("ZONE")
    rows = [
        _row(i, c, reply=reply, counters=counters, rates=rates, zone=zone)
        for i, c in enumerate(connections)
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        parts = [
            cell.rjust(width) if header in _RIGHT else cell.ljust(width)
            for cell, width, header in zip(cells, widths, headers, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([FLAGS_LEGEND, line(headers), *(line(r) for r in rows)])


def render_json(connections: Sequence[conns.Connection]) -> str:
    return json.dumps([conns.connection_to_json(c) for c in connections], indent=2)


# --- options ----------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])

_EXTRA_FILTERS = [
    click.option(
        "-f",
        "--family",
        type=click.Choice(sorted(FAMILIES)),
        help="Only IPv4 or IPv6 connections.",
    ),
    click.option(
        "-r",
        "--reply-src",
        metavar="ADDR[/PREFIX]",
        callback=parsed(parse_network),
        help="Reply source (the translated destination of a DNAT).",
    ),
    click.option(
        "-q",
        "--reply-dst",
        metavar="ADDR[/PREFIX]",
        callback=parsed(parse_network),
        help="Reply destination (the translated source of a SNAT).",
    ),
    click.option(
        "--nat/--no-nat",
        "nat",
        default=None,
        help="Only connections with (without) any address translation.",
    ),
    click.option("--src-nat", is_flag=True, help="Only source-NATed connections (flag s)."),
    click.option("--dst-nat", is_flag=True, help="Only destination-NATed connections (flag d)."),
]


def filter_options(func: F) -> F:
    """conntrack(8)'s filters plus family, reply direction and NAT."""
    for option in reversed(_EXTRA_FILTERS):
        func = option(func)
    return selection_options(func)


_FILTER_PARAMS = (
    "proto",
    "src",
    "dst",
    "sport",
    "dport",
    "mark",
    "zone",
    "state",
    "family",
    "reply_src",
    "reply_dst",
    "nat",
    "src_nat",
    "dst_nat",
)


def build_filter(params: dict[str, Any]) -> tuple[EntryFilter, int]:
    """The EntryFilter and dump family (0: both) the filter options ask for."""
    family = params.get("family")
    family_number = FAMILIES[family] if family else 0
    flags = ("src", "dst", "reply_src", "reply_dst")
    versions = {params[n].version for n in flags if params.get(n) is not None}
    if family and versions - {int(family[-1])}:
        raise click.UsageError(f"an address filter does not match --family {family}")
    if len(versions) > 1:
        raise click.UsageError("address filters mix IPv4 and IPv6: nothing could match")
    nat_choices = [
        kind
        for kind, given in (
            ("any" if params.get("nat") else "none", params.get("nat") is not None),
            ("src", params.get("src_nat")),
            ("dst", params.get("dst_nat")),
        )
        if given
    ]
    if len(nat_choices) > 1:
        raise click.UsageError("use one of --nat, --no-nat, --src-nat, --dst-nat")
    base = build_selector(
        params.get("proto"),
        params.get("src"),
        params.get("dst"),
        params.get("sport"),
        params.get("dport"),
        params.get("mark"),
        params.get("zone"),
        params.get("state"),
    )
    selector = dataclasses.replace(
        base,
        reply_src=params.get("reply_src"),
        reply_dst=params.get("reply_dst"),
        nat=nat_choices[0] if nat_choices else None,
    )
    return selector, family_number


def _select(selector: EntryFilter, family: int) -> list[Entry]:
    try:
        entries = _dump(family)
    except ImportError as exc:
        raise CliError(f"netlink support is not available: {exc}") from exc
    except OSError as exc:
        raise CliError(f"cannot read the conntrack table: {describe_os_error(exc)}") from exc
    return [e for e in entries if (not family or e.family == family) and selector.matches(e)]


def _accounting_off() -> bool:
    try:
        return _sysctls().read(ACCT_SYSCTL) == "0"
    except OSError:
        return False


def _enable_accounting() -> None:
    try:
        _sysctls().write(ACCT_SYSCTL, 1)
    except OSError as exc:
        raise CliError(f"cannot enable accounting: {describe_os_error(exc)}") from exc


# --- commands ---------------------------------------------------------------------------------


_LIST_OPTIONS = [
    click.option(
        "--sort",
        "sort_key",
        type=click.Choice(list(conns.SORT_KEYS)),
        metavar="COLUMN",
        help=(
            f"Sort by {', '.join(conns.SORT_KEYS)}; volumes and rates list the biggest first,"
            " the rest ascends."
        ),
    ),
    click.option("--reverse", is_flag=True, help="Reverse the sort order."),
    click.option(
        "--interval",
        type=click.FloatRange(min=0.1, max=MAX_INTERVAL),
        metavar="SECONDS",
        help="Dump twice, SECONDS apart, and show per-connection rates (needs accounting).",
    ),
    click.option("--reply", is_flag=True, help="Also show the reply addresses (NAT targets)."),
    click.option(
        "--enable-accounting",
        is_flag=True,
        help="Turn on nf_conntrack_acct in this namespace first (counts new connections).",
    ),
    click.option("--count", is_flag=True, help="Print only the number of matching connections."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object each."),
]


def list_options(func: F) -> F:
    """The filters plus the listing's own options (``connections`` and ``connections list``)."""
    for option in reversed(_LIST_OPTIONS):
        func = option(func)
    return filter_options(func)


_LIST_HELP = """List the kernel's connections in this namespace, as RouterOS's
    `/ip firewall connection print` does.

    \b
    Flags: E expected, S seen-reply, A assured, C confirmed, D dying,
    F fasttrack (flowtable offload), H hardware offload, s srcnat, d dstnat.

    Filters apply to the original direction (--reply-src/--reply-dst to the reply) and
    combine with AND. Byte and packet counters appear when nf_conntrack_acct is on.
    """


@click.group("connections", invoke_without_command=True, epilog=EPILOG, help=_LIST_HELP)
@list_options
@click.pass_context
def connections_group(ctx: click.Context, /, **params: Any) -> None:
    if ctx.invoked_subcommand is not None:
        given = [p.name for p in ctx.command.params if p.name and _is_set(ctx, p.name)]
        if given:
            raise click.UsageError(
                f"options go after the sub-command: `connections {ctx.invoked_subcommand}"
                f" --{given[0].replace('_', '-')} ...`"
            )
        return
    list_connections(**params)


@connections_group.command("list", epilog=EPILOG, help=_LIST_HELP)
@list_options
def connections_list(**params: Any) -> None:
    list_connections(**params)


def list_connections(
    *,
    sort_key: str | None,
    reverse: bool,
    interval: float | None,
    reply: bool,
    enable_accounting: bool,
    count: bool,
    as_json: bool,
    **filters: Any,
) -> None:
    """``ctsync connections [list]``."""
    selector, family = build_filter(filters)
    if sort_key in conns.RATE_SORT_KEYS and interval is None:
        raise click.UsageError(f"--sort {sort_key} needs --interval")
    if enable_accounting:
        _enable_accounting()
    if count:
        click.echo(str(len(_select(selector, family))))
        return
    if interval is None:
        connections = [conns.Connection(e) for e in _select(selector, family)]
    else:
        started = _clock()
        before = _select(selector, family)
        _sleep(interval)
        elapsed = _clock() - started
        connections = conns.compute_rates(before, _select(selector, family), elapsed)
    if sort_key is not None:
        connections = conns.sort_connections(connections, sort_key, reverse=reverse)
    elif reverse:
        connections.reverse()
    if as_json:
        click.echo(render_json(connections))
        return
    click.echo(render_connections(connections, reply=reply, rates=interval is not None))
    if not enable_accounting and _accounting_off():
        click.echo(ACCOUNTING_NOTE, err=True)


def _is_set(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


@connections_group.command("delete", epilog=EPILOG)
@filter_options
@click.option("--all", "all_", is_flag=True, help="Remove every connection (no filter given).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as a JSON object.")
def connections_delete(all_: bool, dry_run: bool, as_json: bool, **filters: Any) -> None:
    """Remove the connections that the filters select.

    For example every connection with mark 0x2/0xff (`-m 0x2/0xff`), or to one
    destination (`-d 192.0.2.1`). Prints how many were removed and how many were already
    gone. Without any filter it refuses, unless --all is given: a typo must not flush the
    table.
    """
    selector, family = build_filter(filters)
    if selector.is_empty and not family and not all_:
        raise click.UsageError(
            "no filter given: refusing to remove every connection"
            " (give a filter such as --mark 0x2/0xff or --dst ADDR, or --all)"
        )
    if all_ and not (selector.is_empty and not family):
        raise click.UsageError("--all removes every connection: do not combine it with filters")
    selected = _select(selector, family)
    if dry_run:
        if as_json:
            payload = {
                "dry_run": True,
                "matched": len(selected),
                "connections": [conns.connection_to_json(conns.Connection(e)) for e in selected],
            }
            click.echo(json.dumps(payload, indent=2))
        else:
            if selected:
                click.echo(render_connections([conns.Connection(e) for e in selected]))
            click.echo(f"would remove {_plural(len(selected))} (dry run: nothing removed)")
        return

    keys = [conns.connection_key(e) for e in selected]
    removed = gone = failed = 0
    if keys:
        try:
            removed, not_removed = _delete([(orig, zone or None) for orig, zone in keys])
        except OSError as exc:
            raise CliError(f"cannot remove connections: {describe_os_error(exc)}") from exc
        if not_removed:
            # ENOENT (expired or removed meanwhile) and real failures come back together:
            # whatever is still in the table failed, the rest was already gone.
            wanted = set(keys)
            still = sum(
                1 for e in _select(EntryFilter(), family) if conns.connection_key(e) in wanted
            )
            failed = min(still, not_removed)
            gone = not_removed - failed
    if as_json:
        payload = {
            "dry_run": False,
            "matched": len(selected),
            "removed": removed,
            "already_gone": gone,
            "failed": failed,
        }
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(f"removed {_plural(removed)} ({gone} already gone)")
    if failed:
        raise CliError(f"{_plural(failed)} could not be removed")


def _plural(n: int) -> str:
    return f"{n} connection" if n == 1 else f"{n} connections"
