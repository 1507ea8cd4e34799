"""Gateway probes (ICMP echo, TCP connect) on the agent's loop, and the removal of the
connections a gateway watch matches (in a thread).

A probe never blocks the loop: the ICMP socket is non-blocking and read by a loop reader,
a TCP connect is ``loop.sock_connect`` under a timeout. Each watch has its own prober:

- :class:`IcmpProber` sends echo requests on a raw ICMP/ICMPv6 socket (the agent runs with
  CAP_NET_RAW); where raw sockets are refused it falls back to an unprivileged "ping"
  socket (``SOCK_DGRAM``, allowed by ``net.ipv4.ping_group_range``). A raw socket sees
  every echo reply of the namespace, so replies are matched by a random token in the
  payload, the sequence number and the source address; the kernel filter
  (``ICMP_FILTER``/``ICMP6_FILTER``) keeps other ICMP types out.
- :class:`TcpProber` opens a connection and resets it at once (``SO_LINGER`` 0: no
  TIME_WAIT per probe). Only an established connection counts: a refusal is an error.

Both bind to ``source`` and ``interface`` (``SO_BINDTODEVICE``) when given, so that a
probe takes the uplink it watches.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from ctsync.core import ctnetlink as nl
from ctsync.core.ctnetlink import CtnetlinkError
from ctsync.core.entry import AF_INET, AF_INET6, CtTuple
from ctsync.core.select import U32_MAX, EntryFilter
from ctsync.core.vrrp.packet import internet_checksum as icmp_checksum
from ctsync.io.netlink import Committer, iter_dump, open_socket

ICMP_ECHO_REPLY: Final = 0
ICMP_ECHO_REQUEST: Final = 8
ICMP6_ECHO_REQUEST: Final = 128
ICMP6_ECHO_REPLY: Final = 129
SOL_RAW: Final = 255
ICMP_FILTER: Final = 1  # linux/icmp.h: a bitmap of the ICMP types to drop
ICMP6_FILTER: Final = 1  # linux/icmpv6.h: 256 bits, set = drop
TOKEN_SIZE: Final = 8
PAYLOAD_SIZE: Final = 32  # token + padding, like a short ping


@dataclass(frozen=True)
class ProbeResult:
    outcome: str  # "ok", "timeout" or "error" (ctsync.core.gateway.PROBE_RESULTS)
    rtt: float | None = None  # seconds, for "ok"
    error: str | None = None  # for "error": what failed


class Prober(Protocol):
    async def probe(self, timeout: float) -> ProbeResult: ...

    def close(self) -> None: ...


def _errno_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name} ({exc.strerror})" if name and exc.strerror else str(exc)


def _destination(
    address: str, port: int, interface: str | None
) -> tuple[int, tuple[str, int] | tuple[str, int, int, int]]:
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return socket.AF_INET, (address, port)
    # A link-local gateway (fe80::1, the usual IPv6 next hop) needs its interface's scope.
    scope = socket.if_nametoindex(interface) if interface and ip.is_link_local else 0
    return socket.AF_INET6, (address, port, 0, scope)


def _bind(sock: socket.socket, family: int, source: str | None, interface: str | None) -> None:
    if interface:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
    if source:
        sock.bind((source, 0) if family == socket.AF_INET else (source, 0, 0, 0))


def echo_request(family: int, ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMP (IPv4) or ICMPv6 echo request; the kernel sums ICMPv6 itself."""
    kind = ICMP_ECHO_REQUEST if family == socket.AF_INET else ICMP6_ECHO_REQUEST
    header = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    if family == socket.AF_INET:
        header = struct.pack("!BBHHH", kind, 0, icmp_checksum(header + payload), ident, seq)
    return header + payload


def parse_echo_reply(family: int, data: bytes, ip_header: bool) -> tuple[int, int, bytes] | None:
    """``(ident, seq, payload)`` of an echo reply (``ip_header``: IPv4 raw sockets get the
    IP header first); None for anything else."""
    if ip_header:
        if len(data) < 20:
            return None
        data = data[(data[0] & 0x0F) * 4 :]
    if len(data) < 8:
        return None
    kind, code, _sum, ident, seq = struct.unpack_from("!BBHHH", data)
    want = ICMP_ECHO_REPLY if family == socket.AF_INET else ICMP6_ECHO_REPLY
    if kind != want or code != 0:
        return None
    return ident, seq, data[8:]


class IcmpProber:
    """Echo requests to one address; one outstanding sequence number per probe."""

    def __init__(
        self, address: str, *, source: str | None = None, interface: str | None = None
    ) -> None:
        self.address = address
        self.source = source
        self.interface = interface
        self.target = ipaddress.ip_address(address)
        self.ident = int.from_bytes(os.urandom(2), "big")
        self.token = os.urandom(TOKEN_SIZE)
        self.mode: str | None = None  # "raw" or "dgram" once open
        self._seq = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, tuple[asyncio.Future[float], float]] = {}

    def _open(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        if self._sock is not None:
            return self._sock
        family, _ = _destination(self.address, 0, self.interface)
        proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
        try:
            sock = socket.socket(family, socket.SOCK_RAW, proto)
            self.mode = "raw"
        except PermissionError:
            sock = socket.socket(family, socket.SOCK_DGRAM, proto)  # ping_group_range
            self.mode = "dgram"
        try:
            sock.setblocking(False)
            if self.mode == "raw":
                if family == socket.AF_INET:
                    blocked = ~(1 << ICMP_ECHO_REPLY) & 0xFFFFFFFF
                    sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", blocked))
                else:
                    words = [0xFFFFFFFF] * 8
                    words[ICMP6_ECHO_REPLY >> 5] &= ~(1 << (ICMP6_ECHO_REPLY & 31))
                    sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *words))
            _bind(sock, family, self.source, self.interface)
            loop.add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, loop
        return sock

    async def probe(self, timeout: float) -> ProbeResult:
        loop = asyncio.get_running_loop()
        try:
            sock = self._open(loop)
            family, dest = _destination(self.address, 0, self.interface)
        except OSError as exc:
            return ProbeResult("error", error=f"cannot open the ICMP socket: {_errno_text(exc)}")
        self._seq = (self._seq + 1) & 0xFFFF
        seq = self._seq
        packet = echo_request(family, self.ident, seq, self._payload())
        future: asyncio.Future[float] = loop.create_future()
        self._pending[seq] = (future, time.perf_counter())
        try:
            sock.sendto(packet, dest)
        except OSError as exc:
            self._pending.pop(seq, None)
            return ProbeResult("error", error=_errno_text(exc))
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can lose a cancel
                rtt = await future
        except TimeoutError:
            return ProbeResult("timeout")
        finally:
            self._pending.pop(seq, None)
        return ProbeResult("ok", rtt)

    def _payload(self) -> bytes:
        return self.token + bytes(PAYLOAD_SIZE - TOKEN_SIZE)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        ip_header = self.mode == "raw" and sock.family == socket.AF_INET
        for _ in range(64):  # bounded: a flood of replies must not hold the loop
            try:
                data, source = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. a queued ICMP error on a ping socket: no reply to match
            now = time.perf_counter()
            reply = parse_echo_reply(sock.family, data, ip_header)
            if reply is None:
                continue
            ident, seq, payload = reply
            # A ping socket's kernel sets the identifier itself: the token is the check.
            if self.mode == "raw" and ident != self.ident:
                continue
            if not payload.startswith(self.token):
                continue
            try:
                if ipaddress.ip_address(str(source[0]).split("%")[0]) != self.target:
                    continue
            except ValueError:
                continue
            pending = self._pending.get(seq)
            if pending is not None and not pending[0].done():
                pending[0].set_result(now - pending[1])

    def close(self) -> None:
        sock, loop = self._sock, self._loop
        self._sock = self._loop = None
        if sock is None:
            return
        if loop is not None and not loop.is_closed():
            loop.remove_reader(sock.fileno())
        sock.close()
        for future, _ in self._pending.values():
            future.cancel()
        self._pending.clear()


class TcpProber:
    """A TCP connect to ``address:port``, reset at once: up when the handshake completes."""

    def __init__(
        self,
        address: str,
        port: int,
        *,
        source: str | None = None,
        interface: str | None = None,
    ) -> None:
        self.address = address
        self.port = port
        self.source = source
        self.interface = interface

    async def probe(self, timeout: float) -> ProbeResult:
        loop = asyncio.get_running_loop()
        try:
            family, dest = _destination(self.address, self.port, self.interface)
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            return ProbeResult("error", error=f"cannot open a TCP socket: {_errno_text(exc)}")
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _bind(sock, family, self.source, self.interface)
            started = time.perf_counter()
            async with asyncio.timeout(timeout):  # not wait_for: it can lose a cancel
                await loop.sock_connect(sock, dest)
            return ProbeResult("ok", time.perf_counter() - started)
        except TimeoutError:
            return ProbeResult("timeout")
        except OSError as exc:
            return ProbeResult("error", error=_errno_text(exc))
        finally:
            sock.close()

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- removal


@dataclass(frozen=True)
class RemovalResult:
    removed: int
    failed: int  # refused, or gone between the dump and the delete
    seconds: float
    error: str | None = None  # the dump itself failed


def _family(selector: EntryFilter) -> int:
    for network in (selector.src, selector.dst):
        if network is not None:
            return AF_INET if network.version == 4 else AF_INET6
    return 0


def remove_connections(
    selector: EntryFilter, *, committer_factory: Callable[[], Committer] = Committer
) -> RemovalResult:
    """Delete every conntrack entry ``selector`` matches (blocking: run it in a thread).

    A dump, filtered in the kernel by mark where the mask is full, then by ``selector``,
    then batched deletes on a socket of its own: the deletions are not the agent's own
    writes, so their DESTROY events reach the peers like any other.
    """
    started = time.perf_counter()
    targets: list[tuple[CtTuple, int | None]] = []
    mark = selector.mark if selector.mark_mask == U32_MAX else None
    try:
        with open_socket() as dump_sock:
            for buf, _t, start, end in iter_dump(dump_sock, _family(selector), mark=mark):
                try:
                    entry = nl.decode_entry(buf, start, end)
                except CtnetlinkError:
                    continue  # not ours to judge: the sync path counts such entries
                if selector.matches(entry):
                    targets.append((entry.orig, entry.zone))
        with committer_factory() as committer:
            removed, failed = committer.delete_many(targets)
    except OSError as exc:
        return RemovalResult(0, 0, time.perf_counter() - started, _errno_text(exc))
    return RemovalResult(removed, failed, time.perf_counter() - started)
