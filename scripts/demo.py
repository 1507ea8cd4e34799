#!/usr/bin/env python3
"""ctsync demo: a NAT firewall in network namespaces, its live conntrack table read by ctsync.

Builds client -- fw -- server namespaces (documentation addresses only), opens a few TCP
connections and pings through the firewall (masquerade and a port forward), then shows the
firewall's table with `ctsync show conntrack table ipv4|ipv6` and one entry as JSON.
Everything it creates is removed at the end, whatever happens. Needs root.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CTSYNC = [sys.executable, "-m", "ctsync"]
SUFFIX = secrets.token_hex(3)
CLIENT, FW, SERVER = (f"ctsd{SUFFIX}{role}" for role in ("c", "f", "s"))

FW_RULESET = """
table inet demo {
    chain forward {
        type filter hook forward priority 0; policy accept;
        ct state invalid drop
        ct state established,related accept
    }
    chain prerouting {
        type nat hook prerouting priority -100;
        ip daddr 203.0.113.10 tcp dport 80 dnat ip to 198.51.100.2:8080
    }
    chain postrouting {
        type nat hook postrouting priority 100;
        oifname "fw-s" masquerade
    }
}
"""

SERVER_PROGRAM = """
import socket, threading
def serve(family, addr, port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(64)
    while True:
        c, _ = s.accept()
        echo = lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(4096), b"")]
        threading.Thread(target=echo, daemon=True).start()
for fam, addr in ((socket.AF_INET, "198.51.100.2"), (socket.AF_INET6, "2001:db8:2::2")):
    for port in (8080, 5001):
        threading.Thread(target=serve, args=(fam, addr, port), daemon=True).start()
print("READY", flush=True)
threading.Event().wait()
"""

CLIENT_PROGRAM = """
import socket, sys, time
conns = []
targets = [("203.0.113.10", 80), ("198.51.100.2", 5001), ("2001:db8:2::2", 5001)]
for host, port in targets:
    for _ in range(2):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"hello"); s.recv(16)
        conns.append(s)
print("OPEN", len(conns), flush=True)
sys.stdin.readline()
"""


def run(*cmd: str, ns: str | None = None, check: bool = True, quiet: bool = False) -> str:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    done = subprocess.run(full, check=False, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed: {done.stderr.strip()}")
    if not quiet and done.stdout:
        print(done.stdout, end="")
    return done.stdout


def setup() -> None:
    for ns in (CLIENT, FW, SERVER):
        run("ip", "netns", "add", ns)
        run("ip", "link", "set", "lo", "up", ns=ns)
    run("ip", "link", "add", "c-f", "netns", CLIENT, "type", "veth", "peer", "fw-c", "netns", FW)
    run("ip", "link", "add", "fw-s", "netns", FW, "type", "veth", "peer", "s-f", "netns", SERVER)
    for ns, dev, addrs in (
        (CLIENT, "c-f", ("192.0.2.2/24", "2001:db8:1::2/64")),
        (FW, "fw-c", ("192.0.2.1/24", "2001:db8:1::1/64")),
        (FW, "fw-s", ("198.51.100.1/24", "2001:db8:2::1/64")),
        (SERVER, "s-f", ("198.51.100.2/24", "2001:db8:2::2/64")),
    ):
        for a in addrs:
            run("ip", "addr", "add", a, "dev", dev, *(["nodad"] if ":" in a else []), ns=ns)
        run("ip", "link", "set", dev, "up", ns=ns)
    run("ip", "route", "add", "default", "via", "192.0.2.1", ns=CLIENT)
    run("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1", ns=CLIENT)
    run("ip", "route", "add", "default", "via", "198.51.100.1", ns=SERVER)
    run("ip", "-6", "route", "add", "default", "via", "2001:db8:2::1", ns=SERVER)
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=FW)
    run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=FW)
    subprocess.run(
        ["ip", "netns", "exec", FW, "nft", "-f", "-"], input=FW_RULESET, text=True, check=True
    )


def main() -> int:
    if os.geteuid() != 0:
        print("the demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            print(f"the demo needs {tool!r}: run `make demo`, which installs it", file=sys.stderr)
            return 1
    procs: list[subprocess.Popen[str]] = []
    try:
        print(f"== creating namespaces {CLIENT} -- {FW} (NAT firewall) -- {SERVER}")
        setup()
        server = subprocess.Popen(
            ["ip", "netns", "exec", SERVER, sys.executable, "-c", SERVER_PROGRAM],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(server)
        assert server.stdout is not None
        server.stdout.readline()
        run("ping", "-c", "2", "-i", "0.2", "-q", "198.51.100.2", ns=CLIENT, quiet=True)
        client = subprocess.Popen(
            ["ip", "netns", "exec", CLIENT, sys.executable, "-c", CLIENT_PROGRAM],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(client)
        assert client.stdout is not None
        print("== client:", client.stdout.readline().strip(), "connections through the firewall")
        time.sleep(0.2)
        print(f"\n== ctsync show conntrack table ipv4   (inside {FW})")
        run(*CTSYNC, "show", "conntrack", "table", "ipv4", ns=FW)
        print(f"\n== ctsync show conntrack table ipv6   (inside {FW})")
        run(*CTSYNC, "show", "conntrack", "table", "ipv6", ns=FW)
        print("\n== ctsync show conntrack table ipv4 --dport 80 --json   (the port-forwarded one)")
        run(*CTSYNC, "show", "conntrack", "table", "ipv4", "--dport", "80", "--json", ns=FW)
        print("\n== ctsync show conntrack table ipv4 --proto tcp --count")
        run(*CTSYNC, "show", "conntrack", "table", "ipv4", "--proto", "tcp", "--count", ns=FW)
        return 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for ns in (CLIENT, FW, SERVER):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        print("\n== namespaces removed")


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
