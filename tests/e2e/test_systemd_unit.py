"""deploy/systemd/ctsync.service under a real systemd: the hardened unit runs the agent.

The unit restricts nearly everything (capabilities, system calls, address families,
read-only file system and /proc/sys, W^X memory, ...) and any of it could break the agent:
a refused system call, an unwritable sysctl, a socket family, the forked commit worker,
the raw VRRP socket, gratuitous ARP over AF_PACKET, SO_RCVBUFFORCE. Here systemd 252
(Debian bookworm, in the ctsync image) boots as PID 1 of a container and the unit, its
tmpfiles.d and modules-load.d files are installed as a package would; then the agent must
do its job through the sandbox, and the tests check the sandbox is really in force (else
they would prove nothing).

The container has no network but its own: a veth pair made inside, ``ct0`` in the
container's namespace (the firewall: 192.0.2.1/24 and 2001:db8::1/64, VIPs 192.0.2.100 and
2001:db8::100), ``ct1`` in a namespace ``peer`` (192.0.2.2, 2001:db8::2) where a second
agent, node 2, runs outside the unit's sandbox (``systemd-run``) as the sync peer, and a
capture of every frame ``ct1`` receives (VRRP adverts, gratuitous ARP, unsolicited NA).

Three tests on one container: the agent with its own VRRP speaker through start (READY=1),
control socket, MASTER + VIPs + GARP/NA on the wire, events, a commit through the forked
worker, reload, watchdog pings, a clean journal and stop (priority 0, VIPs gone); the
watchdog's negative control (a stopped agent is killed and restarted); keepalived's notify
FIFO, metrics and a gateway watch with refused system calls made fatal. The unit is used
as shipped, but for a drop-in with a 3 s watchdog (and, in the last test only, a runtime
drop-in making refused calls kill the process instead of returning EPERM).

How systemd boots here (:func:`docker_run_args`): ``--privileged`` is not used, because it
asks runc for every capability and fails where dockerd's own bounding set lacks one (this
build machine has no CAP_SYS_RESOURCE: "runc create failed: unable to start container
process: unable to apply caps: operation not permitted"); the capabilities systemd needs
are added instead. Docker mounts the cgroup file systems and /proc/sys read-only without
--privileged: a shell before ``exec /lib/systemd/systemd`` remounts systemd's own cgroup
hierarchy (cgroup v1/hybrid: name=systemd; cgroup v2: the whole tree, the container's
cgroup namespace) and the network namespace's /proc/sys/net read-write. The rest of
/proc/sys stays read-only and systemd-sysctl.service is masked, so nothing in the
container can change a sysctl of the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.e2e.compose import ROOT, docker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

T = TypeVar("T")

UNIT_DIR = ROOT / "deploy" / "systemd"
PEER_NS = "peer"
ADDR, PEER_ADDR = "192.0.2.1", "192.0.2.2"
ADDR6, PEER_ADDR6 = "2001:db8::1", "2001:db8::2"
VIP, VIP6 = "192.0.2.100", "2001:db8::100"
#: The commit worker takes half of a commit from this many entries (commit_pool.MIN_SPLIT).
PEER_ENTRIES = 3000
#: The test's drop-in: several watchdog periods pass during the test.
WATCHDOG_SEC = 3

#: Capabilities of the container: what systemd and the unit's sandbox need (mount
#: namespaces, bounding sets, private /dev, ...), none that reaches beyond the container's
#: namespaces (no SYS_MODULE, SYS_TIME, SYS_BOOT, SYS_RAWIO, SYSLOG, MAC_*); each one only
#: if dockerd can grant it (see :func:`grantable`).
CAPABILITIES = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "DAC_READ_SEARCH": 2,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11,
    "NET_ADMIN": 12,
    "NET_RAW": 13,
    "IPC_LOCK": 14,
    "IPC_OWNER": 15,
    "SYS_CHROOT": 18,
    "SYS_PTRACE": 19,
    "SYS_ADMIN": 21,
    "SYS_NICE": 23,
    "SYS_RESOURCE": 24,
    "MKNOD": 27,
    "LEASE": 28,
    "AUDIT_WRITE": 29,
    "SETFCAP": 31,
}
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13

#: PID 1 of the container: make the mounts systemd must write read-write, then systemd.
BOOT = """\
set -e
if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
    mount -o remount,bind,rw /sys/fs/cgroup
elif [ -d /sys/fs/cgroup/systemd ]; then
    mount -o remount,bind,rw /sys/fs/cgroup/systemd
fi
mount --bind /proc/sys/net /proc/sys/net
mount -o remount,bind,rw /proc/sys/net
exec /lib/systemd/systemd
"""

#: Every frame ct1 receives, one line each: VRRP adverts (with their priority), gratuitous
#: ARP, unsolicited neighbour advertisements. Runs in the peer namespace.
CAPTURE = r"""
import socket, struct, sys

out = open(sys.argv[1], "a", buffering=1)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
sock.bind((sys.argv[2], 0))
while True:
    frame, addr = sock.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING or len(frame) < 42:
        continue
    (etype,) = struct.unpack_from("!H", frame, 12)
    if etype == 0x0806:
        spa, tpa = socket.inet_ntoa(frame[28:32]), socket.inet_ntoa(frame[38:42])
        if spa == tpa:
            print("garp", spa, file=out)
    elif etype == 0x0800 and frame[23] == 112:
        vrrp = frame[14 + (frame[14] & 0xF) * 4 :]
        print("vrrp4", socket.inet_ntoa(frame[26:30]), vrrp[1], vrrp[2], file=out)
    elif etype == 0x86DD and len(frame) >= 58:
        src = socket.inet_ntop(socket.AF_INET6, frame[22:38])
        payload = frame[54:]
        if frame[20] == 112:
            print("vrrp6", src, payload[1], payload[2], file=out)
        elif frame[20] == 58 and payload[0] == 136 and len(payload) >= 24:
            print("na", socket.inet_ntop(socket.AF_INET6, payload[8:24]), file=out)
"""

CONFIG = f"""\
# The firewall, node 1: ctsync's own VRRP speaker (IPv4 and IPv6 in one sync group).
node-id = 1

[sync]
interface = "ct0"
listen-address = "{ADDR}"
peer = ["{PEER_ADDR}"]
accept-protocol = ["tcp", "udp", "icmp"]
ignore-address = ["{ADDR}", "{PEER_ADDR}", "{VIP}"]
startup-resync = true
alive-interval = 0.2
peer-dead-after = 1.0

[auth]
key-file = "/etc/ctsync/sync.key"

[failover]
mechanism = "vrrp"

[vrrp]
sync-group = "G1"

[[vrrp.instance]]
name = "VI_4"
interface = "ct0"
virtual-router-id = 51
version = 3
priority = 100
advert-int = 0.2
virtual-address = ["{VIP}/24"]

[[vrrp.instance]]
name = "VI_6"
interface = "ct0"
virtual-router-id = 52
version = 3
priority = 100
advert-int = 0.2
virtual-address = ["{VIP6}/64"]
"""

PEER_CONFIG = f"""\
# The sync peer, node 2, in the namespace {PEER_NS!r}: no failover role, it only syncs.
node-id = 2

[sync]
interface = "ct1"
listen-address = "{PEER_ADDR}"
peer = ["{ADDR}"]
alive-interval = 0.2
peer-dead-after = 1.0

[auth]
key-file = "/etc/ctsync/sync.key"

[control]
socket = "/run/ctsync-peer/ctsync.sock"
"""

#: The other failover mechanism: keepalived's notify FIFO, in the unit's runtime directory
#: (the agent makes it: mkfifo under the syscall filter); plus the metrics endpoint and a
#: gateway watch (ICMP probes from a raw socket) at the peer.
KEEPALIVED_CONFIG = f"""\
node-id = 1

[sync]
interface = "ct0"
listen-address = "{ADDR}"
peer = ["{PEER_ADDR}"]
startup-resync = true

[auth]
key-file = "/etc/ctsync/sync.key"

[failover]
mechanism = "keepalived"
notify-fifo = "/run/ctsync/keepalived.fifo"
instance = "VI_1"

[metrics]
listen = "127.0.0.1:9724"

[[gateway-watch]]
name = "peer"
address = "{PEER_ADDR}"
interval = 0.5
timeout = 0.4

[gateway-watch.match]
src = "198.51.100.0/24"
"""

#: conntrack is only active in a namespace with hooks that use it.
RULESET = """\
flush ruleset
table inet fw {
    chain input {
        type filter hook input priority filter; policy accept;
        ct state invalid drop
        ct state established,related accept
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state invalid drop
    }
}
"""

DROP_IN = f"""\
# The test's only change to the unit: a short watchdog, so that the test sees several
# periods pass and a hung agent killed in seconds; SIGKILL rather than SIGABRT, so that
# the hung agent leaves no core dump (core_pattern is the host's).
[Service]
WatchdogSec={WATCHDOG_SEC}s
WatchdogSignal=SIGKILL
"""

#: Journal lines of the unit that mean something went wrong (the agent logs to stderr,
#: which the journal stores at priority info whatever the level, hence the text match).
BAD_LINE = re.compile(
    r"EPERM|not permitted|permission denied|denied|read-only file system|"
    r"level=(warning|error|critical)|Traceback|Failed with result|Main process exited|"
    r"Watchdog timeout|code=(killed|dumped)|Failed to",
    re.IGNORECASE,
)


class WaitTimeoutError(AssertionError):
    pass


def wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    describe: Callable[[], str] | None = None,
    interval: float = 0.2,
) -> T:
    """Call *probe* until it returns something truthy; return that, or fail after *timeout*
    with *describe*'s account of the state."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            result = probe()
        except (AssertionError, subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
            result, last = None, exc
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe is not None else ""
            raise WaitTimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what}"
                + (f" (last error: {last!r})" if last else "")
                + detail
            )
        time.sleep(interval)


def grantable() -> list[str]:
    """The capabilities of :data:`CAPABILITIES` in this host's bounding set (dockerd's is
    the same unless it runs in another container), in docker's spelling."""
    bounding = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            bounding = int(line.split()[1], 16)
    return [name for name, bit in CAPABILITIES.items() if bounding >> bit & 1]


def docker_run_args(name: str, image: str) -> list[str]:
    """``docker run`` arguments under which systemd 252 boots as the container's PID 1."""
    args = ["run", "-d", "--name", name, "--hostname", "ctsync-systemd"]
    args += ["--label", "org.ctsync.test=systemd-unit"]
    args += ["--cap-drop", "ALL"]
    for cap in grantable():
        args += ["--cap-add", cap]
    # systemd mounts file systems for the unit's sandbox: docker's seccomp and AppArmor
    # profiles refuse mount(2).
    args += ["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"]
    # Its own cgroup tree: systemd manages the container's subtree as its root.
    args += ["--cgroupns", "private"]
    args += ["--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp"]
    args += ["-e", "container=docker", "--stop-signal", "SIGRTMIN+3"]
    # No sysctl of the host: systemd-sysctl would apply sysctl.d's kernel.* settings.
    args += ["-v", "/dev/null:/etc/systemd/system/systemd-sysctl.service:ro"]
    args += ["--network", "none"]
    args += ["--entrypoint", "/bin/sh", image, "-c", BOOT]
    return args


class Box:
    """One container with systemd as PID 1."""

    def __init__(self, container: str) -> None:
        self.container = container

    def sh(
        self, script: str, *, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["docker", "exec", "-i", self.container, "sh", "-c", script],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"`{script}` exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                f"{done.stderr[-3000:]}"
            )
        return done

    def out(self, script: str, timeout: float = 60) -> str:
        return self.sh(script, timeout=timeout).stdout.strip()

    def put(self, path: str, text: str, mode: str = "0644") -> None:
        self.sh(
            f"mkdir -p {shlex.quote(str(Path(path).parent))} && umask 077 && "
            f"cat > {shlex.quote(path)} && chmod {mode} {shlex.quote(path)}",
            input=text,
        )

    def show(self, prop: str, unit: str = "ctsync") -> str:
        return self.out(f"systemctl show -P {prop} {unit}")

    def ctl(self, *args: str, timeout: float = 30) -> Any:
        """``ctsync ARGS --json`` of the agent under test."""
        return json.loads(self.out(shlex.join(["ctsync", *args, "--json"]), timeout=timeout))

    def journal(self, after: str = "", lines: int | None = None) -> str:
        """The unit's journal (systemd's lines about it and the agent's), from *after*."""
        since = f" --after-cursor={shlex.quote(after)}" if after else ""
        tail = f" -n {lines}" if lines else ""
        return self.out(f"journalctl -u ctsync --no-pager -o short-monotonic{since}{tail}")

    def cursor(self) -> str:
        """Where the journal ends now: :meth:`journal` ``after=`` it shows what follows."""
        text = self.out("journalctl -n 0 --show-cursor --no-pager")
        return text.rsplit("-- cursor: ", 1)[1].strip()

    def clean_journal(self, after: str) -> str:
        """The journal since *after*, asserted free of errors, refusals and warnings."""
        journal = self.journal(after)
        bad = [line for line in journal.splitlines() if BAD_LINE.search(line)]
        assert not bad, "\n".join(bad)
        return journal

    def capture(self) -> list[list[str]]:
        return [line.split() for line in self.out("cat /tmp/capture.log").splitlines()]

    def addresses(self) -> str:
        return self.out("ip -o addr show dev ct0")


def stat_field(status: str, field: str) -> str:
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return value.strip()
    raise KeyError(field)


@pytest.fixture(scope="module")
def box(image: str) -> Iterator[Box]:
    """A booted systemd container with the unit installed and configured (not started)."""
    name = f"ctsync-systemd-{os.getpid()}-{secrets.token_hex(3)}"
    container = ""
    try:
        started = time.monotonic()
        container = docker(*docker_run_args(name, image)).stdout.strip()
        box = Box(container)

        def booted() -> str | None:
            state = box.sh("systemctl is-system-running", check=False).stdout.strip()
            return state if state in ("running", "degraded") else None

        try:
            state = wait_for(booted, 60, "systemd to boot in the container")
        except WaitTimeoutError:
            logs = docker("logs", "--tail", "40", container, check=False)
            raise AssertionError(
                f"systemd did not boot:\n{logs.stdout}{logs.stderr}\n"
                + box.sh("systemctl list-jobs; systemctl --failed", check=False).stdout
            ) from None
        version = box.out("systemctl --version | head -n 1")
        print(f"{version}: {state} in {time.monotonic() - started:.1f}s")
        if state == "degraded":
            print("failed units:\n" + box.out("systemctl --failed --no-legend"))
        install(box)
        start_helpers(box)
        yield box
    finally:
        if container:
            with contextlib.suppress(Exception):
                print(
                    "--- journal (ctsync, ctsync-peer) ---\n"
                    + Box(container)
                    .sh("journalctl -u ctsync -u ctsync-peer --no-pager -n 120", check=False)
                    .stdout
                )
            docker("rm", "-f", "-v", container, check=False, timeout=120)


def install(box: Box) -> None:
    """Network, the unit files as a package installs them, configs, ruleset, helpers."""
    # No DAD: the VRRP speaker and the NAs use the addresses at once.
    box.sh(
        "set -e;"
        " sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0"
        " net.ipv6.conf.default.accept_dad=0;"
        f" ip netns add {PEER_NS};"
        f" ip link add ct0 type veth peer name ct1 netns {PEER_NS};"
        f" ip addr add {ADDR}/24 dev ct0; ip addr add {ADDR6}/64 dev ct0; ip link set ct0 up;"
        f" ip -n {PEER_NS} link set lo up;"
        f" ip -n {PEER_NS} addr add {PEER_ADDR}/24 dev ct1;"
        f" ip -n {PEER_NS} addr add {PEER_ADDR6}/64 dev ct1;"
        f" ip -n {PEER_NS} link set ct1 up"
    )
    for source, target in (
        ("ctsync.service", "/usr/lib/systemd/system/ctsync.service"),
        ("ctsync.tmpfiles", "/usr/lib/tmpfiles.d/ctsync.conf"),
        ("ctsync.modules-load.conf", "/usr/lib/modules-load.d/ctsync.conf"),
    ):
        box.put(target, (UNIT_DIR / source).read_text())
    # The path the unit names; a distribution package puts ctsync there.
    box.sh("ln -sf /opt/ctsync/bin/ctsync /usr/bin/ctsync")
    box.put("/etc/systemd/system/ctsync.service.d/test.conf", DROP_IN)
    box.put("/etc/ctsync/ctsync.toml", CONFIG)
    box.put("/etc/ctsync/peer.toml", PEER_CONFIG)
    box.put("/etc/ctsync/sync.key", secrets.token_urlsafe(48) + "\n", mode="0600")
    box.put("/etc/nftables.conf", RULESET)
    box.put("/usr/local/lib/ctsync-test/capture.py", CAPTURE)
    flows = "".join(
        f"-I -s 203.0.113.{10 + i // 1000} -d 198.51.100.20 -p tcp --sport {1024 + i % 1000}"
        " --dport 443 -t 3600 -u SEEN_REPLY,ASSURED --state ESTABLISHED\n"
        for i in range(PEER_ENTRIES)
    )
    box.put("/tmp/peer-flows.txt", flows)
    box.sh("nft -f /etc/nftables.conf")
    # What a package's postinst does (dh_installsystemd, dh_installtmpfiles); the modules
    # are loaded on the host already (or built in), modules-load finds nothing to do.
    box.sh("systemd-tmpfiles --create /usr/lib/tmpfiles.d/ctsync.conf && systemctl daemon-reload")
    modules = box.sh("/lib/systemd/systemd-modules-load", check=False)
    print(f"systemd-modules-load: exit {modules.returncode} {modules.stderr.strip()}")
    assert box.out("stat -c '%a %U %G' /run/ctsync") == "750 root root"
    # The unit file itself: no unknown directive, no bad value (--man=no: no man pages here).
    verify = box.sh("systemd-analyze verify --man=no ctsync.service", check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    assert box.out("ctsync config check /etc/ctsync/ctsync.toml >/dev/null && echo ok") == "ok"


def start_helpers(box: Box) -> None:
    """The capture on ct1 and the peer agent, both in the peer namespace."""
    netns = f"NetworkNamespacePath=/run/netns/{PEER_NS}"
    box.sh(
        f"systemd-run -q --unit ctsync-capture -p {netns} /usr/bin/python3"
        " /usr/local/lib/ctsync-test/capture.py /tmp/capture.log ct1"
    )
    box.sh(
        f"systemd-run -q --unit ctsync-peer -p {netns} -p RuntimeDirectory=ctsync-peer"
        " /usr/bin/ctsync agent -c /etc/ctsync/peer.toml"
    )
    wait_for(
        lambda: (
            box.sh("ctsync show status -S /run/ctsync-peer/ctsync.sock", check=False).returncode
            == 0
        ),
        20,
        "the peer agent to answer",
    )


def stop_quickly(box: Box, cursor: str) -> float:
    """``systemctl stop ctsync``: the agent exits on SIGTERM within seconds, cleanly."""
    t0 = time.monotonic()
    box.sh("systemctl stop ctsync", timeout=90)
    took = time.monotonic() - t0
    result = box.show("Result")
    assert took < 5 and result == "success", (
        f"`systemctl stop ctsync` took {took:.1f}s, Result={result}: the agent did not exit"
        f" promptly on SIGTERM\n{box.journal(cursor, lines=40)}"
    )
    assert box.out("systemctl is-active ctsync; true") == "inactive"
    return took


def load_peer_entries(box: Box) -> None:
    """:data:`PEER_ENTRIES` connections in the peer's kernel table (once)."""
    count = int(box.out(f"ip netns exec {PEER_NS} conntrack -C"))
    if count < PEER_ENTRIES:
        box.sh(f"ip netns exec {PEER_NS} conntrack -R /tmp/peer-flows.txt", timeout=120)


def test_agent_runs_in_the_hardened_unit(box: Box) -> None:
    box.put("/etc/ctsync/ctsync.toml", CONFIG)
    box.sh("echo 0 > /proc/sys/net/netfilter/nf_conntrack_events")
    cursor = box.cursor()
    rmem_max = int(box.out("cat /proc/sys/net/core/rmem_max"))

    # Type=notify: `systemctl start` returns once the agent sent READY=1.
    t0 = time.monotonic()
    start = box.sh("systemctl start ctsync", check=False, timeout=60)
    took = time.monotonic() - t0
    assert start.returncode == 0, f"{start.stderr}\n{box.journal(lines=60)}"
    started = time.monotonic()
    print(f"systemctl start ctsync: {took:.2f}s")
    assert box.out("systemctl is-active ctsync") == "active"
    assert re.fullmatch(r"\d+ entries", box.show("StatusText")), box.show("StatusText")
    main_pid = int(box.show("MainPID"))
    assert main_pid > 0

    # The sandbox is in force (else nothing below proves anything): only the two
    # capabilities, no new privileges, a seccomp filter; the same in the commit worker.
    status = box.out(f"cat /proc/{main_pid}/status")
    assert int(stat_field(status, "CapBnd"), 16) == 1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW
    assert stat_field(status, "NoNewPrivs") == "1"
    assert stat_field(status, "Seccomp") == "2"
    workers = box.out(f"pgrep -P {main_pid}").split()
    assert len(workers) == 1, f"expected one commit worker, found {workers}"
    worker = int(workers[0])
    assert stat_field(box.out(f"cat /proc/{worker}/status"), "Seccomp") == "2"
    mounts = box.out(f"nsenter -t {main_pid} -m cat /proc/self/mountinfo")
    writable = {
        fields[4]: "rw" in fields[5].split(",")
        for fields in (line.split() for line in mounts.splitlines())
    }
    expected = {
        "/": False,
        "/proc/sys": False,
        "/proc/sys/net/netfilter": True,
        "/run/ctsync": True,
    }
    assert {path: writable.get(path) for path in expected} == expected, mounts

    # ReadWritePaths=/proc/sys/net/netfilter: the agent turned conntrack events on.
    assert box.out("cat /proc/sys/net/netfilter/nf_conntrack_events") == "1"
    # SO_RCVBUFFORCE (CAP_NET_ADMIN): the event buffer is the configured 8 MiB, beyond
    # rmem_max where that is lower (SO_RCVBUF would be capped there).
    stats = box.ctl("show", "statistics")
    assert stats["netlink"]["buffer_size"] == 8 << 20, stats["netlink"]
    print(f"event buffer {stats['netlink']['buffer_size']} bytes, rmem_max {rmem_max}")

    # The control socket in /run/ctsync answers; the speaker became MASTER and holds the
    # VIPs, after sending its adverts and GARP/NA out of ct0.
    def master() -> dict[str, Any] | None:
        answer: dict[str, Any] = box.ctl("show", "status")
        return answer if answer["state"] == "MASTER" else None

    state = wait_for(master, 15, "the agent to become MASTER")
    assert {i["name"]: i["state"] for i in state["vrrp"]["instances"]} == {
        "VI_4": "MASTER",
        "VI_6": "MASTER",
    }
    assert box.out("stat -c %F /run/ctsync/ctsync.sock") == "socket"
    addresses = box.addresses()
    assert f"inet {VIP}/24" in addresses and f"inet6 {VIP6}/64" in addresses, addresses

    def on_the_wire() -> set[str] | None:
        seen = {" ".join(f[:2]) for f in box.capture() if f[0] in ("garp", "na")}
        seen |= {f"{f[0]} {f[3]}" for f in box.capture() if f[0].startswith("vrrp")}
        want = {f"garp {VIP}", f"na {VIP6}", "vrrp4 100", "vrrp6 100"}
        return seen if want <= seen else None

    wait_for(
        on_the_wire,
        10,
        "adverts, gratuitous ARP and NA on ct1",
        describe=lambda: (
            f"captured: {sorted({' '.join(f) for f in box.capture()})}\n" + box.journal(cursor)
        ),
    )

    # A connection created in this namespace reaches the internal cache (ctnetlink events).
    box.sh(
        "conntrack -I -s 198.51.100.10 -d 203.0.113.10 -p tcp --sport 40000 --dport 443"
        " -t 600 -u SEEN_REPLY,ASSURED --state ESTABLISHED"
    )
    wait_for(
        lambda: any(
            e["original"]["sport"] == 40000 and e["original"]["dst"] == "203.0.113.10"
            for e in box.ctl("show", "cache", "internal", "-s", "198.51.100.10")
        ),
        10,
        "the conntrack entry in the internal cache",
    )

    # The peer's connections arrive over the authenticated sync link (external cache);
    # `ctsync commit` writes them into this kernel, half of them through the commit worker
    # (forked at start, prctl(PR_SET_PDEATHSIG) under the syscall filter).
    load_peer_entries(box)
    wait_for(
        lambda: box.ctl("show", "statistics")["external"]["active"] >= PEER_ENTRIES,
        30,
        f"{PEER_ENTRIES} peer entries in the external cache",
    )
    commit = box.ctl("commit", timeout=60)
    assert commit["committed"] == PEER_ENTRIES and commit["failed"] == 0, commit
    kernel = box.out("conntrack -L -p tcp --dport 443 -d 198.51.100.20 2>/dev/null | wc -l")
    assert int(kernel) == PEER_ENTRIES
    assert box.out(f"pgrep -P {main_pid}").split() == [str(worker)], "the worker died"

    # SIGHUP (ExecReload=) re-reads the configuration; the agent stays.
    box.sh("systemctl reload ctsync", timeout=30)
    assert box.out("systemctl is-active ctsync") == "active"
    assert int(box.show("MainPID")) == main_pid
    wait_for(lambda: "configuration reloaded" in box.journal(cursor), 10, "the reload")

    # WATCHDOG=1 (every WatchdogSec/2) keeps it alive over several periods.
    assert box.show("WatchdogUSec") == f"{WATCHDOG_SEC}s"
    time.sleep(max(0.0, 3 * WATCHDOG_SEC + 1 - (time.monotonic() - started)))
    assert box.out("systemctl is-active ctsync") == "active"
    assert int(box.show("MainPID")) == main_pid and box.show("NRestarts") == "0"

    assert "ctsync agent started" in box.clean_journal(cursor)

    security = box.sh("systemd-analyze security --no-pager ctsync.service", check=False)
    assert security.returncode == 0, security.stderr
    print(security.stdout.strip().splitlines()[-1])

    # SIGTERM: priority-0 adverts (a backup takes over at once), VIPs removed, quickly.
    print(f"systemctl stop ctsync: {stop_quickly(box, cursor):.2f}s")
    addresses = box.addresses()
    assert VIP not in addresses and VIP6 not in addresses, addresses
    wait_for(
        lambda: (
            {f[0] for f in box.capture() if f[0].startswith("vrrp") and f[3] == "0"}
            == {"vrrp4", "vrrp6"}
        ),
        5,
        "priority-0 adverts of both instances on ct1",
    )
    # The runtime directory stays (RuntimeDirectoryPreserve=yes: keepalived's FIFO).
    assert box.out("test -d /run/ctsync && echo kept") == "kept"


def test_watchdog_restarts_a_hung_agent(box: Box) -> None:
    """The negative control of the watchdog check: an agent that stops pinging is killed
    after WatchdogSec and started again (Restart=on-failure, RestartSec=5s)."""
    box.put("/etc/ctsync/ctsync.toml", CONFIG)
    cursor = box.cursor()
    box.sh("systemctl start ctsync", timeout=60)
    hung = int(box.show("MainPID"))
    restarts = int(box.show("NRestarts"))
    box.sh("systemctl kill --kill-who=main --signal=SIGSTOP ctsync")
    t0 = time.monotonic()

    def restarted() -> int | None:
        pid = int(box.show("MainPID"))
        active = box.out("systemctl is-active ctsync; true") == "active"
        return pid if active and pid not in (0, hung) else None

    wait_for(restarted, WATCHDOG_SEC + 5 + 20, "the hung agent to be killed and restarted")
    print(f"hung agent replaced after {time.monotonic() - t0:.1f}s")
    assert int(box.show("NRestarts")) == restarts + 1
    assert f"Watchdog timeout (limit {WATCHDOG_SEC}s)" in box.journal(cursor)
    box.ctl("show", "status")  # the new agent answers
    box.sh("systemctl stop ctsync", timeout=90)


def test_keepalived_mode_with_refused_calls_fatal(box: Box) -> None:
    """keepalived drives the role through its notify FIFO in /run/ctsync (the agent makes
    it); the MASTER commit takes the peer's entries through the commit worker; the metrics
    endpoint answers; the gateway watch probes over a raw ICMP socket.

    The unit's filter answers a refused system call with EPERM, which code that ignores the
    result (the worker's ctypes prctl) would never show. Here, with the same filter, a
    refused call kills the process (a runtime drop-in, removed at the end): the agent and
    its worker surviving all of this proves that none was made.
    """
    box.put("/etc/ctsync/ctsync.toml", KEEPALIVED_CONFIG)
    strict = "/run/systemd/system/ctsync.service.d/refused-calls-fatal.conf"
    box.put(strict, "[Service]\nSystemCallErrorNumber=kill\n")
    load_peer_entries(box)
    try:
        box.sh("systemctl daemon-reload")
        # EPERM (1) is the unit's; systemd shows "kill" as its own marker, INT_MAX - 1.
        assert box.show("SystemCallErrorNumber") == str(2**31 - 2)
        cursor = box.cursor()
        box.sh("systemctl start ctsync", timeout=60)
        main_pid = int(box.show("MainPID"))
        workers = box.out(f"pgrep -P {main_pid}").split()
        assert len(workers) == 1, workers
        fifo = "/run/ctsync/keepalived.fifo"
        assert box.out(f"stat -c '%F %a' {fifo}") == "fifo 600"
        # The peer's table (still PEER_ENTRIES entries from the first test) comes over.
        wait_for(
            lambda: box.ctl("show", "statistics")["external"]["active"] >= PEER_ENTRIES,
            30,
            "the peer's entries in the external cache",
        )
        # What keepalived writes (vrrp_notify_fifo): the agent follows instance VI_1.
        box.sh(f"echo 'INSTANCE \"VI_1\" MASTER 100' > {fifo}", timeout=10)

        def master_commit() -> dict[str, Any] | None:
            status = box.ctl("show", "status")
            transition = status["last_transition"]
            if status["state"] != "MASTER" or transition.get("done") is None:
                return None
            (step,) = [s for s in transition["steps"] if s["step"] == "commit"]
            result: dict[str, Any] = step["result"]
            return result

        commit = wait_for(master_commit, 15, "MASTER (from the FIFO) and its commit")
        assert commit["attempted"] >= PEER_ENTRIES and commit["failed"] == 0, commit
        assert box.out(f"pgrep -P {main_pid}").split() == workers, "the commit worker died"
        metrics = box.out(
            "python3 -c 'import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
            '"http://127.0.0.1:9724/metrics", timeout=5).read().decode())\''
        )
        assert re.search(r"^ctsync_node_id 1(\.0)?$", metrics, re.MULTILINE), metrics[:2000]

        def gateway_up() -> bool:
            (gateway,) = box.ctl("show", "status")["gateways"]
            return bool(gateway["state"] == "up" and gateway["probes"]["error"] == 0)

        wait_for(gateway_up, 15, "the gateway watch to see the peer up")
        box.sh("systemctl reload ctsync", timeout=30)
        assert box.out("systemctl is-active ctsync") == "active"
        stop_quickly(box, cursor)
        assert box.show("NRestarts") == "0"
        box.clean_journal(cursor)
    finally:
        box.sh(f"rm -f {strict} && systemctl daemon-reload", check=False)
