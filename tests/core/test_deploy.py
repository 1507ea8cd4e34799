"""Deployment files: the systemd unit, tmpfiles and modules-load files, and the man pages.

The unit is checked against the code it runs (the CLI's ``agent`` command and its default
paths, the control socket's directory, the watchdog the agent derives from WATCHDOG_USEC),
and with ``systemd-analyze verify``; the man pages must be exactly what
``scripts/gen_man.py`` makes from the sources, and render without groff warnings.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest

from ctsync.cli.agent_cmds import agent_cmd
from ctsync.cli.entry import DEFAULT_SOCKET
from ctsync.config import DEFAULT_CONFIG_PATH, DEFAULT_CONTROL_SOCKET
from ctsync.io import sdnotify

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "ctsync.service"
TMPFILES = SYSTEMD / "ctsync.tmpfiles"
MODULES = SYSTEMD / "ctsync.modules-load.conf"
MAN = ROOT / "deploy" / "man"

# The capability set, as the unit's comment documents it (one "#   CAP_X:" line each).
CAPABILITIES = {"CAP_NET_ADMIN", "CAP_NET_RAW"}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: [Section], Key=Value (a key may repeat), # and ; comments,
    a trailing backslash continues the line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=Value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "min": 60.0, "m": 60.0}
    for suffix, factor in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "").isdigit():
            return float(value[: -len(suffix)]) * factor
    return float(value)


# --------------------------------------------------------------------------- the unit


def test_notify_and_watchdog(
    unit: dict[str, dict[str, list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = "Service"
    assert one(unit, service, "Type") == "notify"
    assert one(unit, service, "NotifyAccess") == "main"  # the commit worker is a fork
    watchdog = seconds(one(unit, service, "WatchdogSec"))
    assert 10 <= watchdog <= 120
    # What the agent derives from the WATCHDOG_USEC systemd passes: it pings every half.
    monkeypatch.setenv("WATCHDOG_USEC", str(int(watchdog * 1_000_000)))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == watchdog
    assert one(unit, service, "Restart") == "on-failure"
    assert seconds(one(unit, service, "RestartSec")) >= 1
    assert int(one(unit, "Unit", "StartLimitBurst")) >= 3
    assert seconds(one(unit, "Unit", "StartLimitIntervalSec")) > 5 * seconds(
        one(unit, service, "RestartSec")
    )
    assert one(unit, service, "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_exec_start_is_the_agent_command_with_the_default_config(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0] == "/usr/bin/ctsync"
    assert argv[1] == "agent"
    # The arguments parse with the real CLI command, to the documented default path.
    ctx = agent_cmd.make_context("agent", argv[2:])
    assert ctx.params["config_path"] == DEFAULT_CONFIG_PATH
    assert one(unit, "Unit", "ConditionFileNotEmpty") == str(DEFAULT_CONFIG_PATH)
    # ... and the console script installs under that name.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'ctsync = "ctsync.cli.entry:main"' in pyproject


def test_capabilities_exactly_as_documented(unit: dict[str, dict[str, list[str]]]) -> None:
    bounding = set(" ".join(unit["Service"]["CapabilityBoundingSet"]).split())
    assert bounding == CAPABILITIES
    # Root keeps these through exec; ambient capabilities would only matter for a non-root
    # User=, which the unit does not set (the control socket stays root-only).
    assert "AmbientCapabilities" not in unit["Service"]
    assert "User" not in unit["Service"]
    assert "DynamicUser" not in unit["Service"]
    text = UNIT.read_text()
    for cap in CAPABILITIES:
        assert f"#   {cap}:" in text, f"{cap} has no comment saying why"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    # The man page states the same set (generated from the unit).
    man = (MAN / "ctsync.8").read_text().replace("\\-", "-").replace("\\e", "\\")
    assert " ".join(sorted(CAPABILITIES)) in " ".join(man.split())


def test_runtime_directory_holds_the_control_socket_and_fifo(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    service = unit["Service"]
    runtime = Path("/run") / one(unit, "Service", "RuntimeDirectory")
    assert DEFAULT_CONTROL_SOCKET.parent == runtime
    assert Path(DEFAULT_SOCKET).parent == runtime
    assert one(unit, "Service", "RuntimeDirectoryMode") == "0750"  # as control.py makes it
    assert one(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
    fifo_example = (ROOT / "deploy" / "keepalived" / "keepalived-notify-fifo.conf").read_text()
    assert f"vrrp_notify_fifo {runtime}/keepalived.fifo" in fifo_example
    # tmpfiles makes the same directory, same mode and owner, at boot.
    entries = [
        line.split()
        for line in TMPFILES.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert entries == [["d", str(runtime), "0750", "root", "root", "-"]]
    assert service["ReadWritePaths"] == ["-/proc/sys/net/netfilter"]


def test_hardening(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert one(unit, "Service", key) == value, key
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6", "AF_PACKET"}
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # ProcSubset=pid would hide /proc/sys, which the agent reads and writes.
    assert "ProcSubset" not in service
    # Every hardening line has a comment nearby saying why: no bare block of settings.
    lines = UNIT.read_text().splitlines()
    for key in expected:
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{key}="))
        window = lines[max(0, index - 12) : index]
        assert any(line.startswith("#") for line in window), key


def test_unit_ordering_and_no_log_rotate_restart(unit: dict[str, dict[str, list[str]]]) -> None:
    assert "conntrackd.service" in one(unit, "Unit", "Conflicts")
    assert "keepalived.service" in one(unit, "Unit", "Before")
    assert "network-online.target" in one(unit, "Unit", "After")
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert not list((ROOT / "deploy").glob("**/*logrotate*"))
    text = UNIT.read_text()
    assert "never restart ctsync to rotate a log" in text
    assert "empties the internal and\n# external caches" in text


def test_modules_load_file_names_real_modules() -> None:
    modules = [
        line.strip()
        for line in MODULES.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert modules == ["nf_conntrack", "nf_conntrack_netlink"]


def _man_tree(tmp_path: Path) -> Path:
    for section, name in (("man8", "ctsync.8"), ("man5", "ctsync.toml.5")):
        (tmp_path / "man" / section).mkdir(parents=True, exist_ok=True)
        shutil.copy(MAN / name, tmp_path / "man" / section / name)
    return tmp_path / "man"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify (no systemd as PID 1 needed). The unit's ExecStart names
    /usr/bin/ctsync, which this checkout does not install: the copy points at this venv's."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    ctsync_bin = Path(sys.executable).parent / "ctsync"
    assert ctsync_bin.exists()
    text = UNIT.read_text().replace("ExecStart=/usr/bin/ctsync", f"ExecStart={ctsync_bin}")
    copy = tmp_path / "ctsync.service"
    copy.write_text(text)
    env = {**os.environ, "MANPATH": str(_man_tree(tmp_path)), "SYSTEMD_LOG_LEVEL": "notice"}
    result = subprocess.run(
        [analyze, "verify", str(copy)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    # And it catches mistakes: an unknown setting fails the same check.
    copy.write_text(text.replace("Type=notify", "Type=notify\nWatchdogSecs=30"))
    bad = subprocess.run(
        [analyze, "verify", str(copy)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "WatchdogSecs" in bad.stderr


def test_tmpfiles_creates_the_directory(tmp_path: Path) -> None:
    tmpfiles = shutil.which("systemd-tmpfiles")
    if tmpfiles is None:
        pytest.fail("systemd-tmpfiles is missing: apt-get install systemd")
    root = tmp_path / "root"
    root.mkdir()
    result = subprocess.run(
        [tmpfiles, f"--root={root}", "--create", str(TMPFILES)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    made = root / "run" / "ctsync"
    assert made.is_dir()
    assert stat.S_IMODE(made.stat().st_mode) == 0o750


# --------------------------------------------------------------------------- man pages


def _gen_man() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_man", ROOT / "scripts" / "gen_man.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["ctsync.8", "ctsync.toml.5"])
def test_man_pages_are_generated_from_the_sources(name: str) -> None:
    gen_man = _gen_man()
    assert gen_man.PAGES[name]().encode() == (MAN / name).read_bytes(), (
        f"deploy/man/{name} is out of date: run scripts/gen_man.py"
    )


def test_ctsync_8_lists_every_command_option_and_exit_code() -> None:
    from ctsync.cli.main import cli

    page = (MAN / "ctsync.8").read_text().replace("\\-", "-")
    ctx = click.Context(cli, info_name="ctsync")
    for path, command, _ctx in _gen_man()._commands(cli, ctx, []):
        assert f'.SS "ctsync {" ".join(path)} ' in page, path
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                for opt in param.opts:
                    assert f"\\fB{opt}\\fR" in page, (path, opt)
    for code in ("0", "1", "2", "3"):
        assert f".TP\n\\fB{code}\\fR\n" in page
    for needle in ("CTSYNC_SOCKET", "/etc/ctsync/ctsync.toml", "/run/ctsync/ctsync.sock"):
        assert needle in page


def test_ctsync_toml_5_lists_every_key() -> None:
    from ctsync.config import config_keys, config_tables

    page = (MAN / "ctsync.toml.5").read_text().replace("\\-", "-")
    top = {k for k in config_tables() if "." not in k}
    for key in config_keys():
        if key not in top:
            assert f".TP\n\\fB{key}\\fR\n" in page, key


def test_doc_check_catches_a_wrong_default_and_a_missing_key() -> None:
    gen_man = _gen_man()
    doc = gen_man.CONFIG_DOC.read_text()
    wrong = doc.replace(
        "| `sync.port` | integer 1..65535 | `3780` |", "| `sync.port` | integer 1..65535 | `3781` |"
    )
    assert wrong != doc
    with pytest.raises(gen_man.GenerationError, match=r"sync\.port: docs say 3781"):
        gen_man.check_config_doc(wrong)
    lines = [line for line in doc.splitlines() if not line.startswith("| `log.level`")]
    with pytest.raises(gen_man.GenerationError, match=r"missing .*log\.level"):
        gen_man.check_config_doc("\n".join(lines))


@pytest.mark.parametrize("name", ["ctsync.8", "ctsync.toml.5"])
def test_man_pages_render_without_warnings(name: str) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.fail("groff is missing: apt-get install groff-base")
    result = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", str(MAN / name)],
        check=False,
        capture_output=True,
        timeout=60,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    assert result.returncode == 0
    assert result.stderr.decode() == ""
    text = result.stdout.decode()
    assert "ctsync" in text and len(text.splitlines()) > 50
