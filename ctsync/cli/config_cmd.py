"""``ctsync config check|show``: test and print the configuration file.

``check`` works like ``keepalived -t`` / ``nginx -t``: exit 0 and ``PATH: configuration OK``
when the file is valid (warnings, if any, go to stderr), else exit 1 with one
``PATH: KEY: MESSAGE`` line per problem on stderr. ``show`` prints the effective
configuration (defaults filled in) as TOML, or JSON with ``--json``.

:mod:`ctsync.config` (and pydantic) is imported only when a command runs, so that the rest of
the CLI starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ctsync.cli.errors import EXIT_FAILURE

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
    """Check or print the configuration file (default /etc/ctsync/ctsync.toml)."""


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
    help="Do not check the files the configuration names (the key file).",
)
def check_cmd(path: Path, no_file_checks: bool) -> None:
    """Validate PATH (like keepalived -t).

    Exit 0 and print "PATH: configuration OK" when it is valid; else exit 1 with one
    "PATH: KEY: MESSAGE" line per error on stderr.
    """
    config = _load(path, check_files=not no_file_checks)
    for key, message in config.warnings():
        click.echo(f"{path}: warning: {key}: {message}", err=True)
    click.echo(f"{path}: configuration OK")


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
