"""sd_notify against a real AF_UNIX datagram socket standing in for systemd (no root)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctsync.io import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_arrive(notify_socket: socket.socket) -> None:
    assert sdnotify.ready()
    assert received(notify_socket) == ["READY=1"]
    assert sdnotify.ready("synced 3 peers")
    assert received(notify_socket) == ["READY=1", "STATUS=synced 3 peers"]
    assert sdnotify.status("committing\n100 entries")
    assert received(notify_socket) == ["STATUS=committing 100 entries"]
    assert sdnotify.watchdog()
    assert received(notify_socket) == ["WATCHDOG=1"]
    assert sdnotify.stopping()
    assert received(notify_socket) == ["STOPPING=1"]
    assert sdnotify.notify("RELOADING=1", "MONOTONIC_USEC=5")
    assert received(notify_socket) == ["RELOADING=1", "MONOTONIC_USEC=5"]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ctsync-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert received(sock) == ["READY=1"]


def test_unset_or_unreachable_is_a_silent_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready()
    assert not sdnotify.status("x")
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert not sdnotify.watchdog()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing"))
    assert not sdnotify.stopping()
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not sdnotify.ready()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "abc", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None
