"""Capture real ctnetlink bytes from the kernel for the codec tests (needs root).

Run ``sudo .venv/bin/python tests/core/data/capture_kernel.py`` from the project root. It
creates one throw-away network namespace (``ctscap`` + random tag), builds conntrack entries
there (real loopback traffic for TCP/ICMP/FTP-with-helper/directional zones, ``conntrack -I``
for the rest), then writes what the kernel sends into this folder:

* ``kernel_ct_dump.bin``   - every datagram of one CT_GET dump (family 0), concatenated
* ``kernel_exp_dump.bin``  - every datagram of one EXP_GET dump
* ``kernel_events.bin``    - event datagrams (NEW / UPDATE / DESTROY) for one entry
* ``kernel_info.txt``      - kernel version and what each file holds

The namespace is deleted at the end whatever happens. Only documentation addresses are
used. Concatenated netlink messages stay a valid input for ``iter_messages`` because every
message length is 4-aligned.
"""

from __future__ import annotations

import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from ctsync.core import ctnetlink as nl  # noqa: E402

NETLINK_NETFILTER = 12
RULESET = """
table inet cap {
  ct helper ftph { type "ftp" protocol tcp; }
  chain raw_out {
    type filter hook output priority -300;
    tcp dport 2121 ct original zone set 7
    tcp dport 2122 ct reply zone set 9
  }
  chain out {
    type filter hook output priority 0;
    tcp dport 21 ct helper set "ftph"
    icmp type echo-request ct label set 3
    tcp dport 8080 ct mark set 0x42
  }
  chain natout {
    type nat hook output priority -100;
    ip daddr 203.0.113.10 tcp dport 80 dnat ip to 192.0.2.1:8080
    tcp dport 2122 dnat ip to 192.0.2.1:8122
  }
  chain natpost { type nat hook postrouting priority 100; }
}
"""

# conntrack -I for protocols that loopback traffic does not easily produce.
INSERTS = [
    "-p udp -s 192.0.2.20 -d 198.51.100.20 --sport 5353 --dport 53 -t 30 -w 5",
    "-p udp -s 2001:db8::20 -d 2001:db8:1::20 --sport 5000 --dport 6000 -t 30",
    "-p icmpv6 -s 2001:db8::21 -d 2001:db8:1::21 --icmpv6-type 128 --icmpv6-code 0"
    " --icmpv6-id 77 -t 30",
    "-p sctp -s 192.0.2.22 -d 198.51.100.22 --sport 3868 --dport 3868 --state ESTABLISHED"
    " --orig-vtag 0x11223344 --reply-vtag 0x55667788 -t 30",
    "-p gre -s 192.0.2.23 -d 198.51.100.23 --srckey 0x10 --dstkey 0x20 -t 30",
    "-p tcp -s 192.0.2.24 -d 203.0.113.24 --sport 40024 --dport 443 --state ESTABLISHED"
    " -u SEEN_REPLY,ASSURED -t 300 -m 0x7 --src-nat 198.51.100.24",
    "-p tcp -s 2001:db8::25 -d 2001:db8:1::25 --sport 40025 --dport 443"
    " --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 300",
    "-p dccp -s 192.0.2.26 -d 198.51.100.26 --sport 1 --dport 2 --state OPEN --role client -t 30",
    "-p 4 -s 192.0.2.27 -d 198.51.100.27 -t 30",
    "-p udplite -s 192.0.2.28 -d 198.51.100.28 --sport 7 --dport 8 -t 30",
]


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


def nl_socket(groups: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((0, groups))
    return s


def dump(request: bytes) -> bytes:
    s = nl_socket()
    s.send(request)
    out = bytearray()
    done = False
    while not done:
        data = s.recv(1 << 16)
        out += data
        for mtype, *_ in nl.iter_messages(data):
            if mtype in (nl.NLMSG_DONE, nl.NLMSG_ERROR):
                done = True
    s.close()
    return bytes(out)


def tcp_pair(port: int, dst: str = "192.0.2.1", listen_port: int | None = None) -> list[object]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("192.0.2.1", listen_port or port))
    srv.listen()
    cli = socket.create_connection((dst, port), timeout=2)
    conn, _ = srv.accept()
    cli.sendall(b"hello")
    conn.recv(16)
    return [srv, cli, conn]


def inside() -> None:
    sh("ip link set lo up")
    sh("ip addr add 192.0.2.1/24 dev lo")
    sh("ip route add 203.0.113.0/24 dev lo")
    sh("sysctl -qw net.netfilter.nf_conntrack_acct=1 net.netfilter.nf_conntrack_timestamp=1")
    subprocess.run(["nft", "-f", "-"], input=RULESET, text=True, check=True)
    keep: list[object] = []
    # Plain TCP with full protoinfo, DNAT + mark, directional zones.
    keep += tcp_pair(8081)
    keep += tcp_pair(80, dst="203.0.113.10", listen_port=8080)
    keep += tcp_pair(2121)
    srv = socket.socket()
    srv.bind(("192.0.2.1", 8122))
    srv.listen()
    half = socket.socket()  # the reply-zone lookup misses, so only send the SYN
    half.setblocking(False)
    half.connect_ex(("192.0.2.1", 2122))
    keep += [srv, half]
    # FTP control connection through the helper; a 227 reply creates an expectation.
    ftp_srv = socket.socket()
    ftp_srv.bind(("192.0.2.1", 21))
    ftp_srv.listen()
    data_srv = socket.socket()
    data_srv.bind(("192.0.2.1", 50000))
    data_srv.listen()
    ftp_cli = socket.create_connection(("192.0.2.1", 21), timeout=2)
    ftp_conn, _ = ftp_srv.accept()
    # The helper skips the first segment of each direction: banner first, like a server.
    ftp_conn.sendall(b"220 ready\r\n")
    ftp_cli.recv(64)
    ftp_cli.sendall(b"PASV\r\n")
    ftp_conn.recv(64)
    ftp_conn.sendall(b"227 Entering Passive Mode (192,0,2,1,195,80).\r\n")
    ftp_cli.recv(128)
    time.sleep(0.1)
    exp_dump = dump(nl.encode_dump_request(1, 0, expectations=True))
    data_cli = socket.create_connection(("192.0.2.1", 50000), timeout=2)  # RELATED, master
    keep += [ftp_srv, data_srv, ftp_cli, ftp_conn, data_cli]
    # ICMP echo with a label.
    subprocess.run(["ping", "-c", "1", "-W", "1", "192.0.2.1"], check=True, capture_output=True)
    for args in INSERTS:
        sh(f"conntrack -I {args}")
    time.sleep(0.1)
    ct_dump = dump(nl.encode_dump_request(2, 0))
    # Events for one entry: NEW, UPDATE (mark), DESTROY.
    groups = 1 << (nl.NFNLGRP_CONNTRACK_NEW - 1)
    groups |= 1 << (nl.NFNLGRP_CONNTRACK_UPDATE - 1)
    groups |= 1 << (nl.NFNLGRP_CONNTRACK_DESTROY - 1)
    ev = nl_socket(groups)
    ev.settimeout(1.0)
    ev_args = "-p tcp -s 192.0.2.30 -d 198.51.100.30 --sport 40030 --dport 22"
    sh(f"conntrack -I {ev_args} --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 300")
    sh(f"conntrack -U {ev_args} -m 0x99")
    sh(f"conntrack -D {ev_args}")
    events = bytearray()
    try:
        while True:
            events += ev.recv(1 << 16)
    except TimeoutError:
        pass
    (HERE / "kernel_ct_dump.bin").write_bytes(ct_dump)
    (HERE / "kernel_exp_dump.bin").write_bytes(exp_dump)
    (HERE / "kernel_events.bin").write_bytes(bytes(events))
    listing = sh("conntrack -L -o extended 2>/dev/null; conntrack -L expect 2>/dev/null || true")
    info = [
        f"kernel: {platform.release()} ({platform.machine()}, {sys.byteorder}-endian)",
        f"captured: {time.strftime('%Y-%m-%d')} by tests/core/data/capture_kernel.py",
        "nf_conntrack_acct=1 nf_conntrack_timestamp=1",
        "",
        "conntrack -L -o extended at dump time (ids/timeouts differ slightly):",
        listing,
        "expectation dump taken before the FTP data connection was opened.",
    ]
    (HERE / "kernel_info.txt").write_text("\n".join(info) + "\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inside":
        inside()
        return
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    ns = "ctscap" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, __file__, "--inside"], check=True
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
