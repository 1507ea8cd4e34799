"""Network-namespace plumbing for the root-only ``linux`` tests.

Everything a test touches lives in namespaces this module creates, named
``cts`` + 6 random hex characters (one tag per :class:`NamespaceFactory`,
so per run) + a short role. The rules this module enforces, because tests run
on developer machines and CI hosts that must come out unchanged:

* No address, route, rule or interface is ever added to the host namespace:
  veth pairs are created directly inside their namespaces (``ip -n A link add
  ... peer ... netns B``). Only the documentation ranges 192.0.2.0/24,
  198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32 are used.
* Every process is started in its own session (its pid is its process-group
  id) and is stopped by that id: SIGTERM, then SIGKILL. Nothing is ever
  killed by name.
* Every namespace is deleted on close, whatever the outcome. Context managers
  and pytest finalizers do it normally; an ``atexit`` hook is the safety net.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import os
import queue
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

#: Every namespace name starts with this; the rest is a random tag and a role.
NAME_PREFIX = "cts"
#: Interface names (and, for symmetry, namespace names) are limited to 15 chars.
MAX_NAME_LEN = 15
#: ``python traffic.py ...`` — run inside a namespace as a plain script path.
TRAFFIC_SCRIPT = Path(__file__).with_name("traffic.py")

_CLONE_NEWNET = 0x40000000
_DEFAULT_TIMEOUT = 30.0
_STOP_GRACE = 3.0


class CommandError(subprocess.CalledProcessError):
    """A failed command, with its stdout/stderr in the message (pytest shows it)."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text += f"\n--- {label} ---\n{str(data).rstrip()}"
        return text


def _run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = _DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, list(cmd), proc.stdout, proc.stderr)
    return proc


def new_tag() -> str:
    """A fresh per-run namespace-name prefix: ``cts`` + 6 random hex chars."""
    return NAME_PREFIX + secrets.token_hex(3)


def list_netns() -> list[str]:
    """Names of all named network namespaces on the host (``ip netns list``)."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def traffic_cmd(*args: str) -> list[str]:
    """Command line that runs ``traffic.py`` with this interpreter (unbuffered)."""
    return [sys.executable, "-u", str(TRAFFIC_SCRIPT), *args]


# --------------------------------------------------------------------------- processes


class Process(subprocess.Popen[str]):
    """A ``Popen`` in its own session whose output lines can be awaited.

    stdout and stderr are merged and read by a daemon thread, so
    :meth:`wait_line` can wait for a readiness line (``READY ...``) with a
    timeout instead of sleeping. stdin is a pipe: :meth:`send_line` talks to
    programs that wait for a go-ahead.
    """

    def __init__(self, cmd: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        super().__init__(
            list(cmd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # pid == pgid: stop() can reach its children by id
            env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"out-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.stdout is not None
        for raw in self.stdout:
            line = raw.rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def output(self) -> str:
        """Everything the process printed so far."""
        return "\n".join(self.lines)

    def wait_line(self, prefix: str, timeout: float = 10.0) -> str:
        """Return the next output line starting with *prefix* (earlier lines are skipped).

        Raises ``TimeoutError`` (or ``RuntimeError`` if the process ended) with
        the output so far in the message.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"no line {prefix!r} from pid {self.pid} in {timeout}s; "
                    f"output:\n{self.output()}"
                )
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)  # keep reporting EOF to later callers
                raise RuntimeError(
                    f"pid {self.pid} exited (rc={self.wait(5)}) before {prefix!r}; "
                    f"output:\n{self.output()}"
                )
            if line.startswith(prefix):
                return line

    def send_line(self, text: str) -> None:
        """Write one line to the process's stdin."""
        assert self.stdin is not None
        self.stdin.write(text + "\n")
        self.stdin.flush()

    def finish(self, timeout: float = 10.0) -> int:
        """Wait for a normal exit; return the exit code (raise with output on timeout)."""
        try:
            rc = self.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"pid {self.pid} still running after {timeout}s; output:\n{self.output()}"
            ) from None
        self._reader.join(2)
        return rc

    def stop(self, grace: float = _STOP_GRACE) -> None:
        """Stop the process and its process group by id: SIGTERM, then SIGKILL.

        Signals go out only while the leader is unreaped (running or zombie),
        so its pid, and with it the group id, cannot belong to anyone else.
        Group members that outlive a reaped leader are left to the namespace
        sweep in :meth:`Namespace.close`.
        """
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.returncode is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(grace)
        if self.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stdin.close()
        self.release(0.2)

    def release(self, timeout: float = 2.0) -> None:
        """Close stdout once the reader thread has seen EOF.

        Closing it earlier would block on the reader's lock; EOF comes only
        when every holder of the pipe (daemonised grandchildren too) is gone.
        """
        self._reader.join(timeout)
        if not self._reader.is_alive() and self.stdout is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stdout.close()


# --------------------------------------------------------------------------- namespaces

_LIVE: dict[str, Namespace] = {}
_LIVE_LOCK = threading.Lock()


class Namespace:
    """A named network namespace (``/run/netns/<name>``) owned by this process."""

    def __init__(self, name: str, role: str) -> None:
        """Wrap an already-created namespace; use :meth:`create` to make one."""
        self.name = name
        self.role = role
        self.processes: list[Process] = []
        self.closed = False

    @classmethod
    def create(cls, role: str, *, tag: str | None = None) -> Namespace:
        """Create ``<tag><role>`` (tag defaults to a fresh :func:`new_tag`), lo up.

        IPv6 DAD is switched off for interfaces created later so addresses are
        usable at once (addresses are also added with ``nodad``).
        """
        name = (tag or new_tag()) + role
        if not role.isalnum() or len(name) > MAX_NAME_LEN:
            raise ValueError(f"bad role {role!r}: alphanumeric, name {name!r} max 15 chars")
        _run(["ip", "netns", "add", name])
        ns = cls(name, role)
        with _LIVE_LOCK:
            _LIVE[name] = ns
        try:
            ns.ip("link", "set", "lo", "up")
            ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
            ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
        except BaseException:
            ns.close()
            raise
        return ns

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def exec_prefix(self) -> list[str]:
        """``ip netns exec <name>``: prepend to run any command inside."""
        return ["ip", "netns", "exec", self.name]

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = _DEFAULT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run *cmd* inside the namespace and wait for it (text mode, output captured)."""
        self._check_open()
        return _run([*self.exec_prefix(), *cmd], check=check, input=input, timeout=timeout)

    def popen(self, cmd: Sequence[str], *, env: dict[str, str] | None = None) -> Process:
        """Start *cmd* inside the namespace; it is stopped by pid when the namespace closes."""
        self._check_open()
        proc = Process([*self.exec_prefix(), *cmd], env=env)
        self.processes.append(proc)
        return proc

    def start(self, cmd: Sequence[str], *, ready: str = "READY", timeout: float = 10.0) -> Process:
        """:meth:`popen` then wait for its readiness line (``READY`` by default)."""
        proc = self.popen(cmd)
        proc.wait_line(ready, timeout)
        return proc

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n <name> ...`` (no exec/fork inside the namespace needed)."""
        self._check_open()
        return _run(["ip", "-n", self.name, *args], check=check)

    def nft(self, ruleset: str) -> None:
        """Load an nft ruleset (``nft -f -``); the text is atomic as one transaction."""
        self.run(["nft", "-f", "-"], input=ruleset)

    def sysctl(self, key: str, value: str | int, *, check: bool = True) -> bool:
        """Set a sysctl inside the namespace; with ``check=False`` return success."""
        proc = self.run(["sysctl", "-qw", f"{key}={value}"], check=check)
        return proc.returncode == 0

    def read_sysctl(self, key: str) -> str:
        return self.run(["sysctl", "-n", key]).stdout.strip()

    def conntrack(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the ``conntrack`` CLI inside the namespace."""
        return self.run(["conntrack", *args], check=check)

    def ct_list(self, *args: str) -> list[CtEntry]:
        """``conntrack -L -o extended [args]`` parsed into :class:`CtEntry` objects."""
        out = self.conntrack("-L", "-o", "extended", *args).stdout
        return parse_conntrack(out)

    def ct_expect_list(self, families: Sequence[str] = ("ipv4", "ipv6")) -> list[CtExpect]:
        """The expectation table, parsed into :class:`CtExpect`.

        ``conntrack -L expect`` without ``-f`` lists IPv4 only (unlike
        ``conntrack -L``), so each family is listed separately.
        """
        result: list[CtExpect] = []
        for family in families:
            result += parse_expect(self.conntrack("-L", "expect", "-f", family).stdout)
        return result

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{self.name} is closed")

    def pids(self) -> list[int]:
        """Pids of all processes whose network namespace is this one."""
        out = _run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(tok) for tok in out.split() if tok.isdigit()]

    def close(self) -> None:
        """Stop our processes by pid, then anything left inside, then delete the namespace.

        Idempotent and exception-safe: the namespace is deleted even if
        stopping a process failed or was interrupted; the first error is
        re-raised at the end. A namespace whose deletion failed stays
        registered for :func:`cleanup_all`.
        """
        if self.closed:
            return
        self.closed = True
        errors: list[BaseException] = []
        try:
            for proc in reversed(self.processes):
                try:
                    proc.stop()
                except Exception as exc:  # pragma: no cover - best effort
                    errors.append(exc)
            try:
                self._stop_strays()
            except Exception as exc:  # pragma: no cover - best effort
                errors.append(exc)
            for proc in self.processes:
                proc.release()
        finally:
            self._delete(errors)
        if errors:
            raise errors[0]

    def _delete(self, errors: list[BaseException]) -> None:
        try:
            _run(["ip", "netns", "del", self.name])
        except Exception as exc:
            if self.name in list_netns():
                errors.append(exc)
                return
        with _LIVE_LOCK:
            _LIVE.pop(self.name, None)

    def _stop_strays(self) -> None:
        """Stop processes that left our process groups (daemons) but live in this netns.

        The namespace is unique to this run, so whatever lives in it was started
        by a test; our own pid is skipped (a thread may be inside via setns).
        """
        me = os.getpid()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            strays = [pid for pid in self.pids() if pid != me]
            if not strays:
                return
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + _STOP_GRACE
            while time.monotonic() < deadline and any(p != me for p in self.pids()):
                time.sleep(0.05)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NamespaceFactory:
    """Creates namespaces sharing one random tag and closes them all (LIFO) on close."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or new_tag()
        self.namespaces: list[Namespace] = []

    def create(self, role: str) -> Namespace:
        ns = Namespace.create(role, tag=self.tag)
        self.namespaces.append(ns)
        return ns

    def close(self) -> None:
        errors: list[BaseException] = []
        while self.namespaces:
            try:
                self.namespaces.pop().close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def cleanup_all() -> None:
    """Close every namespace this process still owns (atexit safety net)."""
    with _LIVE_LOCK:
        live = list(_LIVE.values())
    for ns in reversed(live):
        ns.closed = False  # retry even a close() that was interrupted half-way
        with contextlib.suppress(Exception):
            ns.close()


atexit.register(cleanup_all)


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_sigterm_handler() -> None:
    """Turn SIGTERM into KeyboardInterrupt so finalizers and atexit still clean up.

    Only done from the main thread and only if SIGTERM has its default action
    (a killed test run would otherwise leave namespaces and processes behind).
    """
    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


# --------------------------------------------------------------------------- setns

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc  # noqa: PLW0603 - lazily loaded libc handle
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Move the *current thread* into netns *name*; restore the original on exit.

    Sockets opened inside keep that namespace after the thread moves back, so
    a test can open e.g. a NETLINK_NETFILTER socket that sees the namespace's
    conntrack table. Other threads are unaffected (setns is per thread).
    """
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(orig)
    finally:
        os.close(orig)


# --------------------------------------------------------------------------- links & addresses


def veth(ns_a: Namespace, if_a: str, ns_b: Namespace, if_b: str) -> None:
    """A veth pair ``ns_a/if_a <-> ns_b/if_b``, created inside ns_a (never on the host), up."""
    for ifname in (if_a, if_b):
        if not 0 < len(ifname) <= MAX_NAME_LEN:
            raise ValueError(f"interface name {ifname!r}: 1-15 chars")
    ns_a.ip("link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b.name)
    ns_a.ip("link", "set", if_a, "up")
    ns_b.ip("link", "set", if_b, "up")


def _family_flag(addr: str) -> str:
    return "-6" if ":" in addr else "-4"


def add_addr(ns: Namespace, ifname: str, cidr: str) -> None:
    """Add ``cidr`` (e.g. ``192.0.2.2/24`` or ``2001:db8:1::2/64``) to an interface.

    IPv6 addresses get ``nodad`` so they are usable immediately.
    """
    iface = ipaddress.ip_interface(cidr)
    _check_doc_range(iface.ip)
    extra = ["nodad"] if iface.version == 6 else []
    ns.ip(_family_flag(cidr), "addr", "add", cidr, "dev", ifname, *extra)


def add_route(ns: Namespace, dest: str, via: str) -> None:
    """``ip route add <dest> via <via>``; *dest* may be ``default``."""
    ns.ip(_family_flag(via), "route", "add", dest, "via", via)


_DOC_NETS = [
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]


def _check_doc_range(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if not any(addr in net for net in _DOC_NETS):
        raise ValueError(f"{addr} is outside the documentation ranges")


# --------------------------------------------------------------------------- conntrack CLI


@dataclass
class CtEntry:
    """One line of ``conntrack -L -o extended``.

    ``orig``/``reply`` hold the ``src/dst/sport/dport`` (and ICMP ``type/code/id``)
    of each direction; ``fields`` holds the other ``key=value`` pairs (``mark``,
    ``zone``, ``helper``, ``use``, ``labels``...); ``flags`` the bracketed words
    (``ASSURED``, ``UNREPLIED``); ``state`` the TCP state if any.
    """

    family: str
    proto: str
    timeout: int
    state: str | None
    orig: dict[str, str] = field(default_factory=dict)
    reply: dict[str, str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    raw: str = ""

    @property
    def mark(self) -> int:
        return int(self.fields.get("mark", "0"), 0)

    @property
    def zone(self) -> int:
        return int(self.fields.get("zone", "0"), 0)

    def matches(self, **orig: str | int) -> bool:
        """True if every given orig-tuple field equals (``dport=80``, ``dst=...``)."""
        return all(self.orig.get(k) == str(v) for k, v in orig.items())


_TUPLE_KEYS = frozenset({"src", "dst", "sport", "dport", "type", "code", "id"})


def parse_conntrack(text: str) -> list[CtEntry]:
    """Parse ``conntrack -L -o extended`` output (stdout only)."""
    entries: list[CtEntry] = []
    for line in text.splitlines():
        toks = line.split()
        if len(toks) < 5 or not toks[1].isdigit():
            continue
        # ipv4 2 tcp 6 <timeout> [STATE] k=v ... [FLAGS] k=v ...
        entry = CtEntry(family=toks[0], proto=toks[2], timeout=int(toks[4]), state=None, raw=line)
        rest = toks[5:]
        if rest and "=" not in rest[0] and not rest[0].startswith("["):
            entry.state = rest.pop(0)
        current = entry.orig
        for tok in rest:
            if tok.startswith("[") and tok.endswith("]"):
                entry.flags.add(tok[1:-1])
                continue
            key, sep, value = tok.partition("=")
            if not sep:
                continue
            if key in _TUPLE_KEYS:
                if key in current:  # second "src=" starts the reply tuple
                    current = entry.reply
                current[key] = value
            else:
                entry.fields[key] = value
        entries.append(entry)
    return entries


@dataclass
class CtExpect:
    """One line of ``conntrack -L expect``.

    ``tuple`` is the expected connection (``src/dst/sport/dport``), ``mask`` its
    mask, ``master`` the orig tuple of the master (control) connection, and
    ``fields`` the rest (``proto``, ``class``, ``helper``...).
    """

    timeout: int
    tuple: dict[str, str] = field(default_factory=dict)
    mask: dict[str, str] = field(default_factory=dict)
    master: dict[str, str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    raw: str = ""


def parse_expect(text: str) -> list[CtExpect]:
    """Parse ``conntrack -L expect`` output (stdout only)."""
    result: list[CtExpect] = []
    for line in text.splitlines():
        toks = line.split()
        if not toks or not toks[0].isdigit():
            continue
        exp = CtExpect(timeout=int(toks[0]), raw=line)
        current = exp.tuple
        for tok in toks[1:]:
            key, sep, value = tok.partition("=")
            if not sep:
                continue
            section, _, short = key.rpartition("-")
            if section in {"mask", "master"}:
                current = exp.mask if section == "mask" else exp.master
                current[short] = value
            elif key in _TUPLE_KEYS:
                current[key] = value
            else:
                exp.fields[key] = value
        result.append(exp)
    return result


# --------------------------------------------------------------------------- raw ctnetlink

NETLINK_NETFILTER = 12
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_IPCTNL_MSG_CT_GET = (1 << 8) | 1  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
_NLA_TYPE_MASK = 0x3FFF  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER

#: A few ``enum ctattr_type`` values (linux/netfilter/nfnetlink_conntrack.h).
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_HELP = 5
CTA_MARK = 8
CTA_TUPLE_MASTER = 14
CTA_ZONE = 18
CTA_LABELS = 22
CTA_TUPLE_PROTO = 2
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3


def nfct_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket in the calling thread's netns (see :func:`in_netns`)."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
    )
    sock.bind((0, 0))
    sock.settimeout(5)
    return sock


def nla_parse(buf: bytes) -> dict[int, bytes]:
    """Netlink attributes ``type -> payload`` (last one wins; nested stay raw bytes)."""
    attrs: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(buf):
        length, typ = struct.unpack_from("=HH", buf, off)
        if length < 4:
            break
        attrs[typ & _NLA_TYPE_MASK] = bytes(buf[off + 4 : off + length])
        off += (length + 3) & ~3
    return attrs


def nfct_dump(sock: socket.socket, family: int = socket.AF_UNSPEC) -> list[dict[int, bytes]]:
    """Dump the conntrack table the socket sees: top-level CTA_* attributes per entry.

    A deliberately tiny oracle for infrastructure tests, independent of
    ctsync's own codec.
    """
    seq = secrets.randbits(31)
    body = struct.pack("=BBH", family, 0, 0)  # nfgenmsg: family, version 0, res_id 0
    hdr = struct.pack(
        "=IHHII", 16 + len(body), _IPCTNL_MSG_CT_GET, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0
    )
    sock.send(hdr + body)
    entries: list[dict[int, bytes]] = []
    while True:
        data = sock.recv(1 << 20)
        off = 0
        while off + 16 <= len(data):
            length, typ, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
            if typ == _NLMSG_DONE:
                return entries
            if typ == _NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, off + 16)
                if err:
                    raise OSError(-err, f"ctnetlink dump: {os.strerror(-err)}")
            else:
                entries.append(nla_parse(data[off + 20 : off + length]))
            off += (length + 3) & ~3


def nfct_ports(attrs: dict[int, bytes], tuple_attr: int = CTA_TUPLE_ORIG) -> tuple[int, int]:
    """``(sport, dport)`` of a dumped entry's orig (or reply/master) tuple."""
    proto = nla_parse(nla_parse(attrs[tuple_attr])[CTA_TUPLE_PROTO])
    (sport,) = struct.unpack(">H", proto[CTA_PROTO_SRC_PORT])
    (dport,) = struct.unpack(">H", proto[CTA_PROTO_DST_PORT])
    return sport, dport


# --------------------------------------------------------------------------- router topology

CLIENT_V4 = "192.0.2.2"
FW_CLIENT_V4 = "192.0.2.1"
FW_SERVER_V4 = "198.51.100.1"
SERVER_V4 = "198.51.100.2"
CLIENT_V6 = "2001:db8:1::2"
FW_CLIENT_V6 = "2001:db8:1::1"
FW_SERVER_V6 = "2001:db8:2::1"
SERVER_V6 = "2001:db8:2::2"
#: Client connects to DNAT_VIP_V4:DNAT_PORT, fw rewrites it to SERVER_V4:DNAT_TARGET_PORT.
DNAT_VIP_V4 = "203.0.113.10"
DNAT_PORT = 80
DNAT_TARGET_PORT = 8080
FTP_HELPER_PORT = 21
MARK_PORT = 5001
MARK_VALUE = 0x42
LABEL_PORT = 5002
LABEL_BIT = 3
ZONE_PORT = 2121
ZONE_ID = 5

#: Interface names in the router topology (per namespace, so no tag needed).
CLIENT_IF = "eth0"
FW_CLIENT_IF = "fwc0"
FW_SERVER_IF = "fws0"
SERVER_IF = "eth0"

CT_ENABLE_RULESET = """\
# Conntrack only runs in a netns once a rule that uses it is loaded there.
table inet ctsync_ct {
    chain prerouting {
        type filter hook prerouting priority filter; policy accept;
        ct state established,related accept
    }
    chain output {
        type filter hook output priority filter; policy accept;
        ct state established,related accept
    }
}
"""


def build_fw_ruleset(server_if: str = FW_SERVER_IF) -> str:
    """The firewall ruleset of the router topology; each rule says what it is for.

    TCP tracking stays strict (``nf_conntrack_tcp_be_liberal=0``, the default)
    and invalid packets are dropped, so a test that breaks TCP state notices.
    """
    return f"""\
flush ruleset
table inet ctsync_fw {{
    # FTP helper object: attached to port-21 control connections below; it
    # parses PORT/PASV/EPRT/EPSV and creates expectations for data connections
    # (plus NAT of the embedded address through nf_nat_ftp).
    ct helper ftp-standard {{
        type "ftp" protocol tcp
        l3proto inet
    }}

    # Priority raw runs before the conntrack lookup: the only place a zone
    # can be chosen. Both directions of port-{ZONE_PORT} flows go to zone {ZONE_ID}.
    chain raw_prerouting {{
        type filter hook prerouting priority raw; policy accept;
        tcp dport {ZONE_PORT} ct zone set {ZONE_ID}
        tcp sport {ZONE_PORT} ct zone set {ZONE_ID}
    }}

    # DNAT: {DNAT_VIP_V4}:{DNAT_PORT} -> {SERVER_V4}:{DNAT_TARGET_PORT} (reply tuple
    # then comes from the server's real address and port).
    chain nat_prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {DNAT_VIP_V4} tcp dport {DNAT_PORT} dnat ip to {SERVER_V4}:{DNAT_TARGET_PORT}
    }}

    # After the conntrack lookup and DNAT, before confirmation: attach the
    # helper and set mark / label on new (and every later) packet of a flow.
    chain prerouting {{
        type filter hook prerouting priority filter; policy accept;
        tcp dport {FTP_HELPER_PORT} ct helper set "ftp-standard"
        tcp dport {MARK_PORT} ct mark set {MARK_VALUE:#x}
        tcp dport {LABEL_PORT} ct label set {LABEL_BIT}
    }}

    # Strict tracking: packets conntrack classifies INVALID are dropped.
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ct state invalid counter drop
        ct state related meta l4proto tcp counter
    }}

    # SNAT (masquerade) of everything leaving toward the server network,
    # IPv4 to {FW_SERVER_V4}, IPv6 to {FW_SERVER_V6}.
    chain nat_postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{server_if}" masquerade
    }}
}}
"""


@dataclass
class Topology:
    """client -- fw -- server; fw routes, NATs and tracks (see :func:`build_fw_ruleset`)."""

    client: Namespace
    fw: Namespace
    server: Namespace

    def namespaces(self) -> list[Namespace]:
        return [self.client, self.fw, self.server]


def build_router_topology(factory: NamespaceFactory) -> Topology:
    """Create the three namespaces, links, addresses, routes and the fw ruleset.

    client ``eth0`` 192.0.2.2/24, 2001:db8:1::2/64 -- ``fwc0`` 192.0.2.1, 2001:db8:1::1
    fw ``fws0`` 198.51.100.1/24, 2001:db8:2::1/64 -- server ``eth0`` 198.51.100.2, 2001:db8:2::2
    """
    client = factory.create("cli")
    fw = factory.create("fw")
    server = factory.create("srv")
    veth(client, CLIENT_IF, fw, FW_CLIENT_IF)
    veth(fw, FW_SERVER_IF, server, SERVER_IF)
    add_addr(client, CLIENT_IF, f"{CLIENT_V4}/24")
    add_addr(client, CLIENT_IF, f"{CLIENT_V6}/64")
    add_addr(fw, FW_CLIENT_IF, f"{FW_CLIENT_V4}/24")
    add_addr(fw, FW_CLIENT_IF, f"{FW_CLIENT_V6}/64")
    add_addr(fw, FW_SERVER_IF, f"{FW_SERVER_V4}/24")
    add_addr(fw, FW_SERVER_IF, f"{FW_SERVER_V6}/64")
    add_addr(server, SERVER_IF, f"{SERVER_V4}/24")
    add_addr(server, SERVER_IF, f"{SERVER_V6}/64")
    add_route(client, "default", FW_CLIENT_V4)
    add_route(client, "default", FW_CLIENT_V6)
    add_route(server, "default", FW_SERVER_V4)
    add_route(server, "default", FW_SERVER_V6)
    fw.sysctl("net.ipv4.ip_forward", 1)
    fw.sysctl("net.ipv6.conf.all.forwarding", 1)
    fw.nft(build_fw_ruleset())
    fw.sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", 0)
    return Topology(client=client, fw=fw, server=server)
