#!/usr/bin/env python3
"""Echo traffic for the compose cluster: servers, a live stream to watch, scored flows.

Commands (standard library only; every line of output is flushed at once):

``serve --tcp-port P --udp-port U``
    TCP and UDP echo servers. Prints ``READY``, then ``ACCEPT <peer> <port>`` per TCP
    connection and ``UDP-PEER <peer> <port>`` per new UDP peer: the addresses the server
    sees (behind the firewalls' SNAT, only the server-side VIP).

``stream --host H --port P [--interval 0.05] [--every 1]``
    One long-lived TCP connection, an echo every *interval*; a line every *every* seconds,
    and one whenever an echo comes back after a gap, or the connection breaks. What the
    client container runs, and what ``make demo`` shows around a failover.

``flows --host H --tcp-port P --tcp N --udp-port U --udp M [--interval 0.05]``
    N TCP and M UDP flows, one thread each (a stalled flow does not hold up the others),
    each keeping score: echoes, resets, errors, gaps between echoes. Prints ``CONN <port>``
    / ``UDP <port>`` per flow and ``CONNECTED <n>``; then reads commands on stdin:
    ``report`` answers ``REPORT <json>``; ``stop`` answers the same and exits. Times are
    unix time (the containers share the host's clock). The e2e tests drive this one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

RECV = 65536


_SAY = threading.Lock()


def say(*parts: object) -> None:
    # One write per line, under a lock: the server's threads print concurrently, and
    # print() writes its parts one by one, which interleaves lines that tests parse.
    line = " ".join(map(str, parts)) + "\n"
    with _SAY:
        sys.stdout.write(line)
        sys.stdout.flush()


def stamp(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def spawn(target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def recv_exact(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            raise EOFError("the server closed the connection")
        got += chunk
    return got


# --------------------------------------------------------------------------- serve


def _echo_tcp(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(RECV):
            conn.sendall(data)


def _accept_loop(sock: socket.socket) -> None:
    while True:
        conn, peer = sock.accept()
        say("ACCEPT", peer[0], peer[1])
        spawn(_echo_tcp, conn)


def _udp_loop(sock: socket.socket) -> None:
    seen: set[tuple[str, int]] = set()
    while True:
        data, peer = sock.recvfrom(RECV)
        if peer not in seen:
            seen.add(peer)
            say("UDP-PEER", peer[0], peer[1])
        sock.sendto(data, peer)


def cmd_serve(args: argparse.Namespace) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", args.tcp_port))
    tcp.listen(128)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", args.udp_port))
    spawn(_accept_loop, tcp)
    spawn(_udp_loop, udp)
    say("READY", "tcp", args.tcp_port, "udp", args.udp_port)
    threading.Event().wait()


# --------------------------------------------------------------------------- stream


def _connect(host: str, port: int, interval: float) -> socket.socket:
    waiting = False
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
        except OSError as exc:
            if not waiting:
                say(f"{stamp(time.time())}  cannot reach {host}:{port} yet ({exc}); retrying")
                waiting = True
            time.sleep(1)
            continue
        sock.settimeout(120)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def cmd_stream(args: argparse.Namespace) -> None:
    resets = 0
    while True:
        sock = _connect(args.host, args.port, args.interval)
        local = sock.getsockname()
        say(
            f"{stamp(time.time())}  connected {local[0]}:{local[1]} -> {args.host}:{args.port}"
            f" (echo every {args.interval * 1000:.0f} ms)"
        )
        n = 0
        last = time.time()
        next_line = last + args.every
        try:
            while True:
                payload = f"{n:010d}\n".encode()
                sent = time.time()
                sock.sendall(payload)
                if recv_exact(sock, len(payload)) != payload:
                    raise ValueError("echo mismatch")
                now = time.time()
                n += 1
                if now - last > args.gap:
                    say(
                        f"{stamp(now)}  echo #{n}: back after {now - last:.2f} s without an"
                        f" echo, same connection (port {local[1]}), resets so far: {resets}"
                    )
                elif now >= next_line:
                    say(f"{stamp(now)}  echo #{n}  rtt {(now - sent) * 1000:.1f} ms")
                if now >= next_line:
                    next_line = now + args.every
                last = now
                time.sleep(max(0.0, args.interval - (time.time() - sent)))
        except (ConnectionResetError, BrokenPipeError):
            resets += 1
            say(f"{stamp(time.time())}  connection RESET after {n} echoes (resets: {resets})")
        except (OSError, EOFError, ValueError) as exc:
            say(f"{stamp(time.time())}  connection BROKEN after {n} echoes: {exc}")
        with contextlib.suppress(OSError):
            sock.close()
        time.sleep(1)


# --------------------------------------------------------------------------- flows


@dataclass
class Flow:
    """One flow's score."""

    proto: str
    index: int
    port: int
    echoes: int = 0
    last_echo: float | None = None
    #: (last echo before, first echo after) of every gap longer than the threshold
    gaps: list[tuple[float, float]] = field(default_factory=list)
    reset: bool = False
    error: str | None = None
    lost: int = 0  # UDP datagrams without an echo in time
    waiting_since: float | None = None  # TCP: sent, echo not back yet


class Scores:
    def __init__(self, interval: float, gap: float) -> None:
        self.interval = interval
        self.gap = gap
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.flows: list[Flow] = []

    def echoed(self, flow: Flow, at: float) -> None:
        with self.lock:
            if flow.last_echo is not None and at - flow.last_echo > self.gap:
                flow.gaps.append((flow.last_echo, at))
            flow.last_echo = at
            flow.echoes += 1

    def pace(self, next_at: float) -> float:
        """Sleep until *next_at* (monotonic); after a stall, restart the beat (no burst)."""
        now = time.monotonic()
        if next_at < now:
            return now + self.interval
        self.stop.wait(next_at - now)
        return next_at + self.interval

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {"now": time.time(), "flows": [asdict(f) for f in self.flows]}


def _tcp_flow(scores: Scores, flow: Flow, sock: socket.socket) -> None:
    next_at = time.monotonic()
    n = 0
    while not scores.stop.is_set():
        payload = f"{flow.index:04d} {n:08d}\n".encode()
        try:
            flow.waiting_since = time.time()
            sock.sendall(payload)
            if recv_exact(sock, len(payload)) != payload:
                flow.error = "echo mismatch"
                return
        except (ConnectionResetError, BrokenPipeError):
            flow.reset = True
            return
        except (OSError, EOFError) as exc:
            if not scores.stop.is_set():
                flow.error = f"{type(exc).__name__}: {exc}"
            return
        flow.waiting_since = None
        scores.echoed(flow, time.time())
        n += 1
        next_at = scores.pace(next_at)


def _udp_flow(scores: Scores, flow: Flow, sock: socket.socket) -> None:
    next_at = time.monotonic()
    n = 0
    sock.settimeout(max(scores.interval * 4, 0.2))
    while not scores.stop.is_set():
        payload = f"u{flow.index:03d} {n:08d}".encode()
        n += 1
        try:
            sock.send(payload)
            while sock.recv(RECV) != payload:  # skip late echoes of earlier datagrams
                pass
        except OSError:  # timeout, or an ICMP error reported on the socket
            flow.lost += 1
        else:
            scores.echoed(flow, time.time())
        next_at = scores.pace(next_at)


def cmd_flows(args: argparse.Namespace) -> None:
    scores = Scores(args.interval, args.gap)
    starts: list[tuple[Callable[[Scores, Flow, socket.socket], None], Flow, socket.socket]] = []
    for i in range(args.tcp):
        sock = socket.create_connection((args.host, args.tcp_port), timeout=10)
        sock.settimeout(args.recv_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flow = Flow("tcp", i, sock.getsockname()[1])
        say("CONN", flow.port)
        starts.append((_tcp_flow, flow, sock))
    for i in range(args.udp):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((args.host, args.udp_port))
        flow = Flow("udp", i, sock.getsockname()[1])
        say("UDP", flow.port)
        starts.append((_udp_flow, flow, sock))
    for target, flow, sock in starts:
        scores.flows.append(flow)
        spawn(target, scores, flow, sock)
    deadline = time.monotonic() + 10  # every flow echoed once: the firewall has its state
    while time.monotonic() < deadline and any(f.echoes == 0 for f in scores.flows):
        time.sleep(0.01)
    say("CONNECTED", len(scores.flows))
    for line in sys.stdin:
        word = line.strip()
        if word == "report":
            say("REPORT", json.dumps(scores.report()))
        elif word == "stop":
            break
    scores.stop.set()
    say("REPORT", json.dumps(scores.report()))
    for _, _, sock in starts:
        with contextlib.suppress(OSError):
            sock.close()


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flows.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--tcp-port", type=int, default=5000)
    p.add_argument("--udp-port", type=int, default=5300)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("stream")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--every", type=float, default=1.0, help="seconds between status lines")
    p.add_argument("--gap", type=float, default=0.25, help="report gaps longer than this")
    p.set_defaults(func=cmd_stream)
    p = sub.add_parser("flows")
    p.add_argument("--host", required=True)
    p.add_argument("--tcp-port", type=int, default=5000)
    p.add_argument("--tcp", type=int, default=8)
    p.add_argument("--udp-port", type=int, default=5300)
    p.add_argument("--udp", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--gap", type=float, default=0.25, help="record gaps longer than this")
    p.add_argument("--recv-timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_flows)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
