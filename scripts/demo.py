#!/usr/bin/env python3
"""ctsync demo: a firewall pair loses its master under a live TCP stream, and nobody notices.

With Docker (``make demo`` installs it and starts dockerd when it can): the docker-compose
cluster of ``docker-compose.yml`` -- client, two firewalls running ctsync with its own VRRP
speaker, server; the client's traffic forwarded and SNATed by the master, strict TCP
tracking. Without Docker: the same site in network namespaces (tests/linux helpers).

The demo opens a TCP echo stream (an echo every 50 ms) from the client to the server and
prints it live; kills the master (SIGKILL: no goodbye); the backup commits the synced
connections into its kernel, then takes the virtual addresses; the stream carries on on
the same connection after a fraction of a second. The old master comes back as backup and
resyncs; the statistics of both nodes are printed (``ctsync show statistics``, the
``conntrackd -s`` layout); everything is torn down, whatever happens. Needs root.

    python scripts/demo.py [--docker | --netns]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FLOWS_PY = ROOT / "deploy" / "docker" / "flows.py"
STREAM_ARGS = ("--every", "0.5", "--interval", "0.05")


def banner(text: str) -> None:
    print(f"\n== {time.strftime('%H:%M:%S')}  {text}", flush=True)


class Tail:
    """Prints the new lines of a growing list (a process's output) with a prefix, live."""

    def __init__(self, lines: Callable[[], list[str]], prefix: str) -> None:
        self.lines = lines
        self.prefix = prefix
        self.shown = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.flush()

    def flush(self) -> None:
        lines = self.lines()
        for line in lines[self.shown :]:
            print(f"{self.prefix}{line}", flush=True)
        self.shown = len(lines)

    def stop(self) -> None:
        """Print what is left and stop (later lines are not printed)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(1)
        self.flush()


class StreamProcess:
    """A command whose merged output is collected line by line by a thread."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def summary(lines: list[str]) -> str:
    resets = sum("RESET" in line or "BROKEN" in line for line in lines)
    gaps = [line for line in lines if "back after" in line]
    return (
        f"the stream: {'NO reset' if not resets else f'{resets} resets'}, one connection"
        f" throughout; pauses: {[g.split('back after ')[1].split(' s')[0] + ' s' for g in gaps]}"
    )


# --------------------------------------------------------------------------- Docker


def docker_demo() -> int:
    from tests.e2e.compose import (
        FLOWS,
        VIP_LAN,
        ComposeCluster,
        build_image,
        compose_command,
        docker,
        other_clusters,
        wait_until,
    )

    tag = os.environ.get("CTSYNC_IMAGE", "ctsync:local")
    banner(f"building {tag}: a debootstrapped Debian + ctsync's wheel (no registry; cached)")
    print(f"built in {build_image(tag):.1f}s")
    busy = other_clusters()
    if busy:
        compose = " ".join(compose_command() or ("docker-compose",))
        print(f"another ctsync cluster holds the subnets: {compose} -p {busy[0]} down -v")
        return 1
    cluster = ComposeCluster(f"ctsync-demo-{secrets.token_hex(3)}", tag)
    stream: StreamProcess | None = None
    tail: Tail | None = None
    try:
        banner(f"{' '.join(cluster.base[:-4])} up: fw1 (becomes VRRP master), fw2, server, client")
        cluster.up("fw1", "server")
        wait_until(lambda: cluster.role("fw1") == "MASTER", 30, "fw1 to become MASTER")
        cluster.up()
        wait_until(lambda: cluster.role("fw2") == "BACKUP", 30, "fw2 to come up as BACKUP")
        for fw in ("fw1", "fw2"):
            holds = "holds the VIPs" if cluster.holds_vips(fw) else "no VIPs"
            print(f"{fw}: {cluster.role(fw)}, {holds}")

        banner(f"client -> {VIP_LAN}:5000 (forwarded to the server, SNATed): an echo every 50 ms")
        stream = StreamProcess(
            [
                *("docker", "exec", cluster.container("client"), "python3", FLOWS, "stream"),
                *("--host", VIP_LAN, "--port", "5000", *STREAM_ARGS),
            ]
        )
        tail = Tail(lambda: stream.lines if stream else [], "   client | ")
        time.sleep(3.5)
        banner("docker kill fw1: the master dies (SIGKILL, no goodbye)")
        docker("kill", cluster.container("fw1"))
        wait_until(lambda: cluster.role("fw2") == "MASTER", 15, "fw2 to become MASTER")
        time.sleep(3)
        tail.stop()
        banner("ctsync show status   (inside fw2: the takeover, step by step)")
        print(cluster.exec("fw2", "ctsync", "show", "status").stdout)
        banner("docker start fw1: it comes back as backup and asks fw2 for its table")
        docker("start", cluster.container("fw1"))
        wait_until(lambda: cluster.role("fw1") == "BACKUP", 30, "fw1 to rejoin as BACKUP")
        time.sleep(2)
        print(f"fw1: {cluster.role('fw1')}, fw2: {cluster.role('fw2')}")
        for fw in ("fw2", "fw1"):
            banner(f"ctsync show statistics   (inside {fw})")
            print(cluster.exec(fw, "ctsync", "show", "statistics").stdout)
        print(summary(stream.lines))
        return 0
    finally:
        if tail is not None:
            tail.stop()
        if stream is not None:
            stream.stop()
        banner("down -v: containers, networks and the key volume removed")
        cluster.down()


# --------------------------------------------------------------------------- namespaces


def netns_demo() -> int:
    from tests.linux.agents import SERVER_ADDR, build_failover_site, wait_until
    from tests.linux.failover_site import (
        VRRP_GROUP,
        failover_status,
        holds_vips,
        vrrp_tables,
        write_ctsync_config,
    )
    from tests.linux.netns import NamespaceFactory, install_sigterm_handler, traffic_cmd

    install_sigterm_handler()
    with tempfile.TemporaryDirectory() as tmp, NamespaceFactory() as factory:
        banner("network namespaces: client -- fw1/fw2 (ctsync + its VRRP speaker) -- server")
        site = build_failover_site(factory, Path(tmp))
        site.del_vips(1)  # VRRP places them
        cluster = site.cluster
        site.server.start(traffic_cmd("tcp-echo-server", "--port", "5000"))
        for node_id in (1, 2):
            tables = vrrp_tables(node_id)
            for table in tables:
                table["priority"] = 100  # as in the compose cluster: no preemption back
            write_ctsync_config(
                cluster, node_id, failover={"mechanism": "vrrp"}, vrrp=tables, vrrp_group=VRRP_GROUP
            )

        def role(node_id: int) -> object:
            return failover_status(cluster, node_id).get("state")

        cluster.start(1, wait=False)
        wait_until(lambda: holds_vips(site, 1), 15, "fw1 to take the VIPs")
        cluster.start(2)
        wait_until(lambda: role(2) == "BACKUP", 15, "fw2 to come up as BACKUP")
        print(f"fw1: {role(1)}, fw2: {role(2)}")

        banner(f"client -> {SERVER_ADDR}:5000 through the VIP, SNATed: an echo every 50 ms")
        stream = site.client.popen(
            [
                *(sys.executable, "-u", str(FLOWS_PY), "stream"),
                *("--host", SERVER_ADDR, "--port", "5000", *STREAM_ARGS),
            ]
        )
        tail = Tail(lambda: stream.lines, "   client | ")
        try:
            time.sleep(3.5)
            banner("kill -9 fw1's agent, links down: the master dies")
            cluster.kill(1)
            site.links(1, "down")
            wait_until(lambda: role(2) == "MASTER", 15, "fw2 to become MASTER")
            time.sleep(3)
        finally:
            tail.stop()
        banner("ctsync show status   (fw2: the takeover, step by step)")
        print(cluster.cli(2, "show", "status").stdout)
        banner("fw1 comes back: links up, agent started: backup, resync from fw2")
        site.links(1, "up")
        cluster.start(1)
        wait_until(lambda: role(1) == "BACKUP", 20, "fw1 to rejoin as BACKUP")
        time.sleep(2)
        for node_id in (2, 1):
            banner(f"ctsync show statistics   (fw{node_id})")
            print(cluster.cli(node_id, "show", "statistics").stdout)
        print(summary(stream.lines))
        banner("namespaces and processes removed")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--docker", action="store_true", help="the compose cluster, or fail")
    mode.add_argument("--netns", action="store_true", help="network namespaces only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo needs root (Docker's networks or network namespaces)", file=sys.stderr)
        return 1
    if not args.netns:
        from tests.e2e.compose import docker_problem

        problem = docker_problem()
        if problem is None:
            return docker_demo()
        if args.docker:
            print(f"Docker is not usable: {problem}", file=sys.stderr)
            return 1
        print(f"Docker is not usable ({problem}): the same cluster in network namespaces")
    return netns_demo()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
