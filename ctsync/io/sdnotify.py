"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``), without libsystemd.

Datagrams of ``KEY=value`` lines to the AF_UNIX socket in ``$NOTIFY_SOCKET`` (a leading
``@`` names an abstract socket). Outside systemd the variable is unset and every call is
a silent no-op, so the agent calls these unconditionally.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``lines`` as one message; True if it was sent. Never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not lines:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False  # vsock addresses (systemd >= 253 in VMs) are not supported
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text.replace(chr(10), ' ')}")


def watchdog() -> bool:
    """Keep-alive ping; send it every ``watchdog_interval() / 2`` seconds."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """systemd's watchdog timeout in seconds, or None if the watchdog is off or not ours
    (``WATCHDOG_PID`` names another process)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None
