"""Driving the docker-compose cluster (``docker-compose.yml``) from tests and the demo.

:class:`ComposeCluster` runs one compose project (a unique name per run) of the file at the
repository root and reaches into its containers with ``docker exec``: the ``ctsync`` CLI
(``--json``), ``nft``, ``ip``. Containers are addressed by id (``compose ps -q``), so the
same code works with Debian's docker-compose 1.x (``proj_fw1_1``) and Compose v2
(``proj-fw1-1``). :class:`FlowDriver` runs ``flows.py flows`` in the client container
(``docker exec -i``) and reads its score reports.

The layout (addresses, ports) is the compose file's; ``deploy/docker/`` has the configs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
BUILD_IMAGE = ROOT / "deploy" / "docker" / "build-image.sh"
BASE_IMAGE_PREFIX = "ctsync-base:"
FLOWS = "/usr/local/lib/ctsync-docker/flows.py"

FIREWALLS = ("fw1", "fw2")
NODE_ID = {"fw1": 1, "fw2": 2}
LAN_ADDR = {"fw1": "198.51.100.2", "fw2": "198.51.100.3"}
VIP_LAN = "198.51.100.1"
VIP_WAN = "203.0.113.1"
CLIENT_ADDR = "198.51.100.10"
SERVER_ADDR = "203.0.113.10"
TCP_PORT = 5000
UDP_PORT = 5300

#: (protocol, original src, original dst, sport, dport), as in tests/linux/agents.py.
CtKey = tuple[str, str, str, int, int]


class WaitTimeoutError(AssertionError):
    """A polled condition did not hold in time."""


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.25,
    describe: Callable[[], str] | None = None,
) -> T:
    """Call *probe* until it returns something truthy; return that, or fail after *timeout*."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = probe()
        except (subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
            result, last_exc = None, exc
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = describe() if describe is not None else ""
            if last_exc is not None:
                detail += f"\nlast error: {last_exc!r}"
            raise WaitTimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")
        time.sleep(interval)


# --------------------------------------------------------------------------- environment


@functools.cache
def compose_command() -> tuple[str, ...] | None:
    """``docker compose`` (v2) if the plugin answers, else ``docker-compose`` (v1); the
    environment's ``CTSYNC_COMPOSE`` (e.g. ``docker-compose``) wins."""
    forced = os.environ.get("CTSYNC_COMPOSE", "").split()
    if forced:
        return tuple(forced)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["docker", "compose", "version"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode == 0:
            return ("docker", "compose")
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    return None


def docker_problem() -> str | None:
    """Why the compose cluster cannot run here, or None."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed (apt-get install docker.io)"
    try:
        done = subprocess.run(
            ["docker", "info"], check=False, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"docker info failed: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"no Docker daemon answers ({last}); deploy/docker/start-dockerd.sh starts one"
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    if not base_image_present():
        if shutil.which("debootstrap") is None:
            return "debootstrap is not installed and there is no ctsync-base image to build on"
        if os.geteuid() != 0:
            return "the ctsync-base image is missing and only root can debootstrap it"
    return None


def base_image_present() -> bool:
    done = subprocess.run(
        ["docker", "images", "-q", "--filter", f"reference={BASE_IMAGE_PREFIX}*"],
        capture_output=True,
        text=True,
        check=False,
    )
    return bool(done.stdout.strip())


def build_image(tag: str) -> float:
    """``deploy/docker/build-image.sh`` (base image, wheels, docker build) -> seconds."""
    started = time.monotonic()
    done = subprocess.run(
        [str(BUILD_IMAGE)],
        env={**os.environ, "CTSYNC_IMAGE": tag},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{BUILD_IMAGE} failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
            f"{done.stderr[-8000:]}"
        )
    return time.monotonic() - started


def docker(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip() or done.stdout}")
    return done


def other_clusters() -> list[str]:
    """Compose projects holding networks of this compose file (fixed subnets: one at a time)."""
    done = docker(
        "network",
        "ls",
        "--filter",
        "label=org.ctsync.cluster",
        "--format",
        '{{ .Label "com.docker.compose.project" }}',
        check=False,
    )
    return sorted({line for line in done.stdout.split() if line})


# --------------------------------------------------------------------------- the cluster


class ComposeCluster:
    """One compose project of ``docker-compose.yml``; :meth:`down` removes all of it."""

    def __init__(self, project: str, image: str) -> None:
        command = compose_command()
        if command is None:
            raise RuntimeError("no docker compose command")
        self.project = project
        self.image = image
        self.base = [*command, "-f", str(COMPOSE_FILE), "-p", project]
        self.env = {**os.environ, "CTSYNC_IMAGE": image}
        self._ids: dict[str, str] = {}

    # --- compose and docker ---------------------------------------------------------------

    def compose(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.base, *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.base)} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def up(self, *services: str) -> None:
        self.compose("up", "-d", *services)

    def down(self) -> None:
        """Everything of the project (containers, networks, the key volume), whatever state
        it is in (a paused container is unpaused first: compose v1 cannot stop it)."""
        with contextlib.suppress(Exception):
            for cid in self.compose("ps", "-q", check=False).stdout.split():
                docker("unpause", cid, check=False)
        self.compose("down", "-v", "-t", "2", "--remove-orphans", check=False, timeout=300)

    def container(self, service: str) -> str:
        if service not in self._ids:
            cid = self.compose("ps", "-q", service).stdout.strip()
            if not cid:
                raise RuntimeError(f"no container for service {service}")
            self._ids[service] = cid
        return self._ids[service]

    def network(self, name: str) -> str:
        """The docker name of the compose network *name* (``<project>_<name>``)."""
        return f"{self.project}_{name}"

    def exec(
        self, service: str, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        done = docker("exec", self.container(service), *cmd, check=False, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{service}: {' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}"
            )
        return done

    def logs(self, service: str, tail: int | None = None) -> str:
        args = ["logs", *(["--tail", str(tail)] if tail else []), self.container(service)]
        done = docker(*args, check=False)
        return done.stdout + done.stderr

    # --- ctsync inside a firewall ---------------------------------------------------------

    def ctsync(self, service: str, *args: str) -> Any:
        """``ctsync ARGS --json`` in the firewall container, parsed."""
        return json.loads(self.exec(service, "ctsync", *args, "--json").stdout)

    def status(self, service: str) -> dict[str, Any]:
        result: dict[str, Any] = self.ctsync(service, "show", "status")
        return result

    def stats(self, service: str) -> dict[str, Any]:
        result: dict[str, Any] = self.ctsync(service, "show", "statistics")
        return result

    def role(self, service: str) -> str | None:
        """The agent's failover state, or None when it cannot be asked."""
        try:
            return str(self.status(service)["state"])
        except (RuntimeError, ValueError, KeyError, subprocess.SubprocessError):
            return None

    def external(self, service: str, peer: str) -> dict[CtKey, dict[str, Any]]:
        """The firewall's external cache of *peer*'s entries, by key."""
        entries = self.ctsync(service, "show", "cache", "external")
        return {key(e): e for e in entries if e.get("peer") == NODE_ID[peer]}

    def kernel(self, service: str) -> dict[CtKey, dict[str, Any]]:
        """The firewall's kernel conntrack table (IPv4), by key."""
        return {key(e): e for e in self.ctsync(service, "show", "conntrack", "table", "ipv4")}

    def invalid_drops(self, service: str) -> int:
        """Packets the firewall's ``ct state invalid`` rules dropped (forward + input)."""
        out = self.exec(service, "nft", "-j", "list", "counters", "table", "inet", "fw").stdout
        return sum(
            int(item["counter"]["packets"])
            for item in json.loads(out)["nftables"]
            if "counter" in item
        )

    def addresses(self, service: str) -> set[str]:
        out = self.exec(service, "ip", "-o", "-4", "addr", "show").stdout
        return {line.split()[3].split("/")[0] for line in out.splitlines()}

    def holds_vips(self, service: str) -> bool:
        return {VIP_LAN, VIP_WAN} <= self.addresses(service)


def key(entry: dict[str, Any]) -> CtKey:
    orig = entry["original"]
    return (
        entry["protocol"],
        orig["src"],
        orig["dst"],
        int(orig.get("sport", 0)),
        int(orig.get("dport", 0)),
    )


def peer_stats(stats: dict[str, Any], peer: str) -> dict[str, Any]:
    """The ``peers`` item of *peer* in a statistics snapshot ({} if absent)."""
    for item in stats.get("peers", []):
        if item.get("node") == NODE_ID[peer]:
            result: dict[str, Any] = item
            return result
    return {}


def transitions_to(status: dict[str, Any], state: str, after: float) -> list[dict[str, Any]]:
    """The agent's failover transitions into *state* at or after *after* (unix time)."""
    items = (status.get("failover") or {}).get("transitions") or []
    return [t for t in items if t.get("to") == state and float(t.get("at") or 0) >= after]


# --------------------------------------------------------------------------- flows


@dataclass
class Flow:
    """One flow of a :class:`FlowDriver` report (see deploy/docker/flows.py)."""

    proto: str
    index: int
    port: int
    echoes: int = 0
    last_echo: float | None = None
    gaps: list[tuple[float, float]] = field(default_factory=list)
    reset: bool = False
    error: str | None = None
    lost: int = 0
    waiting_since: float | None = None

    def gap_since(self, since: float, now: float) -> float:
        """The longest time without an echo in [since, now], an open gap included."""
        longest = max((end - start for start, end in self.gaps if end >= since), default=0.0)
        if self.last_echo is not None:
            longest = max(longest, now - max(self.last_echo, since))
        return longest


@dataclass
class Report:
    now: float
    flows: list[Flow]

    @property
    def tcp(self) -> list[Flow]:
        return [f for f in self.flows if f.proto == "tcp"]

    @property
    def udp(self) -> list[Flow]:
        return [f for f in self.flows if f.proto == "udp"]

    def keys(self) -> set[CtKey]:
        ports = {"tcp": TCP_PORT, "udp": UDP_PORT}
        return {(f.proto, CLIENT_ADDR, VIP_LAN, f.port, ports[f.proto]) for f in self.flows}

    def broken(self) -> list[str]:
        return [
            f"{f.proto} {f.port}: {'reset' if f.reset else f.error}"
            for f in self.flows
            if f.reset or f.error
        ]

    def echoes(self) -> dict[int, int]:
        return {f.port: f.echoes for f in self.flows}


class FlowDriver:
    """``flows.py flows`` in the client container, fed commands through ``docker exec -i``."""

    def __init__(
        self, cluster: ComposeCluster, *, tcp: int, udp: int, interval: float = 0.05
    ) -> None:
        args: Sequence[str] = (
            *("--host", VIP_LAN, "--tcp-port", str(TCP_PORT), "--tcp", str(tcp)),
            *("--udp-port", str(UDP_PORT), "--udp", str(udp), "--interval", str(interval)),
        )
        self.proc = subprocess.Popen(
            ["docker", "exec", "-i", cluster.container("client"), "python3", FLOWS, "flows", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="flows-reader", daemon=True)
        self._reader.start()
        self.wait_line("CONNECTED", 30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(left, 0.01))
            except queue.Empty:
                line = ""
            if line is None:
                raise RuntimeError("the flow client exited:\n" + "\n".join(self.lines[-20:]))
            if line.startswith(prefix):
                return line
            if left <= 0:
                raise WaitTimeoutError(f"no {prefix!r} line from the flow client in {timeout}s")

    def _send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def report(self) -> Report:
        self._send("report")
        return self._parse(self.wait_line("REPORT", 10))

    def stop(self) -> Report:
        self._send("stop")
        report = self._parse(self.wait_line("REPORT", 15))
        self.close()
        return report

    @staticmethod
    def _parse(line: str) -> Report:
        data = json.loads(line.split(" ", 1)[1])
        flows = [Flow(**{**f, "gaps": [tuple(g) for g in f["gaps"]]}) for f in data["flows"]]
        return Report(float(data["now"]), flows)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
