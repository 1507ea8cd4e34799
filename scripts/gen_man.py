#!/usr/bin/env python3
"""Generate the man pages from the sources, so that they cannot drift from them.

- ``deploy/man/ctsync.8`` from the click command tree (every command, argument and
  option, with the help texts the CLI prints), the exit codes in :mod:`ctsync.cli.errors`,
  the default paths in :mod:`ctsync.config` and the capabilities in the systemd unit;
- ``deploy/man/ctsync.toml.5`` from ``docs/configuration.md``, after checking that its key
  tables list exactly the keys of the configuration model (:func:`ctsync.config.config_keys`)
  and that every default they give is the model's.

Run ``scripts/gen_man.py`` after changing a command, an option, a help text or the
configuration reference; ``--check`` exits 1 if the committed pages differ from what the
sources give (tests/core/test_deploy.py does the same). The output depends on nothing but
the sources: no dates, no terminal width.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import click  # noqa: E402

from ctsync import __version__  # noqa: E402

MAN_DIR = ROOT / "deploy" / "man"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
UNIT = ROOT / "deploy" / "systemd" / "ctsync.service"
KEY_TABLE_HEADER = ["Key", "Type", "Default", "Meaning", "VyOS / conntrackd"]


class GenerationError(Exception):
    """The sources disagree (a key missing from the docs, a default that differs, ...)."""


# --------------------------------------------------------------------------- roff


def escape(text: str, *, line_start: bool = True) -> str:
    """Plain text -> roff: backslashes, minus signs (so options copy and paste), characters
    beyond ASCII (as \\[uXXXX], so no preprocessor is needed), and a leading dot or quote
    that roff would take for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    if line_start and text.startswith((".", "'")):
        text = "\\&" + text
    return text


def inline(text: str) -> str:
    """Markdown inline markup (`code`, **bold**, \\| in tables) -> one roff text line."""
    text = text.replace("\\|", "|")
    out: list[str] = []
    for part in re.split(r"(`[^`]*`|\*\*[^*]+\*\*)", text):
        if part.startswith("`") and part.endswith("`") and len(part) >= 2:
            out.append("\\fB" + escape(part[1:-1], line_start=False) + "\\fR")
        elif part.startswith("**") and part.endswith("**") and len(part) >= 4:
            out.append("\\fB" + escape(part[2:-2], line_start=False) + "\\fR")
        else:
            out.append(escape(part, line_start=False))
    line = "".join(out)
    if line.startswith((".", "'")):
        line = "\\&" + line
    return line


def quoted(text: str) -> str:
    """A macro argument: double quotes inside become roff's \\(dq."""
    return '"' + escape(text).replace('"', "\\(dq") + '"'


def paragraph(text: str) -> list[str]:
    """Help text -> roff lines: blank lines separate paragraphs; click's ``\\b`` marks a
    paragraph whose line breaks are kept."""
    lines: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if lines:
            lines.append(".PP")
        rows = block.splitlines()
        if rows and rows[0].strip() == "\b":
            lines.append(".nf")
            lines += [escape(row) for row in rows[1:]]
            lines.append(".fi")
        else:
            lines.append(escape(" ".join(row.strip() for row in rows)))
    return lines


# --------------------------------------------------------------------------- ctsync(8)


def _help(command: click.Command) -> str:
    text = inspect.cleandoc(command.help or "")
    return text.split("\f", 1)[0]


def _commands(
    command: click.Command, ctx: click.Context, path: list[str]
) -> Iterator[tuple[list[str], click.Command, click.Context]]:
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            yield from _commands(sub, click.Context(sub, info_name=name, parent=ctx), [*path, name])
    else:
        yield path, command, ctx


def _option_lines(command: click.Command, ctx: click.Context) -> list[str]:
    lines: list[str] = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden or param.name == "help":
            continue
        names = ", ".join(f"\\fB{escape(opt)}\\fR" for opt in param.opts + param.secondary_opts)
        if not param.is_flag:
            names += " \\fI" + escape(param.make_metavar(ctx)) + "\\fR"
        help_text = param.help or ""
        default = param.show_default
        if isinstance(default, str):
            help_text += f" Default: {default}."
        elif default and param.default is not None and not callable(param.default):
            help_text += f" Default: {param.default}."
        lines += [".TP", names, escape(help_text.strip())]
    return lines


def _exit_codes() -> list[tuple[str, str]]:
    """(code, meaning) from the table in ctsync.cli.errors' docstring."""
    from ctsync.cli import errors

    rows = re.findall(r"^(\d)\s{2,}(\S.*)$", errors.__doc__ or "", re.M)
    codes = {errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_USAGE, errors.EXIT_AGENT_UNREACHABLE}
    if {int(code) for code, _ in rows} != codes:
        raise GenerationError("ctsync.cli.errors: the exit code table and the constants differ")
    return rows


def _unit_values(key: str) -> list[str]:
    values = []
    for line in UNIT.read_text().splitlines():
        if line.startswith(f"{key}="):
            values.append(line.split("=", 1)[1])
    return values


def render_ctsync_8() -> str:
    from ctsync.cli.entry import DEFAULT_SOCKET
    from ctsync.cli.main import cli
    from ctsync.config import DEFAULT_CONFIG_PATH, DEFAULT_CONTROL_SOCKET, DEFAULT_KEY_FILE

    ctx = click.Context(cli, info_name="ctsync")
    commands = list(_commands(cli, ctx, []))
    out = [
        f'.TH CTSYNC 8 "" "ctsync {__version__}" "System Administration"',
        '.\\" Generated by scripts/gen_man.py from the click command tree; do not edit.',
        ".SH NAME",
        "ctsync \\- connection\\-tracking state sync for Linux firewall clusters",
        ".SH SYNOPSIS",
    ]
    for path, command, cctx in commands:
        usage = " ".join(command.collect_usage_pieces(cctx))
        out += [".br", f"\\fBctsync {escape(' '.join(path))}\\fR {escape(usage)}"]
    out += [
        ".SH DESCRIPTION",
        *paragraph(_help(cli)),
        ".PP",
        escape(
            "ctsync keeps the connection-tracking (conntrack) table of a cluster of Linux "
            "firewalls in sync, so that when one node fails another takes over its traffic "
            "without dropping established connections, NATed ones included. One agent runs "
            "on each node (ctsync agent, usually from systemd); it reads the kernel table "
            "over netlink, sends authenticated deltas to its peers over UDP multicast or "
            "unicast, and on failover commits the peers' connections into the kernel before "
            "it takes the virtual addresses. The other commands talk to the agent over its "
            "root-only control socket, or read the kernel table directly."
        ),
        ".PP",
        escape(
            "commit, flush, resync (resync --kernel) and bulk-send are conntrackd's -c, -f, "
            "-n (-R) and -B; failover is a drop-in for conntrackd's primary-backup.sh in "
            "keepalived's notify hooks; show statistics prints the layout of conntrackd -s."
        ),
        ".SH COMMANDS",
    ]
    for path, command, cctx in commands:
        usage = " ".join(command.collect_usage_pieces(cctx))
        out += [f".SS {quoted('ctsync ' + ' '.join(path) + ' ' + usage)}"]
        out += paragraph(_help(command)) or [escape(command.get_short_help_str(200))]
        options = _option_lines(command, cctx)
        if options:
            out += [".PP", "Options:", ".RS", *options, ".RE"]
    out += [".SH OPTIONS", ".TP", "\\fB\\-V\\fR, \\fB\\-\\-version\\fR", "Print the version."]
    out += [".TP", "\\fB\\-h\\fR, \\fB\\-\\-help\\fR", "Print a command's help."]
    out += [".SH EXIT STATUS", "The same for every command:"]
    for code, meaning in _exit_codes():
        out += [".TP", f"\\fB{code}\\fR", escape(meaning[0].upper() + meaning[1:] + ".")]
    out += [
        ".PP",
        escape(
            "An expected failure prints one line, error: followed by what went wrong, on "
            "standard error, never a traceback."
        ),
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBCTSYNC_SOCKET\\fR",
        escape(
            f"The agent's control socket for the commands that talk to it (default "
            f"{DEFAULT_SOCKET}); the -S/--socket option overrides it."
        ),
        ".TP",
        "\\fBNOTIFY_SOCKET\\fR, \\fBWATCHDOG_USEC\\fR, \\fBWATCHDOG_PID\\fR",
        escape(
            "Set by systemd for ctsync agent: where to send READY=1, STOPPING=1 and "
            "WATCHDOG=1, and the watchdog timeout (the agent pings at half of it)."
        ),
        ".SH FILES",
        ".TP",
        f"\\fI{escape(str(DEFAULT_CONFIG_PATH))}\\fR",
        escape("The configuration (ctsync.toml(5)); ctsync config check validates it."),
        ".TP",
        f"\\fI{escape(str(DEFAULT_KEY_FILE))}\\fR",
        escape(
            "The pre-shared key authenticating the sync datagrams (auth.key-file): the same "
            "file on every node, mode 0600, at least 32 bytes."
        ),
        ".TP",
        f"\\fI{escape(str(DEFAULT_CONTROL_SOCKET))}\\fR",
        escape(
            "The agent's control socket (control.socket): mode 0600, and the agent admits "
            "only root (SO_PEERCRED)."
        ),
        ".TP",
        "\\fI/usr/lib/systemd/system/ctsync.service\\fR",
        escape("The systemd unit (deploy/systemd/ in the sources)."),
        ".SH SIGNALS",
        "The agent handles:",
        ".TP",
        "\\fBSIGTERM\\fR, \\fBSIGINT\\fR",
        escape(
            "Stop: the VRRP speaker (if any) sends priority 0 so that a backup takes over "
            "at once, then the sockets close."
        ),
        ".TP",
        "\\fBSIGHUP\\fR",
        escape(
            "Re-read the configuration and apply the log level and the filters; other "
            "changes need a restart. A restart empties the caches: never restart the agent "
            "to rotate a log (it logs to standard error, the journal under systemd)."
        ),
        ".SH SYSTEMD INTEGRATION",
    ]
    capabilities = " ".join(_unit_values("CapabilityBoundingSet"))
    exec_start = _unit_values("ExecStart")
    watchdog = _unit_values("WatchdogSec")
    runtime = _unit_values("RuntimeDirectory")
    if not (capabilities and exec_start and watchdog and runtime):
        raise GenerationError(f"{UNIT}: CapabilityBoundingSet, ExecStart, WatchdogSec missing")
    out += [
        escape(
            f"The unit runs {exec_start[-1]} with Type=notify (READY=1 once the kernel table "
            f"is read and the sync links are open) and WatchdogSec={watchdog[-1]}. It runs "
            f"as root with no capabilities but {capabilities}, in a read-only file system "
            f"except its runtime directory /run/{runtime[-1]}, which holds the control socket "
            "and keepalived's notify FIFO."
        ),
        ".SH SEE ALSO",
        "\\fBctsync.toml\\fR(5), \\fBconntrackd\\fR(8), \\fBconntrack\\fR(8), "
        "\\fBkeepalived\\fR(8), \\fBkeepalived.conf\\fR(5), \\fBsystemd.exec\\fR(5)",
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- ctsync.toml(5)


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip() for c in cells]


def _model_defaults() -> tuple[dict[str, Any], set[str]]:
    """Dotted key -> default as TOML would spell it (JSON-ish), and the required keys."""
    from pydantic import BaseModel

    from ctsync.config import Config, config_tables

    tables = set(config_tables())
    defaults: dict[str, Any] = {}
    required: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            if key in tables:
                sub = _submodel(field.annotation)
                if sub is not None:
                    walk(sub, key + ".")
                if "." not in key:
                    continue  # [sync], [auth], ...: documented by their keys
            if field.is_required():
                required.add(key)
            else:
                defaults[key] = _as_toml(field.get_default(call_default_factory=True))

    walk(Config, "")
    return defaults, required


def _submodel(annotation: Any) -> Any:
    from ctsync import config

    return config._submodel(annotation)


def _as_toml(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_as_toml(v) for v in value]
    return str(value)


def check_config_doc(text: str) -> list[tuple[str, list[str]]]:
    """The key-table rows of docs/configuration.md, after checking them against the model."""
    from ctsync.config import config_keys, config_tables

    rows: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and _cells(line) == KEY_TABLE_HEADER:
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                rows.append((cells[0].strip("`"), cells))
    documented = [key for key, _ in rows]
    top_tables = {k for k in config_tables() if "." not in k}
    expected = [k for k in config_keys() if k not in top_tables]
    missing = sorted(set(expected) - set(documented))
    extra = sorted(set(documented) - set(expected))
    twice = sorted({k for k in documented if documented.count(k) > 1})
    problems = []
    if missing:
        problems.append(f"keys missing from {CONFIG_DOC.name}: {', '.join(missing)}")
    if extra:
        problems.append(f"keys in {CONFIG_DOC.name} the model does not have: {', '.join(extra)}")
    if twice:
        problems.append(f"keys documented twice: {', '.join(twice)}")
    defaults, required = _model_defaults()
    for key, cells in rows:
        default_cell = cells[2]
        if key in required:
            if "required" not in default_cell:
                problems.append(f"{key}: required in the model, default {default_cell!r} in docs")
            continue
        if key not in defaults:
            continue
        literal = re.match(r"`([^`]*)`", default_cell)
        if literal is None and "required" in default_cell and defaults[key] == "":
            continue  # optional in the model, required by a cross-key rule
        if literal is None:
            problems.append(f"{key}: the docs give no default literal ({default_cell!r})")
            continue
        try:
            documented_value = tomllib.loads(f"v = {literal.group(1)}")["v"]
        except tomllib.TOMLDecodeError:
            problems.append(f"{key}: default {literal.group(1)!r} is not a TOML value")
            continue
        if documented_value != defaults[key]:
            problems.append(
                f"{key}: docs say {literal.group(1)}, the model's default is {defaults[key]!r}"
            )
    if problems:
        raise GenerationError("\n".join(problems))
    return rows


def _table(rows: Sequence[list[str]], header: list[str]) -> list[str]:
    out: list[str] = []
    for cells in rows:
        if header == KEY_TABLE_HEADER:
            key, kind, default, meaning, vyos = cells
            out += [
                ".TP",
                inline(key),
                inline(f"Type: {kind}. Default: {default}."),
                ".br",
                inline(meaning),
                ".br",
                inline(f"VyOS / conntrackd: {vyos}"),
            ]
        else:
            out += [".TP", inline(cells[0])]
            for i, (name, cell) in enumerate(zip(header[1:], cells[1:], strict=False)):
                if i:
                    out.append(".br")
                out.append(inline(f"{name}: {cell}"))
    return out


def markdown_to_roff(text: str) -> list[str]:
    """The subset of Markdown docs/configuration.md uses -> man(7) requests."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    para: list[str] = []
    in_list = False

    def flush() -> None:
        nonlocal para
        if para:
            out.append(inline(" ".join(p.strip() for p in para)))
            para = []

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            indent = len(line) - len(line.lstrip())
            out += [".nf"] if in_list else [".RS", ".nf"]
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                out.append(escape(lines[i][indent:]))
                i += 1
            out += [".fi"] if in_list else [".fi", ".RE"]
            i += 1
            continue
        if stripped.startswith("|"):
            flush()
            header = _cells(stripped)
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out += _table(rows, header)
            out.append(".PP")
            in_list = False
            continue
        if stripped.startswith("#"):
            flush()
            level = len(stripped) - len(stripped.lstrip("#"))
            title = stripped[level:].strip().strip("`")
            out.append(
                (".SH " if level <= 2 else ".SS ") + quoted(title.upper() if level <= 2 else title)
            )
            in_list = False
        elif not stripped:
            flush()
            if in_list and i + 1 < len(lines) and lines[i + 1].startswith(("  ", "- ")):
                pass
            elif in_list:
                in_list = False
                out.append(".PP")
            elif out and out[-1] not in (".PP",) and not out[-1].startswith((".SH", ".SS")):
                out.append(".PP")
        elif line.startswith("- "):
            flush()
            out += [".IP \\(bu 2"]
            para = [line[2:]]
            in_list = True
        else:
            para.append(line)
        i += 1
    flush()
    while out and out[-1] == ".PP":
        out.pop()
    return out


def render_ctsync_toml_5() -> str:
    from ctsync.config import DEFAULT_CONFIG_PATH

    text = CONFIG_DOC.read_text()
    check_config_doc(text)
    body = text.split("\n", 1)[1]  # without the "# Configuration reference" title
    intro, rest = body.split("\n## ", 1)
    out = [
        f'.TH CTSYNC.TOML 5 "" "ctsync {__version__}" "File Formats"',
        '.\\" Generated by scripts/gen_man.py from docs/configuration.md; do not edit.',
        ".SH NAME",
        "ctsync.toml \\- configuration file of the ctsync agent",
        ".SH SYNOPSIS",
        f"\\fI{escape(str(DEFAULT_CONFIG_PATH))}\\fR",
        ".SH DESCRIPTION",
        *markdown_to_roff(intro),
        *markdown_to_roff("## " + rest),
        ".SH SEE ALSO",
        "\\fBctsync\\fR(8), \\fBconntrackd.conf\\fR(5), \\fBkeepalived.conf\\fR(5)",
    ]
    cleaned: list[str] = []
    for line in out:  # no empty paragraphs after a heading
        if line == ".PP" and cleaned and cleaned[-1].startswith((".SH", ".SS", ".PP", ".TP")):
            continue
        cleaned.append(line)
    return "\n".join(cleaned) + "\n"


# --------------------------------------------------------------------------- main

PAGES = {"ctsync.8": render_ctsync_8, "ctsync.toml.5": render_ctsync_toml_5}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a committed page is out of date"
    )
    parser.add_argument("--out", type=Path, default=MAN_DIR, help="output directory")
    args = parser.parse_args(argv)
    stale = []
    for name, render in PAGES.items():
        try:
            text = render()
        except GenerationError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run scripts/gen_man.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
