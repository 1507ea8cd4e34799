"""Options and helpers shared by the ``ctsync`` commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ctsync.cli.errors import EXIT_CODES_HELP
from ctsync.core.entry import AF_INET, AF_INET6
from ctsync.core.select import (
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

T = TypeVar("T")


def parsed(parse: Callable[[str], T]) -> Callable[[click.Context, click.Parameter, Any], T | None]:
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


def parsed_each(
    parse: Callable[[str], T],
) -> Callable[[click.Context, click.Parameter, Any], tuple[T, ...]]:
    """:func:`parsed` for a ``multiple=True`` option: every value parsed."""

    def callback(ctx: click.Context, param: click.Parameter, values: Any) -> tuple[T, ...]:
        try:
            return tuple(parse(str(v)) for v in values or ())
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


EPILOG = "\b\n" + EXIT_CODES_HELP.replace("; ", "\n  ").replace(": ", ":\n  ", 1)

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}

FAMILIES: dict[str, int] = {"ipv4": AF_INET, "ipv6": AF_INET6}
"""The address family names the commands take, and their numbers."""


F = TypeVar("F", bound=Callable[..., Any])


def selection_options(func: F) -> F:
    """conntrack(8)'s filter flags, for every command that lists entries."""
    for option in reversed(_SELECTION_OPTIONS):
        func = option(func)
    return func


_SELECTION_OPTIONS = [
    click.option(
        "-p",
        "--proto",
        metavar="PROTO",
        callback=parsed(parse_proto),
        help="Protocol name (tcp, udp, icmp, ...) or number.",
    ),
    click.option(
        "-s",
        "--src",
        "--orig-src",
        "src",
        metavar="ADDR[/PREFIX]",
        callback=parsed(parse_network),
        help="Original source.",
    ),
    click.option(
        "-d",
        "--dst",
        "--orig-dst",
        "dst",
        metavar="ADDR[/PREFIX]",
        callback=parsed(parse_network),
        help="Original destination.",
    ),
    click.option(
        "--sport",
        "--orig-port-src",
        "sport",
        metavar="PORT",
        callback=parsed(parse_port),
        help="Original source port.",
    ),
    click.option(
        "--dport",
        "--orig-port-dst",
        "dport",
        metavar="PORT",
        callback=parsed(parse_port),
        help="Original destination port.",
    ),
    click.option(
        "-m",
        "--mark",
        metavar="MARK[/MASK]",
        callback=parsed(parse_mark),
        help="Match entries whose mark & MASK == MARK.",
    ),
    click.option(
        "-w",
        "--zone",
        metavar="ZONE",
        callback=parsed(parse_zone),
        help="Conntrack zone (no zone = zone 0).",
    ),
    click.option(
        "--state",
        metavar="STATE",
        callback=parsed(parse_state),
        help="TCP state, e.g. ESTABLISHED (also SCTP/DCCP states).",
    ),
]


def build_selector(
    proto: int | None,
    src: IPNetwork | None,
    dst: IPNetwork | None,
    sport: int | None,
    dport: int | None,
    mark: tuple[int, int] | None,
    zone: int | None,
    state: str | None,
) -> EntryFilter:
    return EntryFilter(
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


def network_text(network: IPNetwork) -> str:
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)
