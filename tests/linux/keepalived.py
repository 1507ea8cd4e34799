"""Real keepalived next to ctsync's VRRP speaker, in network namespaces.

Layout built by :func:`build_vrrp_site`::

    ka  vr0 192.0.2.1/24 2001:db8::1/64 ---+
    ct  vr0 192.0.2.2/24 2001:db8::2/64 ---+--- sw: br0 (bridge, multicast_snooping 0)
    cl  eth0 192.0.2.3/24 2001:db8::3/64 --+
    ct  sync0 203.0.113.2/24 --- sw: s0 (the agent's sync link, no peer on it)

``ka`` runs keepalived (``--dont-fork --log-console``, VRRP only); ``ct`` runs the ctsync
agent with its own VRRP speaker (``failover.mechanism = "vrrp"``); ``cl`` is a client whose
neighbour cache shows whose MAC the VIP resolves to (gratuitous ARP / unsolicited NA). Both
routers are described by one :class:`VrrpParams` each, rendered to keepalived.conf or TOML.

Timing is measured with :class:`AddrWatch`: an rtnetlink address-event listener per
namespace, timestamped in the test process (``time.monotonic``), so "signal sent" and "VIP
added on the other node" are on one clock.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctsync.io.control_client import call
from tests.linux.agents import toml_value, wait_until, write_key
from tests.linux.netns import Namespace, NamespaceFactory, Process, add_addr, in_netns, veth

VRRP_IF = "vr0"
SYNC_IF = "sync0"
KA_ADDR = {4: "192.0.2.1", 6: "2001:db8::1"}
CT_ADDR = {4: "192.0.2.2", 6: "2001:db8::2"}
CLIENT_ADDR = {4: "192.0.2.3", 6: "2001:db8::3"}
VIP = {4: "192.0.2.100", 6: "2001:db8::100"}
PREFIX = {4: 24, 6: 64}

#: keepalived log lines that mean it refused something we sent (reference §6) or our
#: configuration disagrees with its own.
BAD_LOG = re.compile(
    r"CONFIGURATION ERROR|invalid|mismatch|wrong version|unexpected ip number|not present in"
    r"|expecting|too short|too long|checksum to old",
    re.IGNORECASE,
)


def skew(version: int, priority: int, interval: float) -> float:
    """Reference §5.1 (v2 not scaled by the interval)."""
    return (256 - priority) / 256 * (1.0 if version == 2 else interval)


def master_down(version: int, priority: int, interval: float) -> float:
    return 3 * interval + skew(version, priority, interval)


@dataclass
class VrrpParams:
    """One router's instance (both sides share VRID, version, family, VIP and interval)."""

    version: int
    family: int
    priority: int
    advert_int: float
    vrid: int = 51  # the VIP is VIP[family], so two instances need two families
    preempt: bool = True
    auth_pass: str | None = None
    unicast_src: str | None = None
    unicast_peers: Sequence[str] = ()
    garp_master_delay: float = 1.0

    @property
    def vip(self) -> str:
        return VIP[self.family]

    def down(self) -> float:
        return master_down(self.version, self.priority, self.advert_int)

    def skew(self) -> float:
        return skew(self.version, self.priority, self.advert_int)


def keepalived_config(params: Sequence[VrrpParams], interface: str = VRRP_IF) -> str:
    """keepalived.conf: one vrrp_instance per entry (VI_1, VI_2...), a sync group if several."""
    lines = [
        "global_defs {",
        "  router_id ka",
        "  max_auto_priority -1",
        f"  vrrp_garp_master_delay {int(params[0].garp_master_delay) or 1}",
        "}",
    ]
    if len(params) > 1:
        names = " ".join(f"VI_{i}" for i in range(1, len(params) + 1))
        lines += ["vrrp_sync_group G1 {", f"  group {{ {names} }}", "}"]
    for index, p in enumerate(params, 1):
        lines += [
            f"vrrp_instance VI_{index} {{",
            "  state BACKUP",
            f"  interface {interface}",
            f"  virtual_router_id {p.vrid}",
            f"  version {p.version}",
            f"  priority {p.priority}",
            f"  advert_int {p.advert_int:g}",
        ]
        if not p.preempt:
            lines.append("  nopreempt")
        if p.auth_pass:
            lines += [
                "  authentication {",
                "    auth_type PASS",
                f"    auth_pass {p.auth_pass}",
                "  }",
            ]
        if p.unicast_peers:
            if p.unicast_src:
                lines.append(f"  unicast_src_ip {p.unicast_src}")
            lines += ["  unicast_peer {", *(f"    {a}" for a in p.unicast_peers), "  }"]
        lines += ["  virtual_ipaddress {", f"    {p.vip}/{PREFIX[p.family]}", "  }", "}"]
    return "\n".join(lines) + "\n"


def ctsync_config(
    params: Sequence[VrrpParams], tmp: Path, key: Path, interface: str = VRRP_IF
) -> str:
    """A full agent config: [sync] on its own link, [failover] vrrp, the instances."""
    instances = []
    for index, p in enumerate(params, 1):
        inst: dict[str, Any] = {
            "name": f"VI_{index}",
            "interface": interface,
            "virtual-router-id": p.vrid,
            "version": p.version,
            "priority": p.priority,
            "advert-int": p.advert_int,
            "virtual-address": [f"{p.vip}/{PREFIX[p.family]}"],
            "preempt": p.preempt,
            "garp-master-delay": p.garp_master_delay,
        }
        if p.auth_pass:
            inst["auth-pass"] = p.auth_pass
        if p.unicast_peers:
            inst["unicast-peer"] = list(p.unicast_peers)
            if p.unicast_src:
                inst["unicast-src"] = p.unicast_src
        instances += ["", "[[vrrp.instance]]", *(f"{k} = {toml_value(v)}" for k, v in inst.items())]
    lines = [
        "node-id = 2",
        "",
        "[sync]",
        f'interface = "{SYNC_IF}"',
        "",
        "[auth]",
        f"key-file = {toml_value(str(key))}",
        "",
        "[control]",
        f"socket = {toml_value(str(tmp / 'ct.sock'))}",
        "",
        "[log]",
        'format = "text"',
        "",
        "[failover]",
        'mechanism = "vrrp"',
        "",
        "[vrrp]",
        'sync-group = "G1"',
        *instances,
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- address events

_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100
_RTM_NEWADDR = 20
_RTM_DELADDR = 21
_IFA_ADDRESS = 1
_IFA_LOCAL = 2


class AddrWatch:
    """Records ``(monotonic time, "add"|"del", address text)`` of a namespace's addresses."""

    def __init__(self, ns: Namespace) -> None:
        with in_netns(ns.name):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
        sock.settimeout(0.1)
        self.sock = sock
        self.events: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"addr-{ns.name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if length < 16:
                    break
                if kind in (_RTM_NEWADDR, _RTM_DELADDR):
                    family = data[off + 16]
                    attrs = _attrs(data[off + 24 : off + length])
                    raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
                    if raw is not None:
                        text = socket.inet_ntop(family, raw)
                        what = "add" if kind == _RTM_NEWADDR else "del"
                        with self._lock:
                            self.events.append((now, what, text))
                off += (length + 3) & ~3

    def first(self, what: str, address: str, after: float) -> float | None:
        with self._lock:
            for when, kind, text in self.events:
                if kind == what and text == address and when >= after:
                    return when
        return None

    def wait(self, what: str, address: str, after: float, timeout: float) -> float:
        """Time of the first *what* event for *address* at or after *after*."""
        return wait_until(
            lambda: self.first(what, address, after),
            timeout,
            f"{what} of {address}",
            interval=0.01,
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _attrs(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(buf):
        length, kind = struct.unpack_from("=HH", buf, off)
        if length < 4:
            break
        out[kind & 0x3FFF] = buf[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


# --------------------------------------------------------------------------- the routers


def wait_for_text(proc: Process, text: str, timeout: float, start: int = 0) -> str:
    """The first output line (from line *start* on) that contains *text*."""

    def probe() -> str | None:
        for line in proc.lines[start:]:
            if text in line:
                return line
        if proc.poll() is not None:
            raise AssertionError(f"pid {proc.pid} exited before {text!r}:\n{proc.output()}")
        return None

    return wait_until(probe, timeout, repr(text), interval=0.02, describe=proc.output)


class KeepalivedNode:
    """keepalived in its namespace; every start's output is kept for the log checks."""

    def __init__(self, ns: Namespace, tmp: Path, params: Sequence[VrrpParams]) -> None:
        self.ns = ns
        self.tmp = tmp
        self.conf = tmp / "keepalived.conf"
        self.conf.write_text(keepalived_config(params))
        self.proc: Process | None = None
        self.runs: list[Process] = []

    def start(self) -> None:
        n = len(self.runs)
        self.proc = self.ns.popen(
            [
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--no-syslog",
                "--vrrp",
                "-f",
                str(self.conf),
                "-p",
                str(self.tmp / f"ka{n}.pid"),
                "-r",
                str(self.tmp / f"ka{n}.vrrp.pid"),
            ]
        )
        self.runs.append(self.proc)
        wait_for_text(self.proc, "Startup complete", 10)

    def _vrrp_child(self) -> int | None:
        path = self.tmp / f"ka{len(self.runs) - 1}.vrrp.pid"
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().split()[0])
        return None

    def terminate(self) -> None:
        """SIGTERM to the parent: the VRRP child resigns (priority 0) and exits."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.finish(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL to the whole process group (parent and VRRP child): nothing is sent."""
        assert self.proc is not None
        child = self._vrrp_child()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if child is not None:  # the child stays in the group; make sure by its id
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        self.proc = None

    def output(self) -> str:
        return "\n".join(
            f"--- keepalived run {i} ---\n{p.output()}" for i, p in enumerate(self.runs)
        )

    def states(self) -> list[str]:
        """Every "Entering X STATE" of the current run, in order."""
        if not self.runs:
            return []
        return re.findall(r"Entering (\w+) STATE", self.runs[-1].output())

    def bad_lines(self) -> list[str]:
        return [line for p in self.runs for line in p.lines if BAD_LOG.search(line)]


class CtsyncNode:
    """The ctsync agent (``python -m ctsync agent``) with ``failover.mechanism = "vrrp"``."""

    def __init__(self, ns: Namespace, tmp: Path, params: Sequence[VrrpParams]) -> None:
        self.ns = ns
        self.conf = tmp / "ctsync.toml"
        self.socket = tmp / "ct.sock"
        self.conf.write_text(ctsync_config(params, tmp, write_key(tmp / "sync.key")))
        self.proc: Process | None = None
        self.runs: list[Process] = []

    def start(self) -> None:
        proc = self.ns.popen([sys.executable, "-m", "ctsync", "agent", "-c", str(self.conf)])
        self.proc = proc
        self.runs.append(proc)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the agent exited with {proc.returncode}:\n{proc.output()}")
            return self.socket.exists() and self.status()["state"] != "INIT"

        wait_until(up, 20, "the agent's VRRP speaker to run", describe=self.output)

    def terminate(self) -> dict[str, Any]:
        """SIGTERM (graceful: priority-0 advert); returns the speaker's status just before."""
        assert self.proc is not None
        status = self.status()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.finish(10)
        self.proc = None
        return status

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def status(self) -> dict[str, Any]:
        """The ``vrrp`` part of the agent's ``status`` (the speaker's own view)."""
        result: dict[str, Any] = call(str(self.socket), "status", timeout=10)["vrrp"]
        return result

    def output(self) -> str:
        return "\n".join(f"--- ctsync run {i} ---\n{p.output()}" for i, p in enumerate(self.runs))

    def group_states(self) -> list[str]:
        """Every state the sync group entered in the current run (from the agent's log)."""
        if not self.runs:
            return []
        return re.findall(r"VRRP group \S+: \w+ -> (\w+)", self.runs[-1].output())


# --------------------------------------------------------------------------- the site


@dataclass
class VrrpSite:
    sw: Namespace
    ka_ns: Namespace
    ct_ns: Namespace
    client: Namespace
    watches: dict[str, AddrWatch] = field(default_factory=dict)

    def macs(self) -> dict[str, str]:
        out = {}
        for role, ns in (("ka", self.ka_ns), ("ct", self.ct_ns)):
            link = json.loads(ns.ip("-j", "link", "show", VRRP_IF).stdout)[0]
            out[role] = link["address"]
        return out

    def holders(self, vip: str) -> list[str]:
        """Which routers have *vip* on vr0 (``ip -j addr``)."""
        found = []
        for role, ns in (("ka", self.ka_ns), ("ct", self.ct_ns)):
            info = json.loads(ns.ip("-j", "addr", "show", "dev", VRRP_IF).stdout)
            addrs = {a["local"] for entry in info for a in entry.get("addr_info", [])}
            if vip in addrs:
                found.append(role)
        return found

    def client_neighbour(self, vip: str) -> str | None:
        """The MAC the client's neighbour cache holds for *vip* (None: no entry)."""
        out = self.client.ip("-j", "neigh", "show", vip, "dev", "eth0").stdout
        entries = json.loads(out) if out.strip() else []
        for entry in entries:
            if entry.get("lladdr"):
                return str(entry["lladdr"])
        return None

    def ping_vip(self, vip: str) -> None:
        flag = "-6" if ":" in vip else "-4"
        self.client.run(["ping", flag, "-c", "1", "-W", "1", vip])

    def close(self) -> None:
        for watch in self.watches.values():
            watch.close()


def build_vrrp_site(factory: NamespaceFactory) -> VrrpSite:
    sw = factory.create("sw")
    sw.ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
    sw.ip("link", "set", "br0", "up")
    ka = factory.create("ka")
    ct = factory.create("ct")
    client = factory.create("cl")
    for ns, ifname, port, host in (
        (ka, VRRP_IF, "pka", 1),
        (ct, VRRP_IF, "pct", 2),
        (client, "eth0", "pcl", 3),
    ):
        veth(ns, ifname, sw, port)
        sw.ip("link", "set", port, "master", "br0")
        add_addr(ns, ifname, f"192.0.2.{host}/24")
        add_addr(ns, ifname, f"2001:db8::{host}/64")
    veth(ct, SYNC_IF, sw, "s0")
    add_addr(ct, SYNC_IF, "203.0.113.2/24")
    site = VrrpSite(sw=sw, ka_ns=ka, ct_ns=ct, client=client)
    site.watches = {"ka": AddrWatch(ka), "ct": AddrWatch(ct)}
    try:
        # Link-locals come up with the links; wait until both routers have one.
        for ns in (ka, ct):
            wait_until(
                functools.partial(_has_link_local, ns), 5, f"a link-local address in {ns.name}"
            )
    except BaseException:
        site.close()  # the caller never gets the site: stop the watch threads here
        raise
    return site


def _has_link_local(ns: Namespace) -> bool:
    return "fe80" in ns.ip("-6", "addr", "show", "dev", VRRP_IF).stdout
