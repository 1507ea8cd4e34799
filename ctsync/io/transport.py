"""The sync transport: UDP datagrams over one or more dedicated links, with failover.

conntrackd's channel model (``src/multichannel.c``, ``src/mcast.c``, ``src/udp.c``): each
link is one UDP socket bound to one interface, carrying either multicast (one group) or
unicast (a list of peers). Datagrams are received on *every* link but sent only on the
ACTIVE one; there is no duplication. When the active link's interface stops being UP and
RUNNING, or a send fails with an error that says the device is gone, the next link that
is UP and RUNNING (in round-robin order after the failed one) becomes active.

Return to the preferred link: off by default, as in conntrackd — a link that flapped once
is likely to flap again, and switching back costs a burst of reordering for nothing while
the current link works. ``failback=True`` makes the first configured link that is RUNNING
active again as soon as it is.

Everything about a link goes through that link's own socket (interface index, flags and
MTU by ioctl), never through ``/sys/class/net`` or ``if_nametoindex``: both look at the
caller's *current* network namespace, while the socket stays in the namespace it was
created in. An agent (or a test) can therefore create the transport inside a namespace
and run it from anywhere.

"Nothing listens beyond what the config asks for": a multicast socket is bound to its
group (not the wildcard) where the kernel allows it, does not receive groups other
sockets joined (``IP_MULTICAST_ALL=0``), and is bound to its device; a unicast socket
drops datagrams from addresses that are not configured peers (counted ``unknown_source``).

Errors never reach the event loop: a failed send or receive, a datagram from a stranger
or a handler that raises is counted and logged (once per link and kind), and the
transport keeps going. Authentication is the wire layer's job, not this one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("ctsync.transport")

DEFAULT_PORT = 3780

#: on_datagram(payload, (source address, source port), link index)
DatagramHandler = Callable[[bytes, tuple[str, int], int], None]

LinkStatus = Literal["RUNNING", "NO-CARRIER", "DOWN"]
LinkRole = Literal["ACTIVE", "BACKUP"]

# Not (all) exported by the socket module.
IP_MULTICAST_ALL = 49
IPV6_MULTICAST_ALL = 29
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
_SIOCGIFFLAGS = 0x8913
_SIOCGIFMTU = 0x8921
_SIOCGIFINDEX = 0x8933
_IFF_UP = 0x1
_IFF_RUNNING = 0x40
_IFREQ_SIZE = 40

#: A send that fails with one of these means the device (or its address) is gone:
#: look for another link at once instead of waiting for the next poll.
FAILOVER_ERRNOS = frozenset(
    {errno.ENETDOWN, errno.ENODEV, errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.ENXIO}
)

_MAX_DATAGRAM = 65535
_RECV_BURST = 100  # conntrackd's EventIterationLimit: datagrams handled per wakeup
_IPV4_UDP_OVERHEAD = 20 + 8
_IPV6_UDP_OVERHEAD = 40 + 8


class TransportError(Exception):
    """A link cannot be opened (bad interface, address in use, ...): a startup error."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_address(text: str) -> IPAddress:
    """An IP address; a ``%scope`` suffix (``fe80::1%eth0``) is ignored, the link's
    interface supplies the scope."""
    return ipaddress.ip_address(text.split("%", 1)[0])


@dataclass(frozen=True)
class LinkConfig:
    """One dedicated sync link: an interface and either a multicast group or unicast peers.

    ``listen_address`` is, for unicast, the local address to bind (default: any), and for
    IPv4 multicast the source address for sending (default: the kernel's choice on the
    interface). Buffer sizes of 0 keep the kernel defaults; others are forced beyond
    ``rmem_max``/``wmem_max`` where the process may (conntrackd's ``SndSocketBuffer``,
    ``RcvSocketBuffer``).
    """

    interface: str
    group: str | None = None
    peers: Sequence[str] = ()
    port: int = DEFAULT_PORT
    listen_address: str | None = None
    sndbuf: int = 0
    rcvbuf: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", tuple(self.peers))
        if not 0 < len(self.interface) <= 15 or "/" in self.interface:
            raise ValueError(f"interface {self.interface!r}: 1-15 characters, no '/'")
        if (self.group is None) == (not self.peers):
            raise ValueError("a link has either a multicast group or unicast peers")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port}: must be 1-65535")
        if self.sndbuf < 0 or self.rcvbuf < 0:
            raise ValueError("buffer sizes cannot be negative")
        if self.group is not None:
            group = _parse_address(self.group)
            if not group.is_multicast:
                raise ValueError(f"group {self.group}: not a multicast address")
            if self.listen_address is not None and group.version == 6:
                raise ValueError("listen_address is for IPv4 multicast and unicast only")
        for peer in self.peers:
            addr = _parse_address(peer)
            if addr.is_multicast or addr.is_unspecified:
                raise ValueError(f"peer {peer}: not a unicast address")
        version = self.version  # raises if the peers mix families
        if self.listen_address is not None:
            local = _parse_address(self.listen_address)
            if local.version != version:
                raise ValueError(f"listen_address {self.listen_address}: wrong address family")

    @property
    def multicast(self) -> bool:
        return self.group is not None

    @property
    def version(self) -> int:
        """4 or 6, from the group or the peers (which must not mix families)."""
        if self.group is not None:
            return _parse_address(self.group).version
        versions = {_parse_address(peer).version for peer in self.peers}
        if len(versions) != 1:
            raise ValueError("unicast peers of one link must share an address family")
        return versions.pop()


@dataclass(frozen=True)
class LinkStats:
    """One link, as ``conntrackd -s link`` prints it, plus ctsync's extra counters."""

    index: int
    device: str
    kind: str  # "multicast" | "UDP", conntrackd's words
    status: LinkStatus
    role: LinkRole
    bytes_sent: int
    bytes_recv: int
    packets_sent: int
    packets_recv: int
    send_errors: int
    recv_errors: int
    unknown_source: int
    handler_errors: int
    mtu: int


@dataclass(frozen=True)
class TransportStats:
    links: tuple[LinkStats, ...]
    active: int
    link_failovers: int
    no_link_available: int  # times a failover found no RUNNING link to switch to


@dataclass
class _Counters:
    bytes_sent: int = 0
    bytes_recv: int = 0
    packets_sent: int = 0
    packets_recv: int = 0
    send_errors: int = 0
    recv_errors: int = 0
    unknown_source: int = 0
    handler_errors: int = 0


def _ifreq(name: str) -> bytes:
    """A zeroed ``struct ifreq`` naming the interface."""
    return struct.pack("16s", name.encode()) + bytes(_IFREQ_SIZE - 16)


@dataclass
class _Link:
    index: int
    config: LinkConfig
    sock: socket.socket
    family: int
    ifindex: int = 0
    status: LinkStatus = "DOWN"
    mtu: int = 1500
    counters: _Counters = field(default_factory=_Counters)
    destinations: list[tuple[str, int] | tuple[str, int, int, int]] = field(default_factory=list)
    peers: frozenset[IPAddress] = frozenset()
    logged: set[str] = field(default_factory=set)
    #: a send said the device is gone while its flags still say RUNNING (e.g. its address
    #: was removed): not chosen as active until the next poll looks again
    suspect: bool = False

    @property
    def usable(self) -> bool:
        return self.status == "RUNNING" and not self.suspect

    # --- device state, through the socket (namespace-correct) ---------------------------

    def _ioctl(self, request: int) -> bytes:
        return fcntl.ioctl(self.sock.fileno(), request, _ifreq(self.config.interface))

    def read_device(self) -> tuple[int, LinkStatus]:
        """(ifindex, status) of the link's interface; (0, "DOWN") if it does not exist."""
        try:
            (ifindex,) = struct.unpack_from("i", self._ioctl(_SIOCGIFINDEX), 16)
            (flags,) = struct.unpack_from("H", self._ioctl(_SIOCGIFFLAGS), 16)
        except OSError:
            return 0, "DOWN"
        if not flags & _IFF_UP:
            return ifindex, "DOWN"
        return ifindex, "RUNNING" if flags & _IFF_RUNNING else "NO-CARRIER"

    def read_mtu(self) -> int:
        with contextlib.suppress(OSError):
            (mtu,) = struct.unpack_from("i", self._ioctl(_SIOCGIFMTU), 16)
            return int(mtu)
        return self.mtu

    # --- configuration ----------------------------------------------------------------

    def attach(self, ifindex: int) -> None:
        """Bind the socket to the device with this index, join the group, set destinations.

        Called at start and again when the interface was re-created (new index): the
        kernel drops memberships and device bindings with the old device.
        """
        cfg = self.config
        sock = self.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, cfg.interface.encode())
        if cfg.group is not None:
            group = _parse_address(cfg.group)
            if self.family == socket.AF_INET:
                local = socket.inet_aton(cfg.listen_address or "0.0.0.0")
                mreqn = struct.pack("4s4si", group.packed, local, ifindex)
                try:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:  # already a member on this device
                        raise
                sock.setsockopt(
                    socket.IPPROTO_IP,
                    socket.IP_MULTICAST_IF,
                    struct.pack("4s4si", bytes(4), local, ifindex),
                )
                self.destinations = [(str(group), cfg.port)]
            else:
                mreq = struct.pack("16si", group.packed, ifindex)
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                self.destinations = [(str(group), cfg.port, 0, ifindex)]
        else:
            dests: list[tuple[str, int] | tuple[str, int, int, int]] = []
            for peer in cfg.peers:
                addr = _parse_address(peer)
                if addr.version == 4:
                    dests.append((str(addr), cfg.port))
                else:
                    scope = ifindex if addr.is_link_local else 0
                    dests.append((str(addr), cfg.port, 0, scope))
            self.destinations = dests
            self.peers = frozenset(_parse_address(peer) for peer in cfg.peers)
        self.ifindex = ifindex
        self.mtu = self.read_mtu()

    # --- logging ----------------------------------------------------------------------

    def log_once(self, kind: str, msg: str, *args: object) -> None:
        """Warn the first time something goes wrong on this link; debug afterwards."""
        level = logging.DEBUG if kind in self.logged else logging.WARNING
        self.logged.add(kind)
        log.log(level, "link %d (%s): " + msg, self.index, self.config.interface, *args)

    def snapshot(self, role: LinkRole) -> LinkStats:
        c = self.counters
        return LinkStats(
            index=self.index,
            device=self.config.interface,
            kind="multicast" if self.config.multicast else "UDP",
            status=self.status,
            role=role,
            bytes_sent=c.bytes_sent,
            bytes_recv=c.bytes_recv,
            packets_sent=c.packets_sent,
            packets_recv=c.packets_recv,
            send_errors=c.send_errors,
            recv_errors=c.recv_errors,
            unknown_source=c.unknown_source,
            handler_errors=c.handler_errors,
            mtu=self.mtu,
        )


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    if size <= 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)  # needs CAP_NET_ADMIN
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _open_socket(cfg: LinkConfig) -> tuple[socket.socket, int]:
    """The link's UDP socket, configured and bound, but not yet attached to the device."""
    family = socket.AF_INET if cfg.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, cfg.sndbuf)
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, cfg.rcvbuf)
        # Bound to the device before bind(): binding to a link-scope IPv6 group needs it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, cfg.interface.encode())
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if cfg.group is not None:
            # Several links (devices) may share a group and port in one namespace.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
                wildcard = "0.0.0.0"
            else:
                with contextlib.suppress(OSError):  # kernels before 4.20 lack it
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
                wildcard = "::"
            try:
                # Bound to the group, unicast datagrams to our port are not ours.
                sock.bind((cfg.group, cfg.port))
            except OSError:
                sock.bind((wildcard, cfg.port))
        else:
            default = "0.0.0.0" if family == socket.AF_INET else "::"
            sock.bind((cfg.listen_address or default, cfg.port))
    except BaseException:
        sock.close()
        raise
    return sock, family


class Transport:
    """UDP sync links: receive on all, send on the active one, fail over between them.

    ``start()`` opens every socket before it first suspends, so it can be awaited inside a
    ``setns``-style context to create the sockets in another network namespace.
    """

    def __init__(
        self,
        links: Sequence[LinkConfig],
        on_datagram: DatagramHandler,
        *,
        poll_interval: float = 0.2,
        failback: bool = False,
    ) -> None:
        if not links:
            raise ValueError("at least one sync link is needed")
        if len(links) > 4:  # conntrackd's MULTICHANNEL_MAX
            raise ValueError("at most 4 sync links")
        self.configs = tuple(links)
        self.on_datagram = on_datagram
        self.poll_interval = poll_interval
        self.failback = failback
        self._links: list[_Link] = []
        self._active = 0
        self._failovers = 0
        self._no_link = 0
        self._no_link_logged = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open, bind and attach every link; choose the first RUNNING one as active.

        Raises :class:`TransportError` naming the interface if a link cannot be opened.
        """
        if self._loop is not None:
            raise RuntimeError("transport already started")
        loop = asyncio.get_running_loop()
        try:
            for index, cfg in enumerate(self.configs):
                self._links.append(self._open_link(index, cfg))
        except BaseException:
            self._close_sockets()
            raise
        self._loop = loop
        for link in self._links:
            loop.add_reader(link.sock.fileno(), self._on_readable, link)
        self._active = next((ln.index for ln in self._links if ln.usable), 0)
        log.info(
            "sync transport started: %s; active link %d (%s)",
            ", ".join(f"{c.interface}:{c.group or ','.join(c.peers)}" for c in self.configs),
            self._active,
            self.configs[self._active].interface,
        )
        self._watcher = loop.create_task(self._watch(), name="ctsync-transport-watch")

    @staticmethod
    def _open_link(index: int, cfg: LinkConfig) -> _Link:
        what = f"link {index} ({cfg.interface}, {cfg.group or ', '.join(cfg.peers)})"
        try:
            sock, family = _open_socket(cfg)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise TransportError(f"{what}: no such interface") from exc
            raise TransportError(f"{what}: {exc.strerror or exc}") from exc
        link = _Link(index=index, config=cfg, sock=sock, family=family)
        try:
            ifindex, link.status = link.read_device()
            if not ifindex:
                raise TransportError(f"{what}: no such interface")
            link.attach(ifindex)
        except OSError as exc:
            sock.close()
            raise TransportError(f"{what}: {exc.strerror or exc}") from exc
        except BaseException:
            sock.close()
            raise
        return link

    def close(self) -> None:
        """Stop watching and receiving, close the sockets. Idempotent."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._loop is not None and not self._loop.is_closed():
            for link in self._links:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(link.sock.fileno())
        self._close_sockets()

    def _close_sockets(self) -> None:
        for link in self._links:
            link.sock.close()
        self._links.clear()

    # --- sending -----------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Index of the link datagrams are sent on."""
        return self._active

    def max_datagram(self) -> int:
        """Largest UDP payload that fits the active link's MTU unfragmented."""
        link = self._links[self._active]
        overhead = _IPV4_UDP_OVERHEAD if link.family == socket.AF_INET else _IPV6_UDP_OVERHEAD
        return link.mtu - overhead

    def send(self, datagram: bytes) -> bool:
        """Send on the active link (to the group, or to every peer). True if all went out.

        A send that fails because the device is gone triggers an immediate failover and
        one retry on the new link; any other failure is counted and the datagram is
        dropped (the sync protocol resends what matters).
        """
        if not self._links:
            return False  # not started, or closed (shutdown in progress)
        link = self._links[self._active]
        err = self._send_on(link, datagram)
        if err in FAILOVER_ERRNOS:
            self._refresh(reason=f"send failed: {errno.errorcode.get(err, err)}", failed=link)
            if self._active != link.index:
                err = self._send_on(self._links[self._active], datagram)
        return err == 0

    def _send_on(self, link: _Link, datagram: bytes) -> int:
        """Send to every destination of *link*; 0 or the last errno."""
        result = 0
        for dest in link.destinations:
            try:
                sent = link.sock.sendto(datagram, dest)
            except OSError as exc:
                link.counters.send_errors += 1
                result = exc.errno or errno.EIO
                link.log_once(f"send-{result}", "send to %s failed: %s", dest[0], exc)
                continue
            link.counters.packets_sent += 1
            link.counters.bytes_sent += sent
        return result

    # --- receiving ---------------------------------------------------------------------

    def _on_readable(self, link: _Link) -> None:
        for _ in range(_RECV_BURST):
            try:
                data, source = link.sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                link.counters.recv_errors += 1
                link.log_once(f"recv-{exc.errno}", "receive failed: %s", exc)
                continue  # errors are per datagram (queued ICMP errors): keep draining
            host = str(source[0])
            port = int(source[1])
            if link.peers:
                try:
                    addr = _parse_address(host)
                except ValueError:
                    addr = None
                if addr not in link.peers:
                    link.counters.unknown_source += 1
                    link.log_once("unknown-source", "datagram from unknown %s dropped", host)
                    continue
            link.counters.packets_recv += 1
            link.counters.bytes_recv += len(data)
            try:
                self.on_datagram(data, (host, port), link.index)
            except Exception:
                link.counters.handler_errors += 1
                if "handler" not in link.logged:
                    link.logged.add("handler")
                    log.exception("link %d: datagram handler failed", link.index)

    # --- link monitoring and failover --------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self._refresh()
            except Exception:  # never let the watcher die
                log.exception("link check failed")

    def check_links(self) -> None:
        """Refresh every link's status and choose the active link now (the watcher does
        this every ``poll_interval``; a send that finds its device gone does it at once)."""
        self._refresh()

    def _refresh(self, reason: str = "", failed: _Link | None = None) -> None:
        for link in self._links:
            if failed is None:
                link.suspect = False
            ifindex, status = link.read_device()
            if ifindex and ifindex != link.ifindex:
                try:
                    link.attach(ifindex)
                    log.info(
                        "link %d (%s): attached to ifindex %d",
                        link.index,
                        link.config.interface,
                        ifindex,
                    )
                except OSError as exc:
                    link.log_once("attach", "cannot attach to re-created device: %s", exc)
                    status = "DOWN"
            elif not ifindex:
                link.ifindex = 0  # gone: re-attach when it is back, even at the same index
            elif status == "RUNNING":
                link.mtu = link.read_mtu()
            if status != link.status:
                log.info(
                    "link %d (%s): %s -> %s", link.index, link.config.interface, link.status, status
                )
                link.status = status
        if failed is not None:
            failed.suspect = True
        self._choose_active(reason)

    def _choose_active(self, reason: str) -> None:
        current = self._links[self._active]
        n = len(self._links)
        target: int | None = None
        if self.failback:
            target = next((ln.index for ln in self._links if ln.usable), None)
        elif not current.usable:
            # conntrackd's interface_candidate: round-robin from the link after this one.
            for step in range(1, n):
                candidate = self._links[(current.index + step) % n]
                if candidate.usable:
                    target = candidate.index
                    break
        # "No link" is about devices: a send error alone (suspect) is logged where it happens.
        any_running = any(ln.status == "RUNNING" for ln in self._links)
        if not any_running and not self._no_link_logged:
            self._no_link += 1
            log.error(
                "no dedicated links available! (staying on link %d, %s)",
                current.index,
                current.config.interface,
            )
        self._no_link_logged = not any_running
        if target is None or target == current.index:
            return
        self._active = target
        self._failovers += 1
        new = self._links[target]
        log.warning(
            "device `%s' becomes dedicated link (link %d; was %s: %s%s)",
            new.config.interface,
            target,
            current.config.interface,
            current.status,
            f", {reason}" if reason else "",
        )

    # --- statistics --------------------------------------------------------------------

    def stats(self) -> TransportStats:
        return TransportStats(
            links=tuple(
                ln.snapshot("ACTIVE" if ln.index == self._active else "BACKUP")
                for ln in self._links
            ),
            active=self._active,
            link_failovers=self._failovers,
            no_link_available=self._no_link,
        )
