"""Small traffic programs for the namespace tests (stdlib only).

Run as ``python traffic.py <command> ...`` (a script path works inside any
namespace) or ``python -m tests.linux.traffic <command> ...``. Servers print
``READY ...`` once they listen; clients print ``CONNECTED``/``PENDING`` when a
test may look at the firewall, and ``DONE ...`` at the end. Errors print
``ERROR ...`` and exit 1. Anything a test waits on is a line on stdout.

Commands:

* ``tcp-echo-server --port P [--port P2 ...] [--host ::]``: echo on every port,
  IPv4 and IPv6 (dual-stack ``::``). Prints ``ACCEPT <port> <peer> <peerport>``.
* ``tcp-client --host H --port P [--count N] [--duration S] [--wait-stdin]``:
  open N connections, echo on each every ``--interval`` for S seconds (or
  until a line arrives on stdin), then close.
* ``udp-echo-server --port P ...`` / ``udp-client --host H --port P --count N``:
  N UDP flows (one socket each), each echoed ``--rounds`` times.
* ``ftp-server [--port 21]``: a tiny FTP server (USER PASS SYST TYPE PWD PASV
  EPSV PORT EPRT RETR NOOP QUIT) whose every file is ``--size`` bytes.
* ``ftp-client --host H [--mode pasv|port] [--wait-stdin]``: stdlib ``ftplib``.
  With ``--wait-stdin`` it stops after PASV/PORT (printing ``PENDING``) until a
  line arrives on stdin: the firewall's expectation stays in place that long.
"""

from __future__ import annotations

import argparse
import contextlib
import ftplib
import hashlib
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

_BACKLOG = 128
_RECV = 65536


_SAY = threading.Lock()


def say(*parts: object) -> None:
    """One status line on stdout, flushed at once (tests wait on these); one write under a
    lock, as print() writes its parts one by one and threads would interleave them."""
    line = " ".join(map(str, parts)) + "\n"
    with _SAY:
        sys.stdout.write(line)
        sys.stdout.flush()


def plain_ip(addr: str) -> str:
    """``::ffff:192.0.2.2`` -> ``192.0.2.2`` (peers of dual-stack sockets)."""
    return addr.removeprefix("::ffff:")


def listen_socket(host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A bound (and for TCP listening) socket; ``::`` is dual-stack IPv4+IPv6."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(_BACKLOG)
    return sock


def spawn(target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def stdin_has_line(timeout: float) -> bool:
    """True once stdin has a line or EOF (the test's go-ahead), waiting up to *timeout*."""
    ready, _, _ = select.select([sys.stdin], [], [], max(timeout, 0.0))
    if ready:
        sys.stdin.readline()
        return True
    return False


def serve_forever() -> None:
    """Servers run until stopped by signal (the tests stop them by pid)."""
    while True:
        time.sleep(3600)


# --------------------------------------------------------------------------- TCP


def _echo_conn(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(_RECV):
            conn.sendall(data)


def _accept_loop(sock: socket.socket, port: int) -> None:
    while True:
        conn, peer = sock.accept()
        say("ACCEPT", port, plain_ip(peer[0]), peer[1])
        spawn(_echo_conn, conn)


def cmd_tcp_echo_server(args: argparse.Namespace) -> None:
    ports: list[int] = args.port
    for port in ports:
        spawn(_accept_loop, listen_socket(args.host, port), port)
    say("READY", "tcp-echo", *ports)
    serve_forever()


def _echo_once(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(_RECV)
        if not chunk:
            raise ConnectionError("peer closed during echo")
        got += chunk
    if got != payload:
        raise ConnectionError(f"echo mismatch: {got!r} != {payload!r}")


def cmd_tcp_client(args: argparse.Namespace) -> None:
    conns: list[socket.socket] = []
    for _ in range(args.count):
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
        conns.append(sock)
        local = sock.getsockname()
        say("CONN", plain_ip(local[0]), local[1])
    rounds = 0
    for i, sock in enumerate(conns):
        _echo_once(sock, f"hello {i} {rounds}\n".encode())
    rounds += 1
    say("CONNECTED", len(conns))
    deadline = time.monotonic() + args.duration
    while True:
        if args.wait_stdin:
            if stdin_has_line(args.interval):
                break
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(args.interval, left))
        for i, sock in enumerate(conns):
            _echo_once(sock, f"hello {i} {rounds}\n".encode())
        rounds += 1
    for sock in conns:
        sock.close()
    say("DONE", len(conns), rounds)


# --------------------------------------------------------------------------- UDP


def _udp_loop(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(_RECV)
        sock.sendto(data, peer)


def cmd_udp_echo_server(args: argparse.Namespace) -> None:
    ports: list[int] = args.port
    for port in ports:
        spawn(_udp_loop, listen_socket(args.host, port, socket.SOCK_DGRAM))
    say("READY", "udp-echo", *ports)
    serve_forever()


def cmd_udp_client(args: argparse.Namespace) -> None:
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    socks = []
    for _ in range(args.count):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(args.timeout / 4)
        sock.connect((args.host, args.port))
        socks.append(sock)
    for rnd in range(args.rounds):
        for i, sock in enumerate(socks):
            payload = f"udp {i} {rnd}".encode()
            for _attempt in range(4):  # UDP: retry a lost datagram a few times
                sock.send(payload)
                try:
                    if sock.recv(_RECV) == payload:
                        break
                except TimeoutError:
                    continue
            else:
                raise ConnectionError(f"no UDP echo for flow {i} round {rnd}")
    for sock in socks:
        say("FLOW", plain_ip(sock.getsockname()[0]), sock.getsockname()[1])
        sock.close()
    say("DONE", len(socks), args.rounds)


# --------------------------------------------------------------------------- FTP


def file_bytes(name: str, size: int) -> bytes:
    """Deterministic content of every file the FTP server serves."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class FtpSession:
    """One control connection of the tiny FTP server (enough for the kernel helper).

    Replies are sent as whole lines in one segment each: the kernel helper
    parses a ``227``/``229`` reply only from a single packet.
    """

    def __init__(self, conn: socket.socket, size: int) -> None:
        self.conn = conn
        self.size = size
        self.rfile = conn.makefile("rb")
        self.pasv: socket.socket | None = None
        self.port_target: tuple[str, int] | None = None

    def reply(self, text: str) -> None:
        self.conn.sendall(text.encode() + b"\r\n")

    def local_ip(self) -> str:
        return plain_ip(self.conn.getsockname()[0])

    def open_pasv(self) -> int:
        if self.pasv is not None:
            self.pasv.close()
        host = self.local_ip()
        self.pasv = listen_socket(host, 0)
        self.port_target = None
        port: int = self.pasv.getsockname()[1]
        return port

    def run(self) -> None:
        with self.conn:
            self.reply("220 ctsync test FTP server")
            for raw in self.rfile:
                line = raw.decode(errors="replace").strip()
                verb, _, arg = line.partition(" ")
                if not self.handle(verb.upper(), arg.strip()):
                    break
            if self.pasv is not None:
                self.pasv.close()

    def handle(self, verb: str, arg: str) -> bool:
        if verb == "USER":
            self.reply("331 Password required")
        elif verb == "PASS":
            self.reply("230 Logged in")
        elif verb == "SYST":
            self.reply("215 UNIX Type: L8")
        elif verb in {"TYPE", "MODE", "STRU"}:
            self.reply("200 OK")
        elif verb == "PWD":
            self.reply('257 "/" is the current directory')
        elif verb == "NOOP":
            self.reply("200 NOOP ok")
        elif verb == "PASV":
            if ":" in self.local_ip():
                self.reply("425 Use EPSV with IPv6")
                return True
            port = self.open_pasv()
            h = self.local_ip().replace(".", ",")
            say("PASV", self.local_ip(), port)
            self.reply(f"227 Entering Passive Mode ({h},{port >> 8},{port & 0xFF})")
        elif verb == "EPSV":
            port = self.open_pasv()
            say("EPSV", self.local_ip(), port)
            self.reply(f"229 Entering Extended Passive Mode (|||{port}|)")
        elif verb == "PORT":
            nums = [int(n) for n in arg.split(",")]
            self.port_target = (".".join(map(str, nums[:4])), nums[4] << 8 | nums[5])
            say("PORT", *self.port_target)
            self.reply("200 PORT command successful")
        elif verb == "EPRT":
            _, _af, host, port_s, _ = arg.split(arg[0])
            self.port_target = (host, int(port_s))
            say("EPRT", *self.port_target)
            self.reply("200 EPRT command successful")
        elif verb == "RETR":
            self.retr(arg)
        elif verb == "QUIT":
            self.reply("221 Bye")
            return False
        else:
            self.reply(f"502 {verb} not implemented")
        return True

    def retr(self, name: str) -> None:
        data = file_bytes(name, self.size)
        if self.pasv is not None:
            self.reply(f"150 Opening data connection for {name} ({len(data)} bytes)")
            self.pasv.settimeout(30)
            dconn, _ = self.pasv.accept()
            self.pasv.close()
            self.pasv = None
        elif self.port_target is not None:
            self.reply(f"150 Opening data connection for {name} ({len(data)} bytes)")
            dconn = socket.create_connection(self.port_target, timeout=30)
            self.port_target = None
        else:
            self.reply("425 Use PORT or PASV first")
            return
        with dconn:
            dconn.sendall(data)
        say("RETR", name, len(data))
        self.reply("226 Transfer complete")


def _ftp_session(conn: socket.socket, size: int) -> None:
    FtpSession(conn, size).run()


def _ftp_accept_loop(sock: socket.socket, size: int) -> None:
    while True:
        conn, peer = sock.accept()
        say("ACCEPT", sock.getsockname()[1], plain_ip(peer[0]), peer[1])
        spawn(_ftp_session, conn, size)


def cmd_ftp_server(args: argparse.Namespace) -> None:
    spawn(_ftp_accept_loop, listen_socket(args.host, args.port), args.size)
    say("READY", "ftp", args.port)
    serve_forever()


_EPSV_RE = re.compile(r"\(\|\|\|(\d+)\|\)")


def cmd_ftp_client(args: argparse.Namespace) -> None:
    ftp = ftplib.FTP()
    ftp.connect(args.host, args.port, timeout=args.timeout)
    ftp.login("anonymous", "ctsync@example.invalid")
    ftp.voidcmd("TYPE I")
    chunks: list[bytes] = []
    if args.mode == "pasv":
        # Same as ftplib's own PASV/EPSV path, split so the test can look at
        # the firewall between the 227/229 reply and the data connection.
        if ftp.af == socket.AF_INET:
            resp = ftp.sendcmd("PASV")
            _host, port = ftplib.parse227(resp)
        else:
            resp = ftp.sendcmd("EPSV")
            match = _EPSV_RE.search(resp)
            if match is None:
                raise ftplib.error_proto(resp)
            port = int(match.group(1))
        assert ftp.sock is not None
        host = plain_ip(ftp.sock.getpeername()[0])
        say("PENDING", "pasv", host, port)
        if args.wait_stdin:
            stdin_has_line(args.timeout)
        with socket.create_connection((host, port), timeout=args.timeout) as dconn:
            ftp.sendcmd(f"RETR {args.file}")  # 150
            while chunk := dconn.recv(_RECV):
                chunks.append(chunk)
    else:
        listener = ftp.makeport()  # sends PORT (IPv4) or EPRT (IPv6)
        with listener:
            say("PENDING", "port", *listener.getsockname()[:2])
            if args.wait_stdin:
                stdin_has_line(args.timeout)
            ftp.sendcmd(f"RETR {args.file}")  # 150
            listener.settimeout(args.timeout)
            dconn, peer = listener.accept()
            with dconn:
                say("DATA-FROM", plain_ip(peer[0]), peer[1])
                while chunk := dconn.recv(_RECV):
                    chunks.append(chunk)
    ftp.voidresp()  # 226
    data = b"".join(chunks)
    ok = data == file_bytes(args.file, len(data))
    ftp.quit()
    if not ok:
        raise ValueError("FTP data corrupted")
    say("DONE", len(data))


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    def server(name: str, *, multi_port: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.add_argument("--host", default="::", help="bind address (default :: = v4+v6)")
        if multi_port:
            p.add_argument("--port", type=int, action="append", required=True)
        return p

    server("tcp-echo-server").set_defaults(func=cmd_tcp_echo_server)
    server("udp-echo-server").set_defaults(func=cmd_udp_echo_server)

    p = server("ftp-server", multi_port=False)
    p.add_argument("--port", type=int, default=21)
    p.add_argument("--size", type=int, default=4096, help="bytes in every served file")
    p.set_defaults(func=cmd_ftp_server)

    def client(name: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.add_argument("--host", required=True)
        p.add_argument("--timeout", type=float, default=10.0)
        return p

    p = client("tcp-client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1, help="connections to open")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to keep them open")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between echo rounds")
    p.add_argument("--wait-stdin", action="store_true", help="keep open until a stdin line")
    p.set_defaults(func=cmd_tcp_client)

    p = client("udp-client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1, help="flows (one socket each)")
    p.add_argument("--rounds", type=int, default=1, help="echoes per flow")
    p.set_defaults(func=cmd_udp_client)

    p = client("ftp-client")
    p.add_argument("--port", type=int, default=21)
    p.add_argument("--mode", choices=["pasv", "port"], default="pasv")
    p.add_argument("--file", default="data.bin")
    p.add_argument("--wait-stdin", action="store_true", help="pause after PASV/PORT")
    p.set_defaults(func=cmd_ftp_client)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        say("ERROR", type(exc).__name__, exc)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
