"""``ctsync flows``: watch conntrack for a while, then summarise the distinct flows.

For designing firewall rules from what the firewall really carries: the flows (original
direction, client ports collapsed, ICMP by type/code, NAT noted), the services they use with
their sources aggregated into prefixes, and, with ``--nft``, a draft nftables ruleset that
allows exactly those services. The work is in :mod:`ctsync.core.flows` (pure) and
:mod:`ctsync.io.flow_watch` (netlink); this module parses options and handles signals.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from pathlib import Path
from types import FrameType

import click

from ctsync.cli.errors import CliError, describe_os_error
from ctsync.cli.options import EPILOG, FAMILIES, parsed, parsed_each
from ctsync.core.flows import (
    DEFAULT_COLLAPSE_ABOVE,
    NFT_POLICIES,
    FlowCollector,
    FlowFilter,
    Summary,
    render_nft,
    render_text,
    summarize,
    summary_to_json,
)
from ctsync.core.select import (
    U32_MAX,
    IPNetwork,
    parse_mark,
    parse_network,
    parse_port,
    parse_proto,
    parse_zone,
)

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``30``, ``30s``, ``500ms``, ``5m``, ``1h``, ``1m30s``: seconds (> 0)."""
    value = text.strip().lower()
    if _NUMBER.fullmatch(value):
        total = float(value)
    elif _DURATION.fullmatch(value):
        total = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value))
    else:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 5m, 1h, 1m30s)")
    if total <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return total


def build_filter(
    families: tuple[str, ...],
    protos: tuple[int, ...],
    src: tuple[IPNetwork, ...],
    dst: tuple[IPNetwork, ...],
    dports: tuple[int, ...],
    zone: int | None,
    mark: tuple[int, int] | None,
    exclude: tuple[IPNetwork, ...],
) -> FlowFilter:
    return FlowFilter(
        families=frozenset(FAMILIES[f] for f in families),
        protos=frozenset(protos),
        src=src,
        dst=dst,
        dports=frozenset(dports),
        zone=zone,
        mark=mark[0] if mark is not None else None,
        mark_mask=mark[1] if mark is not None else U32_MAX,
        exclude=exclude,
    )


def render(summary: Summary, fmt: str, *, nft_table: str, nft_policy: str) -> str:
    if fmt == "json":
        return json.dumps(summary_to_json(summary), indent=2)
    if fmt == "nft":
        return render_nft(summary, table=nft_table, policy=nft_policy).rstrip("\n")
    return render_text(summary)


@click.command("flows", epilog=EPILOG)
@click.option(
    "-t",
    "--duration",
    metavar="DURATION",
    callback=parsed(parse_duration),
    help="Observe this long (30s, 5m, 1h, 1m30s); default: until SIGINT (Ctrl-C) or SIGTERM.",
)
@click.option(
    "--include-table/--no-table",
    default=True,
    show_default=True,
    help="Start from the connections already in the table, or count only those that "
    "report events while observing.",
)
@click.option(
    "-f",
    "--family",
    "families",
    type=click.Choice(sorted(FAMILIES)),
    multiple=True,
    help="Only this address family (repeatable).",
)
@click.option(
    "-p",
    "--proto",
    "protos",
    metavar="PROTO",
    multiple=True,
    callback=parsed_each(parse_proto),
    help="Only this protocol: name (tcp, udp, icmp, ...) or number (repeatable).",
)
@click.option(
    "-s",
    "--src",
    metavar="ADDR[/PREFIX]",
    multiple=True,
    callback=parsed_each(parse_network),
    help="Only original sources in this prefix (repeatable: any of them).",
)
@click.option(
    "-d",
    "--dst",
    metavar="ADDR[/PREFIX]",
    multiple=True,
    callback=parsed_each(parse_network),
    help="Only original destinations (before DNAT) in this prefix (repeatable).",
)
@click.option(
    "--dport",
    "dports",
    metavar="PORT",
    multiple=True,
    callback=parsed_each(parse_port),
    help="Only this original destination port (repeatable).",
)
@click.option(
    "-w",
    "--zone",
    metavar="ZONE",
    callback=parsed(parse_zone),
    help="Only this conntrack zone (no zone = zone 0).",
)
@click.option(
    "-m",
    "--mark",
    metavar="MARK[/MASK]",
    callback=parsed(parse_mark),
    help="Only connections whose mark & MASK == MARK.",
)
@click.option(
    "-x",
    "--exclude",
    metavar="ADDR[/PREFIX]",
    multiple=True,
    callback=parsed_each(parse_network),
    help="Leave out connections from or to this prefix (repeatable), e.g. the sync link.",
)
@click.option(
    "--collapse-above",
    type=click.IntRange(0, 65535),
    default=DEFAULT_COLLAPSE_ABOVE,
    show_default=True,
    help="Source ports above this are collapsed into one range (client ports).",
)
@click.option("--no-collapse", is_flag=True, help="Keep every source port apart.")
@click.option(
    "--max-prefixes",
    type=click.IntRange(1, 1024),
    default=None,
    help="Cover each service's sources with at most N prefixes (fewest addresses added); "
    "default: the exact cover.",
)
@click.option(
    "--replied-only",
    is_flag=True,
    help="Leave out flows that never saw a reply (no connection confirmed both ways).",
)
@click.option("--json", "as_json", is_flag=True, help="Write the summary as JSON.")
@click.option("--nft", "as_nft", is_flag=True, help="Write a draft nftables ruleset (nft -f).")
@click.option(
    "--nft-table",
    default="ctsync_flows",
    show_default=True,
    metavar="NAME",
    help="Name of the inet table of the nftables draft.",
)
@click.option(
    "--nft-policy",
    type=click.Choice(NFT_POLICIES),
    default="drop",
    show_default=True,
    help="Chain policy of the draft; accept adds a counter of what drop would drop.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True, path_type=Path),
    default=None,
    help="Write the result to this file instead of stdout.",
)
def flows_cmd(
    *,
    duration: float | None,
    include_table: bool,
    families: tuple[str, ...],
    protos: tuple[int, ...],
    src: tuple[IPNetwork, ...],
    dst: tuple[IPNetwork, ...],
    dports: tuple[int, ...],
    zone: int | None,
    mark: tuple[int, int] | None,
    exclude: tuple[IPNetwork, ...],
    collapse_above: int,
    no_collapse: bool,
    max_prefixes: int | None,
    replied_only: bool,
    as_json: bool,
    as_nft: bool,
    nft_table: str,
    nft_policy: str,
    output: Path | None,
) -> None:
    """Observe conntrack, then summarise the distinct flows for designing firewall rules.

    Reads the current table (unless --no-table) and the NEW/UPDATE/DESTROY events for
    --duration or until SIGINT/SIGTERM, in this network namespace. Then writes the
    distinct flows sorted by protocol, source, destination and ports: original direction
    (before NAT) with a NAT note, source ports above --collapse-above as one range, ICMP by
    type/code, connections per flow, and whether they were confirmed in both directions.
    Then the services (destination after DNAT, port or ICMP type) with their sources as the
    narrowest covering prefixes. --json writes the same as JSON; --nft writes a draft
    nftables ruleset that allows exactly the observed services (check it with nft -c -f).
    Progress goes to stderr.
    """
    if as_json and as_nft:
        raise click.UsageError("--json and --nft exclude each other")
    if as_nft and not nft_table.replace("_", "").replace("-", "").isalnum():
        raise click.BadParameter("letters, digits, '_' and '-' only", param_hint="'--nft-table'")
    fmt = "json" if as_json else "nft" if as_nft else "text"
    flow_filter = build_filter(families, protos, src, dst, dports, zone, mark, exclude)
    collapse = None if no_collapse else collapse_above
    collector = FlowCollector(accept=flow_filter.matches, collapse_above=collapse)

    try:
        from ctsync.io import flow_watch
    except ImportError as exc:  # pragma: no cover - netlink layer missing
        raise CliError(f"netlink support is not available: {exc}") from exc

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    warnings: list[str] = []
    if flow_watch.events_setting() == 0:
        warnings.append("net.netfilter.nf_conntrack_events is 0: the kernel sends no events")
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            try:
                local = flow_watch.local_addresses()
            except Exception as exc:  # pyroute2 raises its own errors too
                local = frozenset()
                warnings.append(f"cannot read this host's addresses ({exc}): hooks may be wrong")
            with flow_watch.FlowWatch(collector, include_table=include_table) as watch:
                if include_table:
                    watch.read_table()
                until = f"for {duration:g}s" if duration is not None else "until SIGINT/SIGTERM"
                table = f"; {watch.table_entries} entries in the table" if include_table else ""
                click.echo(f"observing conntrack events {until}{table}", err=True)
                seconds = watch.run(duration, stop)
                info = watch.info(seconds, interrupted=stop.is_set(), warnings=tuple(warnings))
        except OSError as exc:
            raise CliError(f"cannot observe conntrack: {describe_os_error(exc)}") from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    summary = summarize(
        collector.flows(),
        info,
        local=local,
        max_prefixes=max_prefixes,
        replied_only=replied_only,
        collapse_above=collapse,
    )
    text = render(summary, fmt, nft_table=nft_table, nft_policy=nft_policy)
    if output is None or str(output) == "-":
        click.echo(text)
    else:
        try:
            output.write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write {output}: {describe_os_error(exc)}") from exc
    click.echo(
        f"{len(summary.flows)} flows, {sum(f.connections for f in summary.flows)} connections"
        f" in {info.seconds:.1f}s",
        err=True,
    )
