"""The agent on a real event loop, without sockets: its timer task stops when cancelled,
even right after it was woken; its log lines carry priorities for the journal; listing a
large cache yields to the loop, and the CLI's record format decodes to the same entries.

Python 3.11's asyncio.wait_for returns normally when the awaited event is set just as
the task is cancelled, and the cancel is lost: the timer loop went on and the agent's
shutdown waited for it until systemd killed it (found by tests/e2e/test_systemd_unit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctsync.agent import Agent, setup_logging
from ctsync.config import loads_config

CONFIG = 'node-id = 1\n[sync]\ninterface = "lo"\n[auth]\nallow-unauthenticated = true\n'


def test_timer_cancel_is_not_lost_when_it_was_just_woken() -> None:
    async def run() -> int:
        lost = 0
        for _ in range(20):
            agent = Agent(loads_config(CONFIG), key=None)
            task = asyncio.get_running_loop().create_task(agent._timer())
            await asyncio.sleep(0.005)
            agent._wake.set()  # wakes the timer ...
            task.cancel()  # ... and stops it in the same loop iteration
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await asyncio.wait_for(asyncio.shield(task), 1.0)
                except TimeoutError:
                    lost += 1
                    task.cancel()
                    await task
        return lost

    assert asyncio.run(run()) == 0


@pytest.fixture
def ctsync_logger() -> Iterator[None]:
    """setup_logging reconfigures the "ctsync" logger: put it back for the other tests."""
    root = logging.getLogger("ctsync")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        yield
    finally:
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


@pytest.mark.usefixtures("ctsync_logger")
def test_log_lines_to_the_journal_carry_their_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd (JOURNAL_STREAM names our stderr) each line starts with its syslog
    priority, so that `journalctl -p err` finds the errors; elsewhere it does not."""
    log = logging.getLogger("ctsync.test")
    for journal in (True, False):
        path = tmp_path / f"stderr-{journal}"
        with path.open("w") as stream:
            st = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}" if journal else "1:2")
            setup_logging("logfmt", "info", stream)
            log.error("commit failed")
            log.info("started")
            log.debug("not shown")
        lines = path.read_text().splitlines()
        if journal:
            assert lines == [
                '<3>level=error logger=ctsync.test msg="commit failed"',
                '<6>level=info logger=ctsync.test msg="started"',
            ]
        else:
            assert lines[0].startswith("level=error") and len(lines) == 2


def test_cache_listing_as_records_decodes_to_the_same_entries() -> None:
    """`show cache` asks for hex records and decodes them itself (the agent's cost per
    entry is then a hex encode): the CLI prints what the agent's own decoding gives, with
    and without a filter, and the agent yields to its loop while it lists."""
    from ctsync.cli.agent_cmds import _decode_records
    from ctsync.core import record
    from ctsync.core.entry import IPPROTO_TCP, IPPROTO_UDP, Entry, TcpInfo, make_tuple

    agent = Agent(loads_config(CONFIG), key=None)
    for i in range(12000):  # more than two listing slices
        proto = IPPROTO_TCP if i % 3 else IPPROTO_UDP
        orig = make_tuple(f"192.0.2.{i % 200 + 1}", "203.0.113.7", proto, 1024 + i, 443)
        info = TcpInfo(3) if proto == IPPROTO_TCP else None
        agent.internal.put(*record.from_entry(Entry(orig, status=14, timeout=60, protoinfo=info)))

    async def listing(args: dict[str, object]) -> dict[str, object]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.get_running_loop().create_task(ticker())
        await asyncio.sleep(0)
        try:
            result = await agent.cmd_cache(args)
        finally:
            task.cancel()
        result["ticks"] = ticks
        return result

    for selection in ({}, {"proto": "udp"}):
        base = {"which": "internal", "filter": selection}
        entries = asyncio.run(listing(base))
        records = asyncio.run(listing({**base, "format": "records"}))
        assert records["count"] == entries["count"] == len(entries["entries"])  # type: ignore[arg-type]
        assert _decode_records(records["records"]) == entries["entries"]  # type: ignore[arg-type]
        assert records["ticks"] >= 2 and entries["ticks"] >= 2  # type: ignore[operator]
    assert entries["count"] == 4000
