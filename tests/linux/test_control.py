"""The control socket against the real kernel: modes, owner, credentials, robustness.

Root-only (it checks root ownership and runs a client as uid 65534 with ``setpriv``). The
server runs on the test's asyncio loop; the synchronous client runs in a thread, the
unprivileged client in a subprocess (stopped by pid if it hangs).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctsync.io.control import (
    MAX_REQUEST,
    AgentError,
    AgentUnreachable,
    CommandError,
    ControlServer,
    ControlSocketError,
    call,
)

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]

NOBODY = 65534

CLIENT_SCRIPT = """
import sys
from ctsync.io.control import AgentError, AgentUnreachable, call
try:
    print("RESULT", call(sys.argv[1], "echo", {"x": 1}, timeout=5))
except (AgentUnreachable, AgentError) as exc:
    print(type(exc).__name__, exc)
"""


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory any user can traverse (the unprivileged client must reach the socket)."""
    path = Path(tempfile.mkdtemp(prefix="ctsync-ctl-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def echo(args: dict[str, Any]) -> Any:
    return args


async def fail(args: dict[str, Any]) -> Any:
    raise CommandError("commit failed: 3 entries rejected")


async def crash(args: dict[str, Any]) -> Any:
    raise RuntimeError("bug")


async def unencodable(args: dict[str, Any]) -> Any:
    return {"x": object()}


def make_server(path: Path, **kwargs: Any) -> ControlServer:
    server = ControlServer(path, **kwargs)
    server.register("echo", echo)
    server.register("fail", fail)
    server.register("crash", crash)
    server.register("unencodable", unencodable)
    return server


def run_with_server(
    path: Path, body: Callable[[ControlServer], Awaitable[None]], **kwargs: Any
) -> None:
    async def main() -> None:
        server = make_server(path, **kwargs)
        await server.start()
        try:
            await body(server)
        finally:
            await server.close()

    asyncio.run(main())


def raw_exchange(path: Path, payload: bytes, *, shut: bool = False) -> dict[str, Any]:
    """Send raw bytes, read the reply until EOF (synchronous; run it in a thread)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    reply: dict[str, Any] = json.loads(b"".join(chunks))
    return reply


async def run_as_nobody(path: Path) -> str:
    """Run the client as uid/gid 65534 (no groups); return its output line."""
    proc = await asyncio.create_subprocess_exec(
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        sys.executable,
        "-c",
        CLIENT_SCRIPT,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd="/",
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()  # our own child, by pid
            await proc.wait()
    return out.decode().strip()


# --------------------------------------------------------------------------- tests


def test_socket_mode_owner_and_round_trip(sock_dir: Path) -> None:
    path = sock_dir / "run" / "ctsync.sock"

    async def body(server: ControlServer) -> None:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (0, 0)
        parent = os.stat(path.parent)
        assert stat.S_IMODE(parent.st_mode) == 0o750
        assert (parent.st_uid, parent.st_gid) == (0, 0)

        args = {"a": [1, 2, "three"], "nested": {"ok": None}}
        assert await asyncio.to_thread(call, path, "echo", args) == args
        assert await asyncio.to_thread(call, path, "echo") == {}

        with pytest.raises(AgentError, match="commit failed: 3 entries rejected") as err:
            await asyncio.to_thread(call, path, "fail")
        assert err.value.code == "failed"
        with pytest.raises(AgentError, match="crash: internal error") as err:
            await asyncio.to_thread(call, path, "crash")
        with pytest.raises(AgentError, match="cannot be encoded"):
            await asyncio.to_thread(call, path, "unencodable")
        with pytest.raises(AgentError, match=r"unknown command 'nope'.*echo") as err:
            await asyncio.to_thread(call, path, "nope")
        assert err.value.code == "unknown-command"
        assert await asyncio.to_thread(call, path, "echo", {"still": "serving"}) == {
            "still": "serving"
        }
        assert server.stats.requests == 7

    run_with_server(path, body)
    assert not path.exists()  # close() removed it


def test_non_root_caller_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "run" / "ctsync.sock"

    async def body(server: ControlServer) -> None:
        # 1. the 0750 root directory alone keeps uid 65534 out
        out = await run_as_nobody(path)
        assert out.startswith("AgentUnreachable") and "permission denied" in out, out
        # 2. the socket's own 0600 mode keeps it out
        path.parent.chmod(0o755)
        out = await run_as_nobody(path)
        assert out.startswith("AgentUnreachable") and "permission denied" in out, out
        assert server.stats.denied == 0
        # 3. with the mode opened up, SO_PEERCRED still refuses it
        path.chmod(0o666)
        out = await run_as_nobody(path)
        assert out.startswith("AgentUnreachable"), out
        assert "permission denied: uid 65534" in out, out
        assert server.stats.denied == 1
        # root still gets through
        assert await asyncio.to_thread(call, path, "echo", {"x": 1}) == {"x": 1}

    run_with_server(path, body, allowed_uids={0})


def test_malformed_and_oversize_requests_get_errors(sock_dir: Path) -> None:
    path = sock_dir / "ctsync.sock"

    async def body(server: ControlServer) -> None:
        cases: list[tuple[bytes, str, bool]] = [
            (b"not json\n", "malformed", False),
            (b"[1, 2]\n", "malformed", False),
            (b'{"args": {}}\n', "malformed", False),
            (b'{"command": "echo", "args": 5}\n', "malformed", False),
            (b"\xff\xfe\n", "malformed", False),
            (b"", "malformed", True),  # connect, send nothing, close the write side
            (b"x" * (MAX_REQUEST + 10), "too-large", True),
            (
                b'{"command": "echo", "args": {"k": "' + b"v" * (4 * MAX_REQUEST) + b'"}}\n',
                "too-large",
                False,
            ),
        ]
        for payload, code, shut in cases:
            reply = await asyncio.to_thread(raw_exchange, path, payload, shut=shut)
            assert reply["ok"] is False, payload[:40]
            assert reply["code"] == code, (payload[:40], reply)
            assert reply["error"]
        # a request without the newline, ended by EOF, is fine
        reply = await asyncio.to_thread(
            raw_exchange, path, b'{"command": "echo", "args": {"eof": 1}}', shut=True
        )
        assert reply == {"ok": True, "result": {"eof": 1}}
        # a client that connects and says nothing is timed out, not waited for
        reply = await asyncio.to_thread(raw_exchange, path, b"")
        assert reply["code"] == "timeout"
        assert await asyncio.to_thread(call, path, "echo", {"n": 2}) == {"n": 2}
        assert server.stats.errors == len(cases) + 1

    run_with_server(path, body, request_timeout=0.5)


def test_second_server_refuses_while_first_runs(sock_dir: Path) -> None:
    path = sock_dir / "ctsync.sock"

    async def body(server: ControlServer) -> None:
        inode = os.stat(path).st_ino
        second = make_server(path)
        with pytest.raises(ControlSocketError, match="another agent"):
            await second.start()
        await second.close()  # must not remove the first server's socket
        assert os.stat(path).st_ino == inode
        assert await asyncio.to_thread(call, path, "echo", {"first": True}) == {"first": True}

    run_with_server(path, body)


def test_stale_socket_is_replaced_and_other_files_are_not(sock_dir: Path) -> None:
    path = sock_dir / "ctsync.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens: what a killed agent leaves
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with pytest.raises(AgentUnreachable, match="connection refused"):
        call(path, "echo")

    async def body(server: ControlServer) -> None:
        assert await asyncio.to_thread(call, path, "echo", {"new": 1}) == {"new": 1}

    run_with_server(path, body)

    with pytest.raises(AgentUnreachable, match="no such file"):
        call(path, "echo")
    path.write_text("not a socket")

    async def start_on_file() -> None:
        with pytest.raises(ControlSocketError, match="not a socket"):
            await make_server(path).start()

    asyncio.run(start_on_file())
    assert path.read_text() == "not a socket"


def test_waiting_handlers_large_replies_and_concurrent_requests(sock_dir: Path) -> None:
    """Inline handlers run at once until they first wait; one that waits continues as a task
    (results, CommandError and crashes after the wait are answered as before) while
    other requests are served; a reply larger than the socket buffer reaches a slow
    reader whole."""
    path = sock_dir / "ctsync.sock"
    release = asyncio.Event()
    big = "x" * (4 << 20)

    async def slow(args: dict[str, Any]) -> Any:
        await release.wait()
        return {"slow": args}

    async def slow_fail(args: dict[str, Any]) -> Any:
        await asyncio.sleep(0.01)
        raise CommandError("failed after waiting")

    async def slow_crash(args: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        raise RuntimeError("late bug")

    async def large(args: dict[str, Any]) -> Any:
        return {"blob": big}

    def slow_reader() -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b'{"command": "large"}\n')
            size = 0
            while chunk := sock.recv(4096):
                size += len(chunk)
                if size < (1 << 20):
                    time.sleep(0.001)  # let the server meet a full socket buffer
            return size

    async def body(server: ControlServer) -> None:
        # inline: the first step runs in the accept callback, the rest as a task
        server.register("slow", slow, inline=True)
        server.register("slow_fail", slow_fail, inline=True)
        server.register("slow_crash", slow_crash, inline=True)
        server.register("large", large, inline=True)
        pending = asyncio.ensure_future(asyncio.to_thread(call, path, "slow", {"n": 1}))
        await asyncio.sleep(0.1)
        assert not pending.done()
        # the waiting command does not hold up the others
        assert await asyncio.to_thread(call, path, "echo", {"fast": 1}) == {"fast": 1}
        assert not pending.done()
        release.set()
        assert await pending == {"slow": {"n": 1}}
        with pytest.raises(AgentError, match="failed after waiting"):
            await asyncio.to_thread(call, path, "slow_fail")
        with pytest.raises(AgentError, match="slow_crash: internal error"):
            await asyncio.to_thread(call, path, "slow_crash")
        size = await asyncio.to_thread(slow_reader)
        whole = json.dumps({"ok": True, "result": {"blob": big}}, separators=(",", ":"))
        assert size == len(whole) + 1
        reply = await asyncio.to_thread(call, path, "large")
        assert reply == {"blob": big}
        assert server.stats.requests == 6

    run_with_server(path, body)


def test_handlers_run_in_a_task_unless_inline(sock_dir: Path) -> None:
    """A handler not registered inline runs in a task from its first line, so it may use
    asyncio.timeout (which needs one); an inline one has none before it first waits."""
    path = sock_dir / "ctsync.sock"

    async def timed(args: dict[str, Any]) -> Any:
        async with asyncio.timeout(5):
            return {"task": asyncio.current_task() is not None}

    async def eager(args: dict[str, Any]) -> Any:
        return {"task": asyncio.current_task() is not None}

    async def body(server: ControlServer) -> None:
        server.register("timed", timed)
        server.register("eager", eager, inline=True)
        assert await asyncio.to_thread(call, path, "timed") == {"task": True}
        assert await asyncio.to_thread(call, path, "eager") == {"task": False}

    run_with_server(path, body)
