"""Running real ctsync agents in network namespaces: a cluster of firewalls on one sync L2.

Layout built by :class:`Cluster` (``N`` firewalls, one "switch")::

    fw1 sync0 203.0.113.1/24 ---+
    fw2 sync0 203.0.113.2/24 ---+--- sw: br0 (Linux bridge, multicast_snooping 0)
    fwN sync0 203.0.113.N/24 ---+    ports s1..sN

Every firewall gets :data:`FW_SYNC_RULESET` (conntrack on; the sync link itself untracked)
unless the test gives its own ruleset, a config file under the test's ``tmp_path``, and
shares one pre-shared key (a node may be given another key file). Agents run as
``python -m ctsync agent`` processes inside their namespace, started through
:meth:`Namespace.popen` (so they are stopped by pid, whatever the outcome);
:meth:`Cluster.kill` sends SIGKILL to one agent by pid.

The CLI is the test's window into an agent: :meth:`Cluster.ctl` runs
``python -m ctsync ... -S <socket>`` and parses its ``--json`` output. Polling loops that
would run the CLI dozens of times use :meth:`Cluster.query` (the same control socket through
``ctsync.io.control.call``, without a process start).

Sync loss is emulated on the switch (:meth:`Cluster.set_loss`): a ``bridge`` family nftables
rule drops the given per-mille of the sync datagrams forwarded to the ports ``s*``, per output
port (each receiver of a multicast datagram loses its copy independently), or all of them (a
partition). ``tc netem`` is not used: the kernels these tests run on do not always have
``sch_netem`` (this one does not).

Test data: bursts of entries are written with ``conntrack -R`` (``-I`` lines); updates and
deletes go through ctnetlink from the test process, its thread moved into the namespace
(``conntrack -R`` mishandles ``-U`` lines and its ``-D`` dumps the table per entry).

Also here: :class:`Eavesdropper`, a keyless host on the sync segment that records and
replays datagrams, and :func:`build_failover_site`, client -- fw1/fw2 -- server with VIPs,
SNAT and strict TCP tracking, for failovers of real NATed flows.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from ctsync.core.entry import entry_to_json, make_tuple
from ctsync.io.control import AgentError, AgentUnreachable, call
from ctsync.io.netlink import Committer, dump_table
from tests.linux.netns import (
    CtEntry,
    Namespace,
    NamespaceFactory,
    Process,
    add_addr,
    in_netns,
    parse_conntrack,
    veth,
)

T = TypeVar("T")

SYNC_IF = "sync0"
SYNC_PREFIX = "203.0.113."
SYNC_PORT = 3780
BRIDGE = "br0"

#: The sync link marked notrack at raw priority, so that the sync datagrams themselves never
#: enter the table being synced: the first chains of every firewall ruleset (``inet fw``).
SYNC_NOTRACK_CHAINS = f"""\
    chain raw_pre {{
        type filter hook prerouting priority raw; policy accept;
        iifname "{SYNC_IF}" notrack
    }}
    chain raw_out {{
        type filter hook output priority raw; policy accept;
        oifname "{SYNC_IF}" notrack
    }}
"""

#: Conntrack on (``ct state`` in prerouting) and the sync link untracked.
FW_SYNC_RULESET = f"""\
flush ruleset
table inet fw {{
{SYNC_NOTRACK_CHAINS}    chain pre {{
        type filter hook prerouting priority filter; policy accept;
        ct state established accept
    }}
}}
"""

#: Fast timers so that liveness, resends and anti-entropy show within seconds.
FAST_SYNC: dict[str, Any] = {
    "alive-interval": 0.2,
    "peer-dead-after": 1.0,
    "digest-interval": 1.0,
}


class WaitTimeoutError(AssertionError):
    """A polled condition did not hold in time (an assertion: the test fails)."""


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    describe: Callable[[], str] | None = None,
) -> T:
    """Call *probe* until it returns something truthy; return that. Raise after *timeout*.

    *describe* is called on timeout to put the last observed state into the message.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = probe()
        except (AgentError, AgentUnreachable, OSError) as exc:
            result, last_exc = None, exc
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = describe() if describe is not None else ""
            if last_exc is not None:
                detail += f"\nlast error: {last_exc!r}"
            raise WaitTimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")
        time.sleep(interval)


def write_key(path: Path) -> Path:
    """48 random bytes, base64 (as ``openssl rand -base64 48``), mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(secrets.token_bytes(48)).decode() + "\n")
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_config(tables: Mapping[str, Mapping[str, Any]], node_id: int) -> str:
    lines = [f"node-id = {node_id}"]
    for table, values in tables.items():
        lines += ["", f"[{table}]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entries


CtKey = tuple[str, str, str, int, int]
"""(protocol, original src, original dst, sport, dport): one connection, zone 0."""


def json_key(entry: Mapping[str, Any]) -> CtKey:
    """The :data:`CtKey` of one ``show cache ... --json`` entry."""
    orig = entry["original"]
    return (
        entry["protocol"],
        orig["src"],
        orig["dst"],
        int(orig.get("sport", 0)),
        int(orig.get("dport", 0)),
    )


#: Fields of a cache entry that only change when the connection does (not ``timeout``,
#: which a dump refreshes, nor ``id``/``use``, which are per kernel).
STABLE_FIELDS = ("reply", "status", "mark", "zone", "labels", "helper", "tcp", "protocol_number")


def json_view(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {name: entry.get(name) for name in STABLE_FIELDS}


def cache_view(entries: Iterable[Mapping[str, Any]]) -> dict[CtKey, dict[str, Any]]:
    """``key -> stable fields`` of a list of cache entries (duplicates are an error)."""
    out: dict[CtKey, dict[str, Any]] = {}
    for entry in entries:
        key = json_key(entry)
        if key in out:
            raise AssertionError(f"duplicate cache entry {key}")
        out[key] = json_view(entry)
    return out


def diff_views(
    want: Mapping[CtKey, Mapping[str, Any]], got: Mapping[CtKey, Mapping[str, Any]]
) -> str:
    """A short human description of how two cache views differ ("" if equal)."""
    missing = want.keys() - got.keys()
    extra = got.keys() - want.keys()
    changed = [k for k in want.keys() & got.keys() if want[k] != got[k]]
    if not (missing or extra or changed):
        return ""
    parts = [f"{len(missing)} missing, {len(extra)} extra, {len(changed)} differ"]
    for label, keys in (("missing", missing), ("extra", extra)):
        if keys:
            parts.append(f"  {label} e.g. {sorted(keys)[:3]}")
    for key in sorted(changed)[:3]:
        parts.append(f"  {key}: want {dict(want[key])} got {dict(got[key])}")
    return "\n".join(parts)


@dataclass(frozen=True)
class Flow:
    """A synthetic conntrack entry, written with the ``conntrack`` CLI."""

    src: str
    dst: str
    sport: int
    dport: int
    proto: str = "tcp"

    @property
    def key(self) -> CtKey:
        return (self.proto, self.src, self.dst, self.sport, self.dport)

    def tuple_args(self) -> str:
        return (
            f"-s {self.src} -d {self.dst} -p {self.proto} --sport {self.sport} --dport {self.dport}"
        )

    def insert_line(self, mark: int = 0, timeout: int = 3600) -> str:
        extra = " -u SEEN_REPLY,ASSURED --state ESTABLISHED" if self.proto == "tcp" else ""
        # The mark goes last: conntrack 1.4.7 mangles a -m that precedes -u (-m 1 gives 6).
        return f"-I {self.tuple_args()} -t {timeout}{extra} -m {mark}"

    def delete_line(self) -> str:
        return f"-D {self.tuple_args()}"


def make_flows(node: int, count: int, *, proto: str = "tcp", base: int = 0) -> list[Flow]:
    """*count* distinct flows owned by *node*: client 192.0.2.<node>, server 198.51.100.x.

    ``base`` offsets the numbering, so several batches of one node do not collide.
    """
    flows = []
    for i in range(base, base + count):
        dst = f"198.51.100.{1 + i // 50_000}"
        flows.append(Flow(f"192.0.2.{node}", dst, 1024 + i % 50_000, 80, proto))
    return flows


def make_flows6(node: int, count: int, *, proto: str = "udp", base: int = 0) -> list[Flow]:
    """Like :func:`make_flows`, IPv6: client 2001:db8:1::<node>, server 2001:db8:2::x."""
    return [
        Flow(
            f"2001:db8:1::{node}", f"2001:db8:2::{1 + i // 50_000:x}", 1024 + i % 50_000, 53, proto
        )
        for i in range(base, base + count)
    ]


def conntrack_restore(ns: Namespace, lines: Sequence[str], tmp: Path) -> None:
    """Run ``conntrack -R`` with *lines* (``-I``/``-D`` only: ``-U`` lines misbehave there)."""
    path = tmp / f"ct-{secrets.token_hex(4)}.txt"
    path.write_text("\n".join(lines) + "\n")
    ns.run(["conntrack", "-R", str(path)], timeout=60)
    path.unlink()


def insert_flows(ns: Namespace, flows: Sequence[Flow], tmp: Path, mark: int = 0) -> None:
    conntrack_restore(ns, [f.insert_line(mark) for f in flows], tmp)


def delete_flows(ns: Namespace, flows: Sequence[Flow]) -> None:
    """Delete the flows' entries (ctnetlink delete, like ``conntrack -D``).

    ``conntrack -D`` (and ``-R`` with ``-D`` lines) dumps the whole table for every entry
    it deletes: 1,000 deletes of a 5,000-entry table take 30 s. ctsync's Committer, run
    from this thread moved into the namespace, sends them in batches.
    """
    protos = {"tcp": 6, "udp": 17}
    targets = [(make_tuple(f.src, f.dst, protos[f.proto], f.sport, f.dport), None) for f in flows]
    with in_netns(ns.name), Committer() as committer:
        _, failed = committer.delete_many(targets)
    if failed:
        raise AssertionError(f"{failed} of {len(targets)} deletes failed")


def set_marks(ns: Namespace, marks: Mapping[CtKey, int]) -> int:
    """Set the conntrack mark of existing entries (ctnetlink update, like ``conntrack -U``).

    Done with ctsync's :class:`~ctsync.io.netlink.Committer` from this thread moved into the
    namespace: ``conntrack -R`` mishandles ``-U`` lines and 5,000 ``conntrack -U`` processes
    are slow. Returns how many entries were updated.
    """
    with in_netns(ns.name):
        table = dump_table()
        changed = []
        for entry in table:
            key = json_key(entry_to_json(entry))
            if key in marks:
                changed.append(replace(entry, mark=marks[key]))
        with Committer() as committer:
            result = committer.commit_entries(changed)
    if result.failed:
        raise AssertionError(f"mark update failed: {dict(result.errors)}")
    return len(changed)


def kernel_entries(ns: Namespace) -> dict[CtKey, CtEntry]:
    """The namespace's conntrack table (``conntrack -L``), by :data:`CtKey`."""
    out: dict[CtKey, CtEntry] = {}
    for e in parse_conntrack(ns.conntrack("-L", "-o", "extended").stdout):
        key = (
            e.proto,
            e.orig["src"],
            e.orig["dst"],
            int(e.orig.get("sport", 0)),
            int(e.orig.get("dport", 0)),
        )
        out[key] = e
    return out


def kernel_keys(ns: Namespace) -> set[CtKey]:
    return set(kernel_entries(ns))


# --------------------------------------------------------------------------- the cluster


@dataclass
class Node:
    """One firewall: its namespace, files and (while running) its agent process."""

    node_id: int
    ns: Namespace
    sync_addr: str
    config_path: Path
    socket_path: Path
    key_path: Path
    proc: Process | None = None
    old_procs: list[Process] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"fw{self.node_id}"


class Cluster:
    """N firewall namespaces on one sync segment, each with a ctsync agent (see module doc)."""

    def __init__(
        self,
        factory: NamespaceFactory,
        tmp: Path,
        count: int,
        *,
        sync: Mapping[str, Any] | None = None,
        ruleset: str = FW_SYNC_RULESET,
        log_level: str = "info",
    ) -> None:
        self.factory = factory
        self.tmp = tmp
        self.sync = dict(FAST_SYNC if sync is None else sync)
        self.ruleset = ruleset
        self.log_level = log_level
        self.key_path = write_key(tmp / "sync.key")
        self.switch = factory.create("sw")
        self.switch.ip("link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        self.switch.ip("link", "set", BRIDGE, "up")
        self.nodes: dict[int, Node] = {}
        for node_id in range(1, count + 1):
            self.add_node(node_id)

    # --- building ------------------------------------------------------------------------

    def add_node(
        self, node_id: int, *, key_path: Path | None = None, ruleset: str | None = None
    ) -> Node:
        """Create ``fw<node_id>`` on the segment (203.0.113.<node_id>) and its config."""
        ns = self.factory.create(f"fw{node_id}")
        port = f"s{node_id}"
        veth(ns, SYNC_IF, self.switch, port)
        self.switch.ip("link", "set", port, "master", BRIDGE)
        addr = f"{SYNC_PREFIX}{node_id}"
        add_addr(ns, SYNC_IF, f"{addr}/24")
        ns.nft(self.ruleset if ruleset is None else ruleset)
        ns.sysctl("net.netfilter.nf_conntrack_events", 1, check=False)
        node = Node(
            node_id=node_id,
            ns=ns,
            sync_addr=addr,
            config_path=self.tmp / f"n{node_id}.toml",
            socket_path=self.tmp / f"n{node_id}.sock",
            key_path=key_path or self.key_path,
        )
        self.write_config(node)
        self.nodes[node_id] = node
        return node

    def write_config(self, node: Node, **sync: Any) -> None:
        tables: dict[str, dict[str, Any]] = {
            "sync": {"interface": SYNC_IF, **self.sync, **sync},
            "auth": {"key-file": str(node.key_path)},
            "control": {"socket": str(node.socket_path)},
            "log": {"format": "text", "level": self.log_level},
        }
        node.config_path.write_text(render_config(tables, node.node_id))

    def __getitem__(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def running(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.proc is not None and n.proc.poll() is None]

    # --- agents --------------------------------------------------------------------------

    def start(self, *node_ids: int, wait: bool = True, timeout: float = 20.0) -> None:
        """Start the agents (all when none given); by default wait until all are up."""
        ids = node_ids or tuple(self.nodes)
        for node_id in ids:
            node = self.nodes[node_id]
            if node.proc is not None and node.proc.poll() is None:
                raise RuntimeError(f"{node.name} is already running")
            # A socket file left by a SIGKILLed agent stays: the agent must cope with it.
            node.proc = node.ns.popen(
                [sys.executable, "-m", "ctsync", "agent", "-c", str(node.config_path)]
            )
        for node_id in ids:
            node = self.nodes[node_id]
            wait_until(
                functools.partial(self._answers, node),
                timeout,
                f"{node.name}'s agent to answer on its control socket",
                describe=functools.partial(self.output, node.node_id),
            )
        if wait:
            self.wait_ready(timeout=timeout)

    def _answers(self, node: Node) -> bool:
        assert node.proc is not None
        if node.proc.poll() is not None:
            raise AssertionError(
                f"{node.name}'s agent exited with {node.proc.returncode}:\n{node.proc.output()}"
            )
        if not node.socket_path.exists():
            return False
        self.query(node.node_id, "status")
        return True

    def kill(self, node_id: int) -> None:
        """``kill -9`` the agent (by pid) and reap it."""
        node = self.nodes[node_id]
        proc = node.proc
        assert proc is not None, f"{node.name} is not running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        node.old_procs.append(proc)
        node.proc = None

    def output(self, node_id: int) -> str:
        """The agent's log (every start), for failure messages."""
        node = self.nodes[node_id]
        procs = [*node.old_procs, *([node.proc] if node.proc is not None else [])]
        return "\n".join(f"--- {node.name} agent pid {p.pid} ---\n{p.output()}" for p in procs)

    def wait_ready(self, node_ids: Iterable[int] | None = None, timeout: float = 20.0) -> None:
        """Until every running agent among *node_ids* sees every other one up."""
        ids = sorted(node_ids) if node_ids is not None else [n.node_id for n in self.running()]

        def ready() -> bool:
            for node_id in ids:
                status = self.query(node_id, "status")
                up = {p["node"] for p in status["peers"] if p["up"] and p["verified"]}
                if not set(ids) - {node_id} <= up:
                    return False
            return True

        wait_until(ready, timeout, f"agents {ids} to see each other up", describe=self.describe)

    # --- talking to agents -----------------------------------------------------------------

    def cli(
        self, node_id: int, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m ctsync ARGS -S <node's socket>`` (on the host: the socket is a file)."""
        cmd = [sys.executable, "-m", "ctsync", *args, "-S", str(self.nodes[node_id].socket_path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def ctl(self, node_id: int, *args: str, timeout: float = 60.0) -> Any:
        """Run a CLI command that takes ``--json``; return its parsed output (exit 0 required)."""
        proc = self.cli(node_id, *args, "--json", timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(
                f"ctsync {' '.join(args)} on fw{node_id} exited {proc.returncode}:\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return json.loads(proc.stdout)

    def query(self, node_id: int, command: str, args: dict[str, Any] | None = None) -> Any:
        """The same request the CLI makes, without starting a process (for polling)."""
        return call(str(self.nodes[node_id].socket_path), command, args, timeout=30.0)

    def stats(self, node_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.query(node_id, "statistics")
        return result

    def internal(self, node_id: int) -> dict[CtKey, dict[str, Any]]:
        """Node's internal cache, by key."""
        return cache_view(self.query(node_id, "cache", {"which": "internal"})["entries"])

    def external(self, node_id: int, peer: int) -> dict[CtKey, dict[str, Any]]:
        """Node's external cache of *peer*, by key."""
        entries = self.query(node_id, "cache", {"which": "external"})["entries"]
        return cache_view(e for e in entries if e.get("peer") == peer)

    # --- convergence ---------------------------------------------------------------------

    def divergence(self, nodes: Iterable[int] | None = None) -> str:
        """How the caches differ from what they must be ("" when converged).

        Among *nodes* (default: every running one): each node's internal cache holds its
        kernel table (by key), and every other node's external cache of it equals its
        internal cache (keys and :data:`STABLE_FIELDS`).
        """
        running = sorted(nodes) if nodes is not None else [n.node_id for n in self.running()]
        counts = self.count_divergence(running)
        if counts:
            return counts  # cheap: no need to fetch thousands of entries yet
        externals = {
            node_id: self.query(node_id, "cache", {"which": "external"})["entries"]
            for node_id in running
        }
        problems = []
        for owner in running:
            internal = self.internal(owner)
            kernel = kernel_keys(self.nodes[owner].ns)
            if set(internal) != kernel:
                problems.append(
                    f"fw{owner} internal vs kernel: {len(internal)} vs {len(kernel)} entries, "
                    f"{len(kernel - set(internal))} missing, {len(set(internal) - kernel)} extra"
                )
            for other in running:
                if other == owner:
                    continue
                view = cache_view(e for e in externals[other] if e.get("peer") == owner)
                text = diff_views(internal, view)
                if text:
                    problems.append(f"fw{other}'s external cache of fw{owner}: {text}")
        return "\n".join(problems)

    def count_divergence(self, nodes: Sequence[int]) -> str:
        """Like :meth:`divergence`, on entry counts only (from ``statistics``)."""
        stats = {node_id: self.stats(node_id) for node_id in nodes}
        problems = []
        for owner in nodes:
            internal = stats[owner]["internal"]["active"]
            for other in nodes:
                if other == owner:
                    continue
                peers = {p["node"]: p["external_entries"] for p in stats[other]["peers"]}
                if peers.get(owner, 0) != internal:
                    problems.append(
                        f"fw{other} holds {peers.get(owner, 0)} entries of fw{owner}, "
                        f"which has {internal}"
                    )
        return "\n".join(problems)

    def wait_converged(self, nodes: Iterable[int] | None = None, timeout: float = 30.0) -> float:
        """Poll :meth:`divergence` until it is empty; return how long that took."""
        node_list = list(nodes) if nodes is not None else None
        last = [""]
        started = time.monotonic()

        def converged() -> bool:
            last[0] = self.divergence(node_list)
            return not last[0]

        wait_until(
            converged,
            timeout,
            "the caches to converge",
            interval=0.25,
            describe=lambda: last[0] + "\n" + self.describe(),
        )
        return time.monotonic() - started

    def describe(self) -> str:
        """Peers and main counters of every running agent (for failure messages)."""
        lines = []
        for node in self.running():
            try:
                stats = self.stats(node.node_id)
            except (AgentError, AgentUnreachable, OSError) as exc:
                lines.append(f"{node.name}: {exc!r}")
                continue
            peers = ", ".join(
                f"{p['node']}:{'up' if p['up'] else 'down'}/{p['external_entries']}"
                for p in stats["peers"]
            )
            sync = stats["sync"]
            keys = (
                "data_sent",
                "data_received",
                "resent",
                "nacks_sent",
                "lost",
                "auth_failed",
                "digest_mismatches",
                "repairs_sent",
                "queue_overflow",
            )
            counters = " ".join(f"{k}={sync[k]}" for k in keys)
            lines.append(
                f"{node.name}: internal={stats['internal']['active']} peers[{peers}] {counters}"
            )
        return "\n".join(lines)

    # --- the sync link -------------------------------------------------------------------

    def set_loss(self, per_mille: int) -> None:
        """Drop this share (0..1000) of sync datagrams on every switch port (0 = none,
        1000 = a partition)."""
        rules = ""
        if per_mille >= 1000:
            rules = f'oifname "s*" udp dport {SYNC_PORT} counter drop\n'
        elif per_mille:
            rules = (
                f'oifname "s*" udp dport {SYNC_PORT} '
                f"numgen random mod 1000 < {per_mille} counter drop\n"
            )
        self.switch.nft(
            "table bridge loss {}\ndelete table bridge loss\n"
            "table bridge loss {\n  chain forward_loss {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            f"    {rules}  }}\n}}\n"
        )

    def dropped(self) -> int:
        """Datagrams the loss rule dropped so far."""
        out = self.switch.run(["nft", "-j", "list", "table", "bridge", "loss"]).stdout
        total = 0
        for item in json.loads(out)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += int(expr["counter"]["packets"])
        return total


# --------------------------------------------------------------------------- eavesdropper

MCAST_GROUP = "225.0.0.50"
DATA = 3  # wire message type (docs/wire-protocol.md)


def datagram_header(datagram: bytes) -> tuple[int, int, int]:
    """``(type, node, epoch)`` of a sync datagram (body = msgpack array, then a 16-byte MAC)."""
    body = msgpack.unpackb(datagram[:-16])
    return int(body[1]), int(body[2]), int(body[3])


class Eavesdropper:
    """A third host on the sync segment (no key): records the group's datagrams, sends any.

    Its socket is opened inside its namespace (``in_netns``) and read by a thread of the
    test process; :meth:`close` (or the ``with`` block) stops it.
    """

    def __init__(self, cluster: Cluster, host: int = 99) -> None:
        self.ns = cluster.factory.create("eve")
        veth(self.ns, SYNC_IF, cluster.switch, f"s{host}")
        cluster.switch.ip("link", "set", f"s{host}", "master", BRIDGE)
        addr = f"{SYNC_PREFIX}{host}"
        add_addr(self.ns, SYNC_IF, f"{addr}/24")
        with in_netns(self.ns.name):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", SYNC_PORT))
        mreq = struct.pack("4s4s", socket.inet_aton(MCAST_GROUP), socket.inet_aton(addr))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        sock.settimeout(0.1)
        self.sock = sock
        self.heard: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="eavesdropper", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.heard.append(data)

    def take(self) -> list[bytes]:
        """What was heard so far (and forget it)."""
        with self._lock:
            out, self.heard = self.heard, []
        return out

    def send(self, datagrams: Iterable[bytes]) -> int:
        count = 0
        for data in datagrams:
            self.sock.sendto(data, (MCAST_GROUP, SYNC_PORT))
            count += 1
        return count

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def __enter__(self) -> Eavesdropper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- failover site

LAN_IF = "lan0"
WAN_IF = "wan0"
CLIENT_ADDR = "192.0.2.100"
SERVER_ADDR = "198.51.100.100"
VIP_LAN = "192.0.2.1"
VIP_WAN = "198.51.100.1"
FW_LAN = {1: "192.0.2.11", 2: "192.0.2.12"}
FW_WAN = {1: "198.51.100.11", 2: "198.51.100.12"}

#: A firewall that can fail a test: strict TCP tracking (with nf_conntrack_tcp_loose=0),
#: invalid packets dropped and counted, new connections only from the LAN, client traffic
#: SNATed to the server-side VIP (the same mapping on both nodes, unlike masquerade), and
#: the sync link untracked.
FAILOVER_RULESET = f"""\
flush ruleset
table inet fw {{
{SYNC_NOTRACK_CHAINS}    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state invalid counter name invalid_fwd drop
        ct state established,related accept
        iifname "{LAN_IF}" oifname "{WAN_IF}" ct state new accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ct state invalid counter name invalid_in drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{WAN_IF}" ip saddr 192.0.2.0/24 snat ip to {VIP_WAN}
    }}
    counter invalid_fwd {{ }}
    counter invalid_in {{ }}
}}
"""


def send_garp(ns: Namespace, ifname: str, address: str, count: int = 3) -> None:
    """Gratuitous ARP (a request for our own address, as ``arping -U``) from *ifname*.

    Neighbours that cache *address* take the sender's MAC, as after a VRRP failover.
    """
    ip = socket.inet_aton(address)
    with in_netns(ns.name), socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        mac: bytes = sock.getsockname()[4]
        frame = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
        frame += struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
        for _ in range(count):
            sock.send(frame)


@dataclass
class FailoverSite:
    """client -- LAN bridge -- fw1/fw2 -- WAN bridge -- server, plus the sync segment.

    fw1 holds both VIPs at start; ``fw`` nodes come from :attr:`cluster`.
    """

    cluster: Cluster
    client: Namespace
    server: Namespace

    def fw(self, node_id: int) -> Namespace:
        return self.cluster[node_id].ns

    def add_vips(self, node_id: int) -> None:
        ns = self.fw(node_id)
        add_addr(ns, LAN_IF, f"{VIP_LAN}/24")
        add_addr(ns, WAN_IF, f"{VIP_WAN}/24")

    def del_vips(self, node_id: int) -> None:
        ns = self.fw(node_id)
        ns.ip("addr", "del", f"{VIP_LAN}/24", "dev", LAN_IF)
        ns.ip("addr", "del", f"{VIP_WAN}/24", "dev", WAN_IF)

    def announce_vips(self, node_id: int) -> None:
        send_garp(self.fw(node_id), LAN_IF, VIP_LAN)
        send_garp(self.fw(node_id), WAN_IF, VIP_WAN)

    def links(self, node_id: int, state: str) -> None:
        for ifname in (LAN_IF, WAN_IF):
            self.fw(node_id).ip("link", "set", ifname, state)

    def invalid_drops(self, node_id: int) -> int:
        """Packets the fw's ``ct state invalid`` rules dropped (forward + input)."""
        out = self.fw(node_id).run(["nft", "-j", "list", "counters", "table", "inet", "fw"])
        total = 0
        for item in json.loads(out.stdout)["nftables"]:
            if "counter" in item:
                total += int(item["counter"]["packets"])
        return total


def build_failover_site(
    factory: NamespaceFactory, tmp: Path, *, sync: Mapping[str, Any] | None = None
) -> FailoverSite:
    cluster = Cluster(factory, tmp, 2, ruleset=FAILOVER_RULESET, sync=sync)
    sw = cluster.switch
    for bridge in ("brlan", "brwan"):
        sw.ip("link", "add", bridge, "type", "bridge", "mcast_snooping", "0")
        sw.ip("link", "set", bridge, "up")
    client = factory.create("cli")
    server = factory.create("srv")
    for ns, port, bridge in ((client, "lc", "brlan"), (server, "ws", "brwan")):
        veth(ns, "eth0", sw, port)
        sw.ip("link", "set", port, "master", bridge)
    add_addr(client, "eth0", f"{CLIENT_ADDR}/24")
    add_addr(server, "eth0", f"{SERVER_ADDR}/24")
    client.ip("route", "add", "default", "via", VIP_LAN)
    server.ip("route", "add", "default", "via", VIP_WAN)
    for node_id in (1, 2):
        ns = cluster[node_id].ns
        for ifname, port, bridge, addr in (
            (LAN_IF, f"l{node_id}", "brlan", FW_LAN[node_id]),
            (WAN_IF, f"w{node_id}", "brwan", FW_WAN[node_id]),
        ):
            veth(ns, ifname, sw, port)
            sw.ip("link", "set", port, "master", bridge)
            add_addr(ns, ifname, f"{addr}/24")
        ns.sysctl("net.ipv4.ip_forward", 1)
        ns.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)
        ns.sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", 0)
    site = FailoverSite(cluster, client, server)
    site.add_vips(1)
    return site


def tcp_progress(ns: Namespace, dst: str, dport: int) -> dict[int, int]:
    """``local port -> bytes received`` of the namespace's established TCP sockets to dst:dport."""
    peer = f"{dst}:{dport}"
    out = ns.run(["ss", "-tinH", "state", "established", "dst", peer]).stdout
    result: dict[int, int] = {}
    port: int | None = None
    for line in out.splitlines():
        if line and not line[0].isspace():  # "Recv-Q Send-Q local peer", then an info line
            toks = line.split()
            local = toks[toks.index(peer) - 1]
            port = int(local.rsplit(":", 1)[1])
            result[port] = 0
        elif port is not None:
            for tok in line.split():
                if tok.startswith("bytes_received:"):
                    result[port] = int(tok.split(":", 1)[1])
    return result
