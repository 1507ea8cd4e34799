#!/usr/bin/env python3
"""Automatic failover, ctsync vs keepalived + conntrackd, on the same site, alternating.

The issue's figure: with 100 ms adverts and 100,000 synced entries, the time from the
master's death to the backup holding the virtual addresses *with all entries committed*,
over 10 runs; and the TCP resets out of at least 20 long-lived connections per run.

Every run builds a fresh site (``tests.linux.agents.build_failover_site``: client -- LAN --
fw1/fw2 -- WAN -- server, SNAT to the WAN VIP, ``nf_conntrack_tcp_loose=0``, ``ct state
invalid`` dropped and counted, a sync segment), then:

1. starts the failover stack on fw1 and, once fw1 is master, on fw2:
   * ``ctsync``: two agents with ``failover.mechanism = "vrrp"`` (ctsync's own speaker,
     VRRPv3, 100 ms adverts, instances VI_LAN/VI_WAN, fw1 priority 200, fw2 100);
     ``--mode inject`` adds ``disable-external-cache = true`` (the backup's kernel already
     holds the state: no commit on failover);
   * ``conntrackd``: conntrackd 1.4.7 FTFW over multicast on the sync segment (the shared
     harness's config) and keepalived 2.2.7 (VRRPv3, 100 ms, ``vrrp_sync_group G1``) whose
     group notify hooks run a copy of Debian's ``primary-backup.sh`` (paths adapted, every
     conntrackd call timestamped);
2. writes N synthetic TCP ESTABLISHED entries into fw1's kernel (raw ctnetlink, documentation
   ranges) and waits until fw2 holds them (ctsync: external cache count, inject mode: fw2's
   kernel count; conntrackd: its external cache count);
3. opens >= 20 long-lived TCP flows (an echoed message every 50 ms, one thread per flow) and a
   few UDP flows from the client to the server through fw1;
4. kills the master at a random phase: SIGKILL of the ctsync agent (its speaker dies with it),
   or of keepalived's VRRP child, its parent and conntrackd (no priority-0 advert either way),
   then fw1's LAN and WAN links down;
5. measures, in fw2's namespace: when both VIPs appear (rtnetlink address events), when the
   kernel table holds N + flows entries (``nf_conntrack_count`` polled every 2 ms), when the
   daemon says the commit ended (ctsync: the MASTER transition's ``commit`` step in ``show
   status``; conntrackd: the notify script's timestamp after ``conntrackd -c`` returned);
   per flow the resets and the longest gap between two echoes; fw2's invalid-packet drops.

"takeover" = death -> max(both VIPs on fw2, all entries committed). Results:
``bench/results/failover-<timestamp>/results.json`` (every run, raw), ``summary.md`` (the
table printed at the end), and per run the daemons' logs and configs.

Run as root from the project root (a run takes 15-25 s; --runs 10 of both about 6 min)::

    sudo .venv/bin/python bench/failover_bench.py                      # 10 runs, 100k entries
    sudo .venv/bin/python bench/failover_bench.py --runs 2 --entries 20000   # a quick check
    sudo .venv/bin/python bench/failover_bench.py --systems ctsync --mode inject
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from tests.linux.agents import (  # noqa: E402
    SERVER_ADDR,
    SYNC_IF,
    SYNC_PREFIX,
    VIP_LAN,
    VIP_WAN,
    FailoverSite,
    build_failover_site,
    tcp_progress,
)
from tests.linux.failover_site import (  # noqa: E402
    CountWatch,
    FlowClient,
    FlowReport,
    Keepalived,
    VipWatch,
    conntrack_count,
    create_entries,
    failover_status,
    holds_vips,
    master_transition,
    primary_backup_script,
    script_log,
    step_end,
    vrrp_tables,
    wait_for,
    write_ctsync_config,
)
from tests.linux.netns import NamespaceFactory, traffic_cmd  # noqa: E402

TCP_PORT = 5000
UDP_PORT = 5300
PAYLOAD = 14  # bytes per echo of the flow client ("%04d %08d\n")
VIPS = (VIP_LAN, VIP_WAN)


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# --------------------------------------------------------------------------- conntrackd

# The shared harness's FTFW config (/work/shared/bench/conntrackd_bench.py), on the site's
# sync segment; the sync subnet is ignored (its traffic is notrack anyway).
CONNTRACKD_CONF = """Sync {{
	Mode FTFW {{
		ResendQueueSize 131072
		DisableExternalCache Off
	}}
	Multicast {{
		IPv4_address 225.0.0.50
		Group 3780
		IPv4_interface {ip}
		Interface {iface}
		SndSocketBuffer 1249280
		RcvSocketBuffer 1249280
		Checksum on
	}}
}}
General {{
	Systemd off
	HashSize 32768
	HashLimit 1048576
	LogFile {workdir}/{node}.log
	Syslog off
	LockFile {workdir}/{node}.lock
	UNIX {{
		Path {workdir}/{node}.ctl
	}}
	NetlinkBufferSize 2097152
	NetlinkBufferSizeMaxGrowth 8388608
	NetlinkOverrunResync On
	Filter From Userspace {{
		Address Ignore {{
			IPv4_address 127.0.0.1
			IPv6_address ::1
			IPv4_address {sync_net}
		}}
	}}
}}
"""

CTD_STATS = 21


def conntrackd_request(path: Path, code: int, timeout: float = 10.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.send(struct.pack("=i", code))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def conntrackd_counts(path: Path) -> tuple[int, int]:
    """(internal, external) "current active connections" of a conntrackd."""
    text = conntrackd_request(path, CTD_STATS)
    found = {}
    for name in ("internal", "external"):
        head = text.split(f"cache {name}:", 1)[1]
        found[name] = int(head.split("current active connections:", 1)[1].split()[0])
    return found["internal"], found["external"]


class System:
    """One failover stack on the site (subclasses: conntrackd, ctsync)."""

    name = ""

    def __init__(self, site: FailoverSite, workdir: Path, args: argparse.Namespace) -> None:
        self.site, self.workdir, self.args = site, workdir, args

    def start(self) -> None:
        raise NotImplementedError

    def synced(self) -> int:
        """How many entries fw2 holds for a failover (external cache, or kernel)."""
        raise NotImplementedError

    def crash(self) -> float:
        """Kill fw1's stack (no goodbye), take its links down; return the death time."""
        raise NotImplementedError

    def committed(self, death: float) -> tuple[float | None, dict[str, Any]]:
        """When the daemon finished the commit after *death* (unix time), and details."""
        raise NotImplementedError

    def save_logs(self) -> None:
        raise NotImplementedError

    def flaps(self, before: float) -> int:
        """Times fw2 became master before *before* (fw1 alive: a VRRP flap)."""
        raise NotImplementedError

    def links_down(self) -> None:
        self.site.links(1, "down")


class Conntrackd(System):
    name = "conntrackd"

    def __init__(self, site: FailoverSite, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(site, workdir, args)
        self.procs: dict[int, Any] = {}
        self.keepalived: dict[int, Keepalived] = {}

    def conf(self, node: int) -> Path:
        return self.workdir / f"fw{node}.conf"

    def ctl(self, node: int) -> Path:
        return self.workdir / f"fw{node}.ctl"

    def script_log(self, node: int) -> Path:
        return self.workdir / f"fw{node}-notify.log"

    def start(self) -> None:
        for node in (1, 2):
            self.conf(node).write_text(
                CONNTRACKD_CONF.format(
                    ip=f"{SYNC_PREFIX}{node}",
                    iface=SYNC_IF,
                    workdir=self.workdir,
                    node=f"fw{node}",
                    sync_net=f"{SYNC_PREFIX}0/24",
                )
            )
            self.procs[node] = self.site.fw(node).popen(["conntrackd", "-C", str(self.conf(node))])
        for node in (1, 2):
            ctl = self.ctl(node)
            wait_for(lambda: conntrackd_counts(ctl), 15, f"conntrackd fw{node}")  # noqa: B023
        for node in (1, 2):
            script = primary_backup_script(
                self.workdir,
                self.conf(node),
                self.workdir / f"fw{node}.lock",
                self.script_log(node),
            )
            self.keepalived[node] = Keepalived(
                self.site.fw(node), node, self.workdir, notify_script=script
            )
            self.keepalived[node].start()
            if node == 1:
                wait_for(lambda: holds_vips(self.site, 1), 15, "fw1 to become VRRP master")
                wait_for(lambda: self._script_done(1, "primary", "-B"), 30, "fw1 primary script")
        wait_for(lambda: self._script_done(2, "backup", "-n"), 30, "fw2 backup script")
        if holds_vips(self.site, 2):
            raise RuntimeError("fw2 holds the VIPs too: dual master")

    def _script_done(self, node: int, arg: str, last: str) -> bool:
        lines = [text for _, text in script_log(self.script_log(node))]
        if f"notify {arg}" not in lines:
            return False
        after = lines[lines.index(f"notify {arg}") :]
        return any(t.startswith("end ") and f" {last} " in f" {t} " for t in after)

    def synced(self) -> int:
        return conntrackd_counts(self.ctl(2))[1]

    def crash(self) -> float:
        death = self.keepalived[1].crash()
        proc = self.procs[1]
        os.kill(proc.pid, 9)
        proc.wait(10)
        self.links_down()
        return death

    def committed(self, death: float) -> tuple[float | None, dict[str, Any]]:
        events = [(t, text) for t, text in script_log(self.script_log(2)) if t >= death]
        detail: dict[str, Any] = {"script": [(round(t - death, 4), text) for t, text in events]}
        for t, text in events:
            if text.startswith("end ") and " -c " in f" {text} ":
                return t, detail
        return None, detail

    def flaps(self, before: float) -> int:
        return sum(
            1
            for t, text in script_log(self.script_log(2))
            if text == "notify primary" and t < before
        )

    def save_logs(self) -> None:
        for node, ka in self.keepalived.items():
            (self.workdir / f"keepalived-fw{node}.log").write_text(ka.output())


class Ctsync(System):
    name = "ctsync"

    def __init__(self, site: FailoverSite, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(site, workdir, args)
        self.inject = args.mode == "inject"
        self.name = "ctsync-inject" if self.inject else "ctsync"

    def start(self) -> None:
        cluster = self.site.cluster
        sync: dict[str, Any] = {
            "event-listen-queue-size": 64,
            "event-listen-queue-max": 128,
        }
        if self.inject:
            sync["disable-external-cache"] = True
        for node in (1, 2):
            write_ctsync_config(
                cluster,
                node,
                failover={"mechanism": "vrrp"},
                vrrp=vrrp_tables(node),
                vrrp_group="G1",
                sync=sync,
            )
        cluster.start(1, wait=False)
        wait_for(lambda: holds_vips(self.site, 1), 15, "fw1 to become VRRP master")
        cluster.start(2)
        wait_for(lambda: failover_status(cluster, 2).get("state") == "BACKUP", 15, "fw2 BACKUP")
        if holds_vips(self.site, 2):
            raise RuntimeError("fw2 holds the VIPs too: dual master")

    def synced(self) -> int:
        if self.inject:
            return conntrack_count(self.site.fw(2).name)
        return int(self.site.cluster.query(2, "counts")["external"])

    def crash(self) -> float:
        node = self.site.cluster[1]
        assert node.proc is not None
        death = time.time()
        self.site.cluster.kill(1)
        self.links_down()
        return death

    def committed(self, death: float) -> tuple[float | None, dict[str, Any]]:
        status = failover_status(self.site.cluster, 2)
        transition = master_transition(status, death - 0.001)
        detail: dict[str, Any] = {"transition": transition, "state": status.get("state")}
        if transition is None:
            return None, detail
        if self.inject:
            # The state was in fw2's kernel before the death: nothing to commit.
            end = step_end(transition, "commit")
            return (end if end is not None else death), detail
        return step_end(transition, "commit"), detail

    def flaps(self, before: float) -> int:
        transitions = failover_status(self.site.cluster, 2).get("transitions") or []
        return sum(1 for t in transitions if t.get("to") == "MASTER" and t["at"] < before)

    def save_logs(self) -> None:
        for node in (1, 2):
            (self.workdir / f"ctsync-fw{node}.log").write_text(self.site.cluster.output(node))


SYSTEMS: dict[str, Callable[[FailoverSite, Path, argparse.Namespace], System]] = {
    "conntrackd": Conntrackd,
    "ctsync": Ctsync,
}


# --------------------------------------------------------------------------- one run


@dataclass
class Timeline:
    death: float
    vip: float | None = None
    kernel: float | None = None
    committed: float | None = None

    def rel(self, t: float | None) -> float | None:
        return None if t is None else round(t - self.death, 4)


def one_run(system_name: str, index: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    workdir = out / f"run{index:02d}-{system_name}"
    workdir.mkdir(parents=True)
    result: dict[str, Any] = {"system": system_name, "run": index, "entries": args.entries}
    with NamespaceFactory() as factory:
        site = build_failover_site(
            factory, workdir, sync={"alive-interval": 0.2, "peer-dead-after": 1.0}
        )
        site.del_vips(1)  # the VRRP master adds them
        server = site.server.start(traffic_cmd("tcp-echo-server", "--port", str(TCP_PORT)))
        site.server.start(traffic_cmd("udp-echo-server", "--port", str(UDP_PORT)))
        system = SYSTEMS[system_name](site, workdir, args)
        result["system"] = system.name
        try:
            result.update(measure(system, site, args))
            accepts = {line.split()[2] for line in server.lines if line.startswith("ACCEPT")}
            result["server_saw"] = sorted(accepts)
        except Exception as exc:
            result["failed"] = f"{type(exc).__name__}: {exc}"
            (workdir / "error.txt").write_text(traceback.format_exc())
            log(f"  run {index} {system.name} FAILED: {result['failed']}")
        finally:
            system.save_logs()
    (workdir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def measure(system: System, site: FailoverSite, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    system.start()
    started = time.monotonic() - t0
    fw1, fw2 = site.fw(1).name, site.fw(2).name
    t1 = time.monotonic()
    failed = create_entries(fw1, args.entries)
    inserted = time.monotonic() - t1
    if failed:
        raise RuntimeError(f"{failed} synthetic creates failed in fw1")
    flows = FlowClient(
        site.client,
        SERVER_ADDR,
        tcp_port=TCP_PORT,
        tcp=args.flows,
        udp_port=UDP_PORT,
        udp=args.udp,
        interval=0.05,
    )
    want = args.entries + args.flows + args.udp
    wait_for(lambda: system.synced() >= want, args.sync_timeout, f"fw2 to hold {want} entries")
    synced_after = time.monotonic() - t1
    time.sleep(0.5)  # flows' latest TCP state (window, ASSURED) reaches fw2 too

    target = args.entries + args.flows  # fw2's own few entries make this a safe lower bound
    vip_watch = VipWatch(fw2)
    count_watch = CountWatch(fw2, target)
    invalid_before = site.invalid_drops(2)
    time.sleep(random.uniform(0.2, 0.2 + 2 * args.advert))  # random phase vs the adverts
    flaps = system.flaps(time.time())
    line = Timeline(system.crash())
    # fw1 forwards until its links are down (in crash()): count progress from here on.
    flows.mark()
    before = tcp_progress(site.client, SERVER_ADDR, TCP_PORT)
    try:
        wait_for(
            lambda: vip_watch.first(VIPS) is not None and count_watch.reached is not None,
            args.takeover_timeout,
            "fw2 to hold the VIPs and the entries",
            interval=0.01,
        )
    except TimeoutError as exc:
        log(f"  {exc}")

    def all_moved() -> bool:
        now = tcp_progress(site.client, SERVER_ADDR, TCP_PORT)
        return len(now) == len(before) and all(
            now.get(port, 0) >= before[port] + 5 * PAYLOAD for port in before
        )

    try:
        wait_for(all_moved, args.flow_timeout, "every TCP flow to carry on", interval=0.1)
    except TimeoutError as exc:
        log(f"  {exc}")
    report: FlowReport = flows.stop()
    line.vip = vip_watch.first(VIPS)
    at_vip = [vip_watch.count_at.get(a) for a in VIPS]
    kernel_at_vip = None if None in at_vip else min(c for c in at_vip if c is not None)
    line.kernel = count_watch.reached
    vip_watch.close()
    count_watch.close()
    committed, detail = wait_committed(system, line.death)
    line.committed = committed
    ends = [t for t in (line.vip, line.committed) if t is not None]
    takeover = max(ends) if len(ends) == 2 else None
    return {
        "setup": {
            "start_s": round(started, 3),
            "insert_s": round(inserted, 3),
            "synced_s": round(synced_after, 3),
        },
        "death": line.death,
        "vip_s": line.rel(line.vip),
        "committed_s": line.rel(line.committed),
        "kernel_holds_s": line.rel(line.kernel),
        "takeover_s": line.rel(takeover),
        # fw2's table size read the moment the VIPs appeared; target = N + TCP flows
        "kernel_at_vip": kernel_at_vip,
        "state_before_vip": kernel_at_vip is not None and kernel_at_vip >= target,
        "invalid_drops": site.invalid_drops(2) - invalid_before,
        "flaps_before_death": flaps,
        "flows": report.summary(),
        "flow_detail": [
            {
                "port": f.port,
                "proto": f.proto,
                "max_gap": round(f.max_gap, 4),
                "reset": f.reset,
                "error": f.error,
                "after_mark": f.echoes_after_mark,
                "first_after_death": None
                if f.first_after_mark is None
                else round(f.first_after_mark - line.death, 4),
            }
            for f in report.flows
        ],
        "daemon": detail,
    }


def wait_committed(system: System, death: float) -> tuple[float | None, dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        committed, detail = system.committed(death)
        if committed is not None or time.monotonic() > deadline:
            return committed, detail
        time.sleep(0.1)


# --------------------------------------------------------------------------- report


def stat3(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    missing = len(values) - len(vals)
    text = f"{min(vals):.3f} / {statistics.median(vals):.3f} / {max(vals):.3f}"
    return text + (f" ({missing} n/a)" if missing else "")


def int3(values: Sequence[int]) -> str:
    if not values:
        return "n/a"
    return f"{min(values)} / {statistics.median(values):g} / {max(values)} (sum {sum(values)})"


ROWS: list[tuple[str, Callable[[list[dict[str, Any]]], str]]] = [
    (
        "runs ok / failed",
        lambda rs: f"{sum('failed' not in r for r in rs)} / {sum('failed' in r for r in rs)}",
    ),
    ("death -> both VIPs on fw2, s", lambda rs: stat3([r.get("vip_s") for r in ok(rs)])),
    (
        "death -> commit done (daemon/script), s",
        lambda rs: stat3([r.get("committed_s") for r in ok(rs)]),
    ),
    (
        "death -> fw2 kernel holds N+flows, s",
        lambda rs: stat3([r.get("kernel_holds_s") for r in ok(rs)]),
    ),
    (
        "**takeover: VIPs + all committed, s**",
        lambda rs: stat3([r.get("takeover_s") for r in ok(rs)]),
    ),
    (
        "VIPs appeared with every entry already in fw2's kernel",
        lambda rs: f"{sum(r['state_before_vip'] for r in ok(rs))} of {len(ok(rs))} runs",
    ),
    ("TCP resets per run", lambda rs: int3([r["flows"]["resets"] for r in ok(rs)])),
    (
        "TCP flows resumed / total",
        lambda rs: (
            ", ".join(f"{r['flows']['tcp_resumed']}/{r['flows']['tcp_flows']}" for r in ok(rs))
            or "n/a"
        ),
    ),
    ("longest stall of any flow, s", lambda rs: stat3([r["flows"]["longest_gap"] for r in ok(rs)])),
    (
        "median flow's longest stall, s",
        lambda rs: stat3([r["flows"]["median_flow_gap"] for r in ok(rs)]),
    ),
    ("invalid drops on fw2", lambda rs: int3([r["invalid_drops"] for r in ok(rs)])),
    (
        "fw2 became master while fw1 was alive (flaps)",
        lambda rs: int3([r["flaps_before_death"] for r in ok(rs)]),
    ),
    (
        "UDP flows resumed / total",
        lambda rs: (
            ", ".join(f"{r['flows']['udp_resumed']}/{r['flows']['udp_flows']}" for r in ok(rs))
            or "n/a"
        ),
    ),
    (
        "setup: N into fw1 + synced to fw2, s",
        lambda rs: stat3([r["setup"]["synced_s"] for r in ok(rs)]),
    ),
]


def ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if "failed" not in r]


def summary(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    systems: list[str] = []
    for r in results:
        if r["system"] not in systems:
            systems.append(r["system"])
    by = {s: [r for r in results if r["system"] == s] for s in systems}
    head = "| min / median / max | " + " | ".join(systems) + " |"
    lines = [
        f"Failover: {args.entries} synced entries, {args.flows} TCP + {args.udp} UDP flows,"
        f" VRRPv3 adverts {args.advert * 1000:.0f} ms, {len(by[systems[0]]) if systems else 0}"
        " runs per system (alternating)",
        "",
        head,
        "|---|" + "---|" * len(systems),
    ]
    for label, fn in ROWS:
        lines.append(f"| {label} | " + " | ".join(fn(by[s]) for s in systems) + " |")
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    def cmd(*argv: str) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (
            (proc.stdout + proc.stderr).strip().splitlines()[0]
            if (proc.stdout + proc.stderr).strip()
            else ""
        )

    git = subprocess.run(
        ["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "keepalived": cmd("keepalived", "--version"),
        "conntrackd": cmd("conntrackd", "-v"),
        "python": sys.version.split()[0],
        "git": git,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10, help="runs per system (default 10)")
    parser.add_argument("--entries", type=int, default=100_000, help="synthetic synced entries")
    parser.add_argument("--systems", default="ctsync,conntrackd", help="comma-separated")
    parser.add_argument(
        "--mode",
        choices=["external", "inject"],
        default="external",
        help="ctsync: external cache committed on failover (default), or inject"
        " (disable-external-cache: the backup's kernel already holds the state)",
    )
    parser.add_argument("--flows", type=int, default=20, help="long-lived TCP flows (>= 20)")
    parser.add_argument("--udp", type=int, default=4, help="UDP flows")
    parser.add_argument("--advert", type=float, default=0.1, help=argparse.SUPPRESS)
    parser.add_argument("--sync-timeout", type=float, default=120.0)
    parser.add_argument("--takeover-timeout", type=float, default=20.0)
    parser.add_argument("--flow-timeout", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root (network namespaces)")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}: {', '.join(SYSTEMS)}")
    random.seed(args.seed)
    out = args.out or PROJECT / "bench" / "results" / time.strftime("failover-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / "env.json").write_text(json.dumps(env, indent=1))
    log(f"results in {out}; {env['kernel']}, load {env['loadavg_start']}")
    results: list[dict[str, Any]] = []
    for index in range(args.runs):
        order = systems if index % 2 == 0 else list(reversed(systems))
        for name in order:
            log(f"run {index + 1}/{args.runs} {name}")
            r = one_run(name, index, out, args)
            r["loadavg"] = os.getloadavg()[0]
            results.append(r)
            if "failed" not in r:
                f = r["flows"]
                log(
                    f"  vip {r['vip_s']}s committed {r['committed_s']}s"
                    f" kernel {r['kernel_holds_s']}s"
                    f" takeover {r['takeover_s']}s; resets {f['resets']}, resumed"
                    f" {f['tcp_resumed']}/{f['tcp_flows']}, longest stall {f['longest_gap']:.3f}s,"
                    f" invalid drops {r['invalid_drops']}"
                )
            (out / "results.json").write_text(
                json.dumps(
                    {"args": vars(args) | {"out": str(out)}, "env": env, "runs": results}, indent=1
                )
            )
    text = summary(results, args)
    (out / "summary.md").write_text(text)
    print()
    print(text)
    print(f"results: {out}")
    return 0 if all("failed" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
