"""``ctsync config check|show|import-conntrackd``: test, print or import the configuration.

``check`` works like ``keepalived -t`` / ``nginx -t``: exit 0 and ``PATH: configuration OK``
when the file is valid (warnings, if any, go to stderr), else exit 1 with one
``PATH: KEY: MESSAGE`` line per problem on stderr. ``show`` prints the effective
configuration (defaults filled in) as TOML, or JSON with ``--json``. ``import-conntrackd``
translates a conntrackd.conf (:mod:`ctsync.importer`) and says what it cannot carry over.

:mod:`ctsync.config` (and pydantic) is imported only when a command runs, so that the rest of
the CLI starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import click

from ctsync.cli.errors import EXIT_FAILURE, CliError

if TYPE_CHECKING:
    from ctsync.config import Config

DEFAULT_PATH = "/etc/ctsync/ctsync.toml"

_PATH_ARGUMENT = click.argument(
    "path",
    default=DEFAULT_PATH,
    required=False,
    type=click.Path(dir_okay=False, path_type=Path),
)


@click.group("config")
def config_group() -> None:
    """Check, print or import the configuration file (default /etc/ctsync/ctsync.toml)."""


def _load(path: Path, *, check_files: bool) -> Config:
    from ctsync.config import ConfigError, load_config

    try:
        return load_config(path, check_files=check_files)
    except ConfigError as exc:
        for line in exc.lines():
            click.echo(line, err=True)
        click.get_current_context().exit(EXIT_FAILURE)


@config_group.command("check")
@_PATH_ARGUMENT
@click.option(
    "--no-file-checks",
    is_flag=True,
    help="Check the file alone: not the files it names (the key file) nor whether this"
    " host has the interfaces it names (for a file meant for another host).",
)
def check_cmd(path: Path, no_file_checks: bool) -> None:
    """Validate PATH (like keepalived -t).

    Exit 0 and print "PATH: configuration OK" when it is valid; else exit 1 with one
    "PATH: KEY: MESSAGE" line per error on stderr.
    """
    config = _load(path, check_files=not no_file_checks)
    warnings = config.warnings()
    if not no_file_checks:
        warnings += host_warnings(config)
    for key, message in warnings:
        click.echo(f"{path}: warning: {key}: {message}", err=True)
    click.echo(f"{path}: configuration OK")


def host_warnings(config: Config) -> list[tuple[str, str]]:
    """Interfaces the configuration names that this host does not have (now).

    Warnings, not errors: the agent may start before an interface exists (a VLAN or a bond
    made later at boot) and a VRRP instance waits for it in FAULT. But a misspelt name
    would wait forever, so say it here."""
    import socket

    names: list[tuple[str, str]] = []
    if config.sync.interface is not None:
        names.append(("sync.interface", config.sync.interface))
    names += [
        (f"sync.link[{i}].interface", link.interface) for i, link in enumerate(config.sync.link)
    ]
    if config.failover.mechanism == "vrrp":
        names += [
            (f"vrrp.instance[{i}].interface", inst.interface)
            for i, inst in enumerate(config.vrrp.instance)
        ]
    out: list[tuple[str, str]] = []
    for key, name in names:
        try:
            socket.if_nametoindex(name)
        except OSError:
            out.append((key, f"interface {name!r} does not exist on this host (now)"))
    return out


@config_group.command("show")
@_PATH_ARGUMENT
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def show_cmd(path: Path, as_json: bool) -> None:
    """Print the effective configuration, defaults filled in."""
    config = _load(path, check_files=False)
    if as_json:
        click.echo(config.to_json())
    else:
        click.echo(f"# effective configuration of {path} (defaults filled in)")
        click.echo(config.to_toml(), nl=False)


@config_group.command("import-conntrackd")
@click.argument("conntrackd_conf", metavar="CONNTRACKD_CONF", type=click.File("r"))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the TOML to this file instead of stdout.",
)
@click.option("--force", is_flag=True, help="Overwrite the --output file if it exists.")
def import_conntrackd_cmd(conntrackd_conf: TextIO, output: Path | None, force: bool) -> None:
    """Translate a conntrackd.conf (- for stdin) into ctsync TOML.

    What cannot be carried over, what changes meaning and what you must do (set node-id,
    create the key file) goes to stderr and into comments at the top of the output. The
    result passes `ctsync config check` once the key file exists. Exit 1 if the file is
    not a sync configuration conntrackd would accept.
    """
    from ctsync.config import ConfigError, loads_config
    from ctsync.importer import ConntrackdSyntaxError, import_conntrackd

    source = conntrackd_conf.name if conntrackd_conf.name != "<stdin>" else "stdin"
    try:
        result = import_conntrackd(conntrackd_conf.read(), Path(source).name)
    except ConntrackdSyntaxError as exc:
        raise CliError(f"{source}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CliError(f"{source}: not text: {exc}") from exc
    try:
        loads_config(result.toml)  # the importer's own check: never write a file that fails
    except ConfigError as exc:
        raise CliError(f"{source}: the imported configuration does not validate:\n{exc}") from exc
    for notice in result.notices:
        click.echo(notice.text(source), err=True)
    if output is None:
        click.echo(result.toml, nl=False)
        return
    if output.exists() and not force:
        raise CliError(f"{output} exists; use --force to overwrite it")
    try:
        output.write_text(result.toml)
    except OSError as exc:
        raise CliError(f"cannot write {output}: {exc.strerror or exc}") from exc
    click.echo(f"{output}: written; check it with: ctsync config check {output}", err=True)
