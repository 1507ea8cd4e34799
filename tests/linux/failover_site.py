"""Automatic failover in namespaces: VRRP/keepalived on the failover site, flows that keep score.

Builds on :func:`tests.linux.agents.build_failover_site` (client -- fw1/fw2 -- server, SNAT to
the WAN VIP, strict TCP tracking, invalid packets dropped and counted) and adds what an
*automatic* failover needs, for ``tests/linux/test_failover.py`` and ``bench/failover_bench.py``:

- ctsync configs with ``[failover]`` and ``[[vrrp.instance]]`` tables (:func:`write_ctsync_config`);
- keepalived in a firewall namespace (:class:`Keepalived`): one ``vrrp_sync_group G1`` over a
  LAN and a WAN instance, 100 ms VRRPv3 adverts, notify hooks and/or the notify FIFO; killed
  the way a crash looks (VRRP child first, no priority-0 advert);
- a flow client that keeps score per flow (:class:`FlowClient`, the ``flow-client`` command
  of this module): each TCP flow runs in its own thread (a stalled flow does not hold up the
  others, unlike ``traffic.py tcp-client``), echoes a message every 50 ms and records resets,
  errors, the longest gap between two echoes, and the echoes after a mark (the failover);
  UDP flows the same with a per-datagram timeout;
- observers in the new master's namespace: :class:`VipWatch` (rtnetlink address events: when
  a VIP appears) and :class:`CountWatch` (``nf_conntrack_count`` polled every 2 ms: when the
  table holds N entries);
- :func:`create_entries`: N synthetic ESTABLISHED entries (documentation ranges) written
  into a kernel table with batched raw ctnetlink creates (``conntrack -R`` is too slow for
  100,000).

Run as a program (inside a namespace) for the client::

    python -m tests.linux.failover_site flow-client --host H --tcp-port P --tcp 20 \\
        --udp-port U --udp 4 [--interval 0.05]

It prints ``CONN <port>`` / ``UDP <port>`` per flow and ``CONNECTED <n>``, then reads
commands on stdin: ``mark`` (answers ``MARKED <unix time>``) and ``stop`` (answers
``REPORT <json>`` and exits).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- VRRP layout

#: (name, interface, VRID, VIP/prefix) of the two instances of sync group G1.
VRRP_GROUP = "G1"
VRRP_ADVERT = 0.1
VRRP_PRIORITY = {1: 200, 2: 100}


def vrrp_instances() -> list[tuple[str, str, int, str]]:
    from tests.linux.agents import LAN_IF, VIP_LAN, VIP_WAN, WAN_IF

    return [
        ("VI_LAN", LAN_IF, 51, f"{VIP_LAN}/24"),
        ("VI_WAN", WAN_IF, 52, f"{VIP_WAN}/24"),
    ]


# --------------------------------------------------------------------------- flow client


@dataclass
class FlowRecord:
    """One flow's score, as reported by the client (times are unix time)."""

    proto: str
    index: int
    port: int = 0
    echoes: int = 0
    echoes_after_mark: int = 0
    first_after_mark: float | None = None
    max_gap: float = 0.0
    max_gap_end: float | None = None
    last_echo: float | None = None
    reset: bool = False
    error: str | None = None
    lost: int = 0  # UDP: datagrams without an echo in time
    stalled: bool = False  # still waiting for an echo when the client stopped


class _Flows:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stop = threading.Event()
        self.mark = float("inf")
        self.lock = threading.Lock()
        self.records: list[FlowRecord] = []
        self.waiting: dict[int, bool] = {}

    def echoed(self, rec: FlowRecord, at: float, since: float) -> None:
        with self.lock:
            gap = at - since
            if gap > rec.max_gap:
                rec.max_gap, rec.max_gap_end = gap, at
            rec.last_echo = at
            rec.echoes += 1
            if at >= self.mark:
                rec.echoes_after_mark += 1
                if rec.first_after_mark is None:
                    rec.first_after_mark = at

    def pace(self, next_at: float) -> float:
        """Sleep until *next_at* (monotonic); after a stall, restart the beat (no burst)."""
        now = time.monotonic()
        if next_at < now:
            return now + self.interval
        self.stop.wait(next_at - now)
        return next_at + self.interval


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            raise EOFError("peer closed the connection")
        got += chunk
    return got


def _tcp_flow(flows: _Flows, rec: FlowRecord, sock: socket.socket) -> None:
    last = time.time()
    next_at = time.monotonic()
    n = 0
    while not flows.stop.is_set():
        payload = f"{rec.index:04d} {n:08d}\n".encode()
        flows.waiting[rec.index] = True
        try:
            sock.sendall(payload)
            if _recv_exact(sock, len(payload)) != payload:
                rec.error = "echo mismatch"
                break
        except (ConnectionResetError, BrokenPipeError):
            rec.reset = True
            break
        except (OSError, EOFError) as exc:
            if flows.stop.is_set():
                break
            rec.error = f"{type(exc).__name__}: {exc}"
            break
        finally:
            flows.waiting[rec.index] = False
        now = time.time()
        flows.echoed(rec, now, last)
        last = now
        n += 1
        next_at = flows.pace(next_at)


def _udp_flow(flows: _Flows, rec: FlowRecord, sock: socket.socket) -> None:
    last = time.time()
    next_at = time.monotonic()
    n = 0
    sock.settimeout(max(flows.interval * 4, 0.2))
    while not flows.stop.is_set():
        payload = f"u{rec.index:03d} {n:08d}".encode()
        try:
            sock.send(payload)
            while True:  # skip late echoes of earlier datagrams
                data = sock.recv(2048)
                if data == payload:
                    break
        except TimeoutError:
            rec.lost += 1
            n += 1
            next_at = flows.pace(next_at)
            continue
        except OSError as exc:  # e.g. ICMP unreachable as ECONNREFUSED
            rec.lost += 1
            rec.error = f"{type(exc).__name__}: {exc}"
            n += 1
            next_at = flows.pace(next_at)
            continue
        now = time.time()
        flows.echoed(rec, now, last)
        last = now
        n += 1
        next_at = flows.pace(next_at)


def flow_client_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="failover_site flow-client")
    parser.add_argument("--host", required=True)
    parser.add_argument("--tcp-port", type=int, default=0)
    parser.add_argument("--tcp", type=int, default=20, help="TCP flows")
    parser.add_argument("--udp-port", type=int, default=0)
    parser.add_argument("--udp", type=int, default=0, help="UDP flows")
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--recv-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    flows = _Flows(args.interval)
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []
    starts: list[tuple[Callable[[_Flows, FlowRecord, socket.socket], None], FlowRecord]] = []
    for i in range(args.tcp):
        sock = socket.create_connection((args.host, args.tcp_port), timeout=10)
        sock.settimeout(args.recv_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rec = FlowRecord("tcp", i, sock.getsockname()[1])
        print("CONN", rec.port, flush=True)
        socks.append(sock)
        starts.append((_tcp_flow, rec))
    for i in range(args.udp):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((args.host, args.udp_port))
        rec = FlowRecord("udp", i, sock.getsockname()[1])
        print("UDP", rec.port, flush=True)
        socks.append(sock)
        starts.append((_udp_flow, rec))
    for (target, rec), sock in zip(starts, socks, strict=True):
        flows.records.append(rec)
        thread = threading.Thread(target=target, args=(flows, rec, sock), daemon=True)
        thread.start()
        threads.append(thread)
    # Every flow echoed once: the firewall holds ESTABLISHED (TCP) / replied (UDP) state.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(r.echoes == 0 for r in flows.records):
        time.sleep(0.01)
    print("CONNECTED", len(flows.records), flush=True)
    for line in sys.stdin:
        word = line.strip()
        if word == "mark":
            flows.mark = time.time()
            print("MARKED", repr(flows.mark), flush=True)
        elif word == "stop":
            break
    stopped = time.time()
    flows.stop.set()
    for thread in threads:
        thread.join(args.interval * 4 + 0.5)
    with flows.lock:
        for rec, thread in zip(flows.records, threads, strict=True):
            # A flow still waiting for its echo has an open gap up to now.
            rec.stalled = thread.is_alive() and flows.waiting.get(rec.index, False)
            since = rec.last_echo if rec.last_echo is not None else stopped
            if rec.proto == "tcp" and stopped - since > rec.max_gap:
                rec.max_gap, rec.max_gap_end = stopped - since, stopped
        report = {
            "mark": flows.mark,
            "stopped": stopped,
            "flows": [asdict(r) for r in flows.records],
        }
    print("REPORT", json.dumps(report), flush=True)
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
    return 0


@dataclass
class FlowReport:
    """What the client reported at ``stop``."""

    mark: float
    stopped: float
    flows: list[FlowRecord]

    @property
    def tcp(self) -> list[FlowRecord]:
        return [f for f in self.flows if f.proto == "tcp"]

    @property
    def udp(self) -> list[FlowRecord]:
        return [f for f in self.flows if f.proto == "udp"]

    def resets(self) -> int:
        return sum(1 for f in self.tcp if f.reset)

    def errors(self) -> list[str]:
        return [f"tcp {f.port}: {f.error}" for f in self.tcp if f.error]

    def resumed(self, min_echoes: int = 5, flows: Iterable[FlowRecord] | None = None) -> int:
        """Flows with at least *min_echoes* echoes after the mark, and not broken."""
        chosen = self.tcp if flows is None else list(flows)
        return sum(
            1
            for f in chosen
            if f.echoes_after_mark >= min_echoes and not f.reset and not f.error and not f.stalled
        )

    def longest_gap(self) -> float:
        return max((f.max_gap for f in self.tcp), default=0.0)

    def summary(self) -> dict[str, Any]:
        gaps = sorted(f.max_gap for f in self.tcp)
        return {
            "tcp_flows": len(self.tcp),
            "udp_flows": len(self.udp),
            "resets": self.resets(),
            "errors": self.errors(),
            "tcp_resumed": self.resumed(),
            "udp_resumed": self.resumed(1, self.udp),
            "longest_gap": gaps[-1] if gaps else None,
            "median_flow_gap": gaps[len(gaps) // 2] if gaps else None,
            "stalled": [f.port for f in self.tcp if f.stalled],
        }


def flow_client_cmd(*args: str) -> list[str]:
    return [sys.executable, "-u", "-m", "tests.linux.failover_site", "flow-client", *args]


def project_env() -> dict[str, str]:
    """The environment for ``python -m tests.linux...`` run from any directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


class FlowClient:
    """The ``flow-client`` program running in the client namespace."""

    def __init__(
        self,
        ns: Any,  # tests.linux.netns.Namespace
        host: str,
        *,
        tcp_port: int,
        tcp: int,
        udp_port: int = 0,
        udp: int = 0,
        interval: float = 0.05,
    ) -> None:
        self.proc = ns.popen(
            flow_client_cmd(
                *("--host", host, "--tcp-port", str(tcp_port), "--tcp", str(tcp)),
                *("--udp-port", str(udp_port), "--udp", str(udp), "--interval", str(interval)),
            ),
            env=project_env(),
        )
        self.proc.wait_line("CONNECTED", 30)
        self.tcp_ports = [int(x.split()[1]) for x in self.proc.lines if x.startswith("CONN ")]
        self.udp_ports = [int(x.split()[1]) for x in self.proc.lines if x.startswith("UDP ")]

    def mark(self) -> float:
        self.proc.send_line("mark")
        return float(self.proc.wait_line("MARKED", 10).split()[1])

    def stop(self) -> FlowReport:
        self.proc.send_line("stop")
        line = self.proc.wait_line("REPORT", 20)
        self.proc.finish(10)
        data = json.loads(line.split(" ", 1)[1])
        return FlowReport(data["mark"], data["stopped"], [FlowRecord(**f) for f in data["flows"]])


# --------------------------------------------------------------------------- observers

RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWADDR = 20
RTM_DELADDR = 21
IFA_ADDRESS, IFA_LOCAL = 1, 2


def _in_netns(name: str) -> contextlib.AbstractContextManager[None]:
    from tests.linux.netns import in_netns

    return in_netns(name)


class VipWatch:
    """When do addresses appear in a namespace? rtnetlink address events, read by a thread.

    Kernel event delivery is immediate: the timestamps are when this thread read them
    (``time.time()``), a millisecond or so after the address was added.
    """

    def __init__(self, ns_name: str) -> None:
        with _in_netns(ns_name):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            self.count_fd = os.open("/proc/sys/net/netfilter/nf_conntrack_count", os.O_RDONLY)
        self.sock.bind((0, RTMGRP_IPV4_IFADDR))
        self.sock.settimeout(0.1)
        self.added: dict[str, float] = {}
        #: The conntrack table's size read right after each address event: an upper bound
        #: of its size when the address was added (the state a VIP finds).
        self.count_at: dict[str, int] = {}
        self.removed: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vipwatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.time()
            off = 0
            while off + 16 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, off)
                if length < 16:
                    break
                if mtype in (RTM_NEWADDR, RTM_DELADDR):
                    addr = self._address(data[off + 16 : off + length])
                    book = self.added if mtype == RTM_NEWADDR else self.removed
                    if addr is not None and addr not in book:
                        book[addr] = at
                        if mtype == RTM_NEWADDR:
                            self.count_at[addr] = int(os.pread(self.count_fd, 64, 0))
                off += (length + 3) & ~3

    @staticmethod
    def _address(body: bytes) -> str | None:
        family = body[0]
        if family != socket.AF_INET:
            return None
        off = 8  # struct ifaddrmsg
        found: dict[int, bytes] = {}
        while off + 4 <= len(body):
            alen, atype = struct.unpack_from("=HH", body, off)
            if alen < 4:
                break
            found[atype] = body[off + 4 : off + alen]
            off += (alen + 3) & ~3
        raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
        return socket.inet_ntoa(raw) if raw and len(raw) == 4 else None

    def first(self, addrs: Iterable[str]) -> float | None:
        """When the last of *addrs* was added (None if one is still missing)."""
        times = [self.added.get(a) for a in addrs]
        if any(t is None for t in times):
            return None
        return max(t for t in times if t is not None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        os.close(self.count_fd)


def conntrack_count(ns_name: str) -> int:
    """The namespace's ``nf_conntrack_count`` (the file is per network namespace)."""
    with _in_netns(ns_name):
        fd = os.open("/proc/sys/net/netfilter/nf_conntrack_count", os.O_RDONLY)
    try:
        return int(os.pread(fd, 64, 0))
    finally:
        os.close(fd)


class CountWatch:
    """Polls a namespace's ``nf_conntrack_count`` every *interval* s until it reaches *target*."""

    def __init__(self, ns_name: str, target: int, interval: float = 0.002) -> None:
        with _in_netns(ns_name):
            self.fd = os.open("/proc/sys/net/netfilter/nf_conntrack_count", os.O_RDONLY)
        self.target = target
        self.interval = interval
        self.reached: float | None = None
        self.last = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="countwatch", daemon=True)
        self._thread.start()

    def read(self) -> int:
        return int(os.pread(self.fd, 64, 0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last = self.read()
            if self.last >= self.target:
                self.reached = time.time()
                return
            self._stop.wait(self.interval)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        os.close(self.fd)


# --------------------------------------------------------------------------- synthetic entries

_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_NLMSG_ERROR = 2
_CT_NEW = 1 << 8
_NESTED = 0x8000
_SYNTH_DPORT = 80


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def synthetic_key(i: int) -> tuple[str, str, int, int]:
    """Entry *i*: 192.0.2.a:sport -> 198.51.100.(200..249):80 (never a real flow here:
    the site's flows go to 198.51.100.100)."""
    a = i % 250 + 1
    j = i // 250
    return f"192.0.2.{a}", f"198.51.100.{200 + j % 50}", 1024 + j // 50, _SYNTH_DPORT


def _ct_tuple(kind: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    ips = _nla(1, src) + _nla(2, dst)
    proto = _nla(1, b"\x06") + _nla(2, struct.pack("!H", sport)) + _nla(3, struct.pack("!H", dport))
    return _nla(kind | _NESTED, _nla(1 | _NESTED, ips) + _nla(2 | _NESTED, proto))


def _create_msg(seq: int, i: int, timeout: int) -> bytes:
    src_t, dst_t, sport, dport = synthetic_key(i)
    src, dst = socket.inet_aton(src_t), socket.inet_aton(dst_t)
    status = 0x2 | 0x4 | 0x8  # SEEN_REPLY | ASSURED | CONFIRMED (the kernel insists on it)
    attrs = (
        _ct_tuple(1, src, dst, sport, dport)
        + _ct_tuple(2, dst, src, dport, sport)
        + _nla(3, struct.pack("!I", status))
        + _nla(7, struct.pack("!I", timeout))
        + _nla(4 | _NESTED, _nla(1 | _NESTED, _nla(1, b"\x03")))  # TCP ESTABLISHED
    )
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + attrs
    flags = _NLM_F_REQUEST | _NLM_F_CREATE | _NLM_F_EXCL
    return struct.pack("=IHHII", 16 + len(body), _CT_NEW, flags, seq, 0) + body


def create_entries(ns_name: str, count: int, *, timeout: int = 3600, batch: int = 256) -> int:
    """Create *count* synthetic TCP ESTABLISHED entries in *ns_name*'s table; returns the
    number of failed creates. Batches of *batch* messages, an ACK asked on the last one."""
    with _in_netns(ns_name):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    failed = 0
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        with contextlib.suppress(OSError):
            sock.setsockopt(270, 10, 1)  # NETLINK_CAP_ACK: short error messages
        sock.bind((0, 0))
        for start in range(0, count, batch):
            msgs = [_create_msg(i + 1, i, timeout) for i in range(start, min(start + batch, count))]
            last = bytearray(msgs[-1])
            struct.pack_into("=H", last, 6, struct.unpack_from("=H", last, 6)[0] | _NLM_F_ACK)
            last_seq = struct.unpack_from("=I", last, 8)[0]
            sock.send(b"".join(msgs[:-1]) + bytes(last))
            done = False
            while not done:
                data = sock.recv(1 << 20)
                off = 0
                while off + 16 <= len(data):
                    length, mtype = struct.unpack_from("=IH", data, off)
                    if mtype == _NLMSG_ERROR:
                        err = struct.unpack_from("=i", data, off + 16)[0]
                        seq = struct.unpack_from("=I", data, off + 16 + 4 + 8)[0]
                        failed += err != 0
                        done = done or seq == last_seq
                    if length == 0:
                        break
                    off += (length + 3) & ~3
    return failed


# --------------------------------------------------------------------------- ctsync configs


def vrrp_tables(node_id: int, *, advert: float = VRRP_ADVERT) -> list[dict[str, Any]]:
    """The ``[[vrrp.instance]]`` tables of a node (fw1 priority 200, fw2 100)."""
    return [
        {
            "name": name,
            "interface": ifname,
            "virtual-router-id": vrid,
            "version": 3,
            "priority": VRRP_PRIORITY[node_id],
            "advert-int": advert,
            "virtual-address": [vip],
        }
        for name, ifname, vrid, vip in vrrp_instances()
    ]


def write_ctsync_config(
    cluster: Any,  # tests.linux.agents.Cluster
    node_id: int,
    *,
    failover: Mapping[str, Any],
    vrrp: Sequence[Mapping[str, Any]] = (),
    vrrp_group: str | None = None,
    sync: Mapping[str, Any] | None = None,
) -> Path:
    """The node's config as :class:`Cluster` writes it, plus ``[failover]`` and the speaker's
    ``[vrrp]``/``[[vrrp.instance]]`` tables (render_config knows no arrays of tables)."""
    from tests.linux.agents import SYNC_IF, render_config, toml_value

    node = cluster[node_id]
    tables: dict[str, dict[str, Any]] = {
        "sync": {"interface": SYNC_IF, **cluster.sync, **(sync or {})},
        "auth": {"key-file": str(node.key_path)},
        "control": {"socket": str(node.socket_path)},
        "log": {"format": "text", "level": cluster.log_level},
        "failover": dict(failover),
    }
    if vrrp_group is not None:
        tables["vrrp"] = {"sync-group": vrrp_group}
    text = render_config(tables, node_id)
    for inst in vrrp:
        text += "\n[[vrrp.instance]]\n"
        text += "".join(f"{key} = {toml_value(value)}\n" for key, value in inst.items())
    node.config_path.write_text(text)
    return Path(node.config_path)


def failover_status(cluster: Any, node_id: int) -> dict[str, Any]:
    """The ``failover`` object of the node's status (``{}`` until the agent reports one)."""
    status = cluster.query(node_id, "status")
    result: dict[str, Any] = status.get("failover") or {}
    return result


def master_transition(status: Mapping[str, Any], after: float) -> dict[str, Any] | None:
    """The first transition into MASTER at or after *after* (unix time), if any."""
    for item in status.get("transitions") or []:
        if item.get("to") == "MASTER" and float(item.get("at") or 0) >= after:
            result: dict[str, Any] = item
            return result
    return None


def step_end(transition: Mapping[str, Any], name: str) -> float | None:
    """When the transition's step *name* ended (unix time), if it ran."""
    for step in transition.get("steps") or []:
        if step.get("step") == name and step.get("started") is not None:
            return float(step["started"]) + float(step.get("seconds") or 0.0)
    return None


# --------------------------------------------------------------------------- keepalived

KEEPALIVED = "/usr/sbin/keepalived"


@dataclass
class Keepalived:
    """keepalived (VRRP only) in one firewall namespace; files under *workdir*."""

    ns: Any  # tests.linux.netns.Namespace
    node_id: int
    workdir: Path
    fifo: Path | None = None
    notify_script: Path | None = None  # called as "<script> primary|backup|fault"
    advert: float = VRRP_ADVERT
    proc: Any = None
    extra_global: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.workdir / f"keepalived-fw{self.node_id}.conf"

    @property
    def vrrp_pidfile(self) -> Path:
        return self.workdir / f"keepalived-fw{self.node_id}.vrrp.pid"

    def render(self) -> str:
        glob = [f"    router_id fw{self.node_id}", "    vrrp_version 3"]
        if self.fifo is not None:
            glob.append(f"    vrrp_notify_fifo {self.fifo}")
        if self.notify_script is not None:
            # Without enable_script_security keepalived only warns; with it, it would
            # refuse scripts under a /tmp path.
            glob.append("    script_user root")
        glob += [f"    {line}" for line in self.extra_global]
        out = ["global_defs {", *glob, "}", ""]
        names = [name for name, _, _, _ in vrrp_instances()]
        out += [f"vrrp_sync_group {VRRP_GROUP} {{", f"    group {{ {' '.join(names)} }}"]
        if self.notify_script is not None:
            for hook, arg in (("master", "primary"), ("backup", "backup"), ("fault", "fault")):
                out.append(f'    notify_{hook} "{self.notify_script} {arg}"')
        out += ["}", ""]
        for name, ifname, vrid, vip in vrrp_instances():
            out += [
                f"vrrp_instance {name} {{",
                "    state BACKUP",
                f"    interface {ifname}",
                f"    virtual_router_id {vrid}",
                f"    priority {VRRP_PRIORITY[self.node_id]}",
                f"    advert_int {self.advert}",
                f"    virtual_ipaddress {{ {vip} dev {ifname} }}",
                "}",
                "",
            ]
        return "\n".join(out)

    def start(self) -> None:
        self.conf.write_text(self.render())
        base = self.workdir / f"keepalived-fw{self.node_id}"
        cmd = [
            KEEPALIVED,
            *("-n", "-l", "-D", "-G", "-P", "-R"),  # foreground, console log, VRRP only,
            *("-f", str(self.conf)),  # no respawn (a killed child must stay dead)
            *("-p", f"{base}.pid", "-r", str(self.vrrp_pidfile), "-c", f"{base}.chk.pid"),
        ]
        self.proc = self.ns.popen(cmd)

    def vrrp_pid(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return int(self.vrrp_pidfile.read_text().split()[0])
            time.sleep(0.02)
        raise AssertionError(f"keepalived fw{self.node_id}: no VRRP child pid file")

    def crash(self) -> float:
        """SIGKILL the VRRP child, then the parent (a crash: no priority-0 advert).
        Returns when the child was killed (unix time)."""
        child = self.vrrp_pid()
        at = time.time()
        os.kill(child, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        return at

    def output(self) -> str:
        return str(self.proc.output()) if self.proc is not None else ""


def primary_backup_script(workdir: Path, conntrackd_conf: Path, lock: Path, log: Path) -> Path:
    """conntrackd's primary-backup.sh, copied with our paths, each step timestamped in *log*.

    The commands and their order are the Debian example's, unchanged: primary: -c -f -R -B;
    backup: -s (start conntrackd if it is not running), -t, -n; fault: -t.
    """
    src = Path("/usr/share/doc/conntrackd/examples/sync/primary-backup.sh")
    text = src.read_text()
    text = text.replace(
        "CONNTRACKD_LOCK=/var/lock/conntrack.lock", f"CONNTRACKD_LOCK={lock}"
    ).replace(
        "CONNTRACKD_CONFIG=/etc/conntrackd/conntrackd.conf", f"CONNTRACKD_CONFIG={conntrackd_conf}"
    )
    # Timestamp every conntrackd call: a wrapper named like the binary variable.
    wrapper = workdir / f"{conntrackd_conf.stem}-conntrackd-timed.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$(date +%s.%N) start $*" >> {log}\n'
        '/usr/sbin/conntrackd "$@"\n'
        "rc=$?\n"
        f'echo "$(date +%s.%N) end $* rc=$rc" >> {log}\n'
        "exit $rc\n"
    )
    wrapper.chmod(0o755)
    text = text.replace("CONNTRACKD_BIN=/usr/sbin/conntrackd", f"CONNTRACKD_BIN={wrapper}")
    if str(wrapper) not in text or str(conntrackd_conf) not in text:
        raise RuntimeError(f"{src} changed: cannot adapt its paths")
    script = workdir / f"{conntrackd_conf.stem}-primary-backup.sh"
    script.write_text(
        text.replace("#!/bin/sh\n", f'#!/bin/sh\necho "$(date +%s.%N) notify $1" >> {log}\n', 1)
    )
    script.chmod(0o755)
    return script


def script_log(log: Path) -> list[tuple[float, str]]:
    """``(unix time, text)`` lines of a :func:`primary_backup_script` log."""
    out = []
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            stamp, _, text = line.partition(" ")
            with contextlib.suppress(ValueError):
                out.append((float(stamp), text))
    return out


def addresses(ns: Any, ifname: str) -> set[str]:
    out = ns.run(["ip", "-o", "-4", "addr", "show", "dev", ifname]).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line}


def holds_vips(site: Any, node_id: int) -> bool:
    from tests.linux.agents import LAN_IF, VIP_LAN, VIP_WAN, WAN_IF

    ns = site.fw(node_id)
    return VIP_LAN in addresses(ns, LAN_IF) and VIP_WAN in addresses(ns, WAN_IF)


def wait_for(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ConnectionError):
            result = probe()
            if result:
                return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "flow-client":
        print("usage: python -m tests.linux.failover_site flow-client ...", file=sys.stderr)
        return 2
    try:
        return flow_client_main(args[1:])
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print("ERROR", type(exc).__name__, exc, flush=True)
        return 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
