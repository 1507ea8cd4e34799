"""``ctsync tracking [show|set]``: the namespace's connection-tracking settings.

The nf_conntrack sysctls of the network namespace the command runs in, under RouterOS-like
names and units (``tcp-established-timeout: 5d``); the names, parsing and validation are in
:mod:`ctsync.core.tracking`, the file access in :mod:`ctsync.io.sysctl`. ``set`` checks every
NAME VALUE pair (name known, value valid, setting present and writable here) before it writes
any, so a typo changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import click

from ctsync.cli.errors import CliError, describe_os_error
from ctsync.cli.options import EPILOG
from ctsync.core import tracking
from ctsync.io.sysctl import Sysctls

# Tests replace this (monkeypatch) with a Sysctls over a temporary directory.
_sysctls: Callable[[], Sysctls] = Sysctls


def _current(sysctls: Sysctls) -> tuple[str, list[tracking.Reading]]:
    if not sysctls.loaded():
        return tracking.enabled_state(False), []
    try:
        values = sysctls.read_all()
    except OSError as exc:
        raise CliError(f"cannot read the conntrack sysctls: {describe_os_error(exc)}") from exc
    return tracking.enabled_state(True), tracking.readings(values, sysctls.writable())


def _print(enabled: str, rows: list[tracking.Reading], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(tracking.to_json(enabled, rows), indent=2))
    else:
        click.echo(tracking.render_text(enabled, rows))


@click.group("tracking", invoke_without_command=True, epilog=EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def tracking_group(ctx: click.Context, as_json: bool) -> None:
    """Show or set this namespace's connection-tracking settings (nf_conntrack sysctls).

    Names and units follow RouterOS's `/ip firewall connection tracking`: durations such as
    1d, 4h30m, 30s (or plain seconds), switches yes/no. `ctsync tracking` alone shows them.
    """
    if ctx.invoked_subcommand is None:
        _print(*_current(_sysctls()), as_json)
    elif as_json:
        raise click.UsageError("--json goes after the sub-command (e.g. `tracking set --json`)")


@tracking_group.command("show", epilog=EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def tracking_show(as_json: bool) -> None:
    """Show every connection-tracking setting present in this namespace."""
    _print(*_current(_sysctls()), as_json)


@tracking_group.command("set", epilog=EPILOG)
@click.argument("pairs", nargs=-1, required=True, metavar="NAME VALUE [NAME VALUE]...")
@click.option("--json", "as_json", is_flag=True, help="Print the settings written, as JSON.")
def tracking_set(pairs: tuple[str, ...], as_json: bool) -> None:
    """Set settings, e.g. `tcp-established-timeout 1d udp-timeout 30s accounting yes`.

    NAME is a name `ctsync tracking` shows (or the sysctl's, e.g. nf_conntrack_tcp_loose).
    Nothing is written unless every pair is valid and writable in this namespace;
    total-entries, and max-entries/buckets outside the initial namespace, are read-only.
    """
    if len(pairs) % 2:
        raise click.UsageError(f"{pairs[-1]!r} has no value: give NAME VALUE pairs")
    wanted: list[tuple[tracking.Setting, int]] = []
    for name, text in zip(pairs[::2], pairs[1::2], strict=True):
        if name.strip().lower() == "enabled":
            raise CliError(
                "enabled is read-only: Linux tracks a namespace's connections once a rule or NAT"
                " there uses conntrack (RouterOS's auto)"
            )
        try:
            setting = tracking.lookup(name)
            value = tracking.parse_value(setting, text)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="NAME VALUE") from None
        if any(s is setting for s, _ in wanted):
            raise click.UsageError(f"{setting.name} is given twice")
        wanted.append((setting, value))

    sysctls = _sysctls()
    if not sysctls.loaded():
        raise CliError("nf_conntrack is not loaded in this network namespace")
    try:
        present = sysctls.read_all()
    except OSError as exc:
        raise CliError(f"cannot read the conntrack sysctls: {describe_os_error(exc)}") from exc
    writable = sysctls.writable()
    for setting, _ in wanted:
        if setting.sysctl not in present:
            raise CliError(f"{setting.name} does not exist in this kernel ({setting.key})")
        if setting.always_read_only or setting.sysctl not in writable:
            raise CliError(tracking.read_only_reason(setting))

    done: list[str] = []
    for setting, value in wanted:
        try:
            sysctls.write(setting.sysctl, value)
        except OSError as exc:
            already = f" (already set: {', '.join(done)})" if done else ""
            raise CliError(
                f"cannot set {setting.name} ({setting.key}): {describe_os_error(exc)}{already}"
            ) from exc
        done.append(setting.name)

    names = {s.sysctl for s, _ in wanted}
    enabled, rows = _current(sysctls)
    changed = [r for r in rows if r.setting.sysctl in names]
    if as_json:
        click.echo(json.dumps(tracking.to_json(enabled, changed), indent=2))
    else:
        width = max(len(r.setting.name) for r in changed)
        for row in changed:
            click.echo(f"{row.setting.name:>{width}}: {row.text}")
