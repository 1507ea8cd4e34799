"""The failover plan (pure) and the controller that runs it (with fake steps)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ctsync.controller import FailoverController
from ctsync.core.failover import (
    Role,
    Step,
    parse_fifo_line,
    parse_notify,
    parse_role,
    plan,
)

M, B, F, S = Role.MASTER, Role.BACKUP, Role.FAULT, Role.STOP


# --- the plan ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "speaker", "inject", "purge", "expected"),
    [
        # MASTER: commit strictly before the addresses, then primary-backup.sh's -f -R -B.
        (B, M, True, False, True, "commit addresses flush-external resync bulk-send"),
        (None, M, True, False, True, "commit addresses flush-external resync bulk-send"),
        # keepalived holds the addresses itself.
        (B, M, False, False, True, "commit flush-external resync bulk-send"),
        # disable-external-cache: nothing to commit, the injected entries become ours.
        (B, M, True, True, True, "adopt addresses resync bulk-send"),
        (F, M, False, True, False, "adopt resync bulk-send"),
        # BACKUP: ask the master for everything; purge only what we owned as master.
        (M, B, True, False, True, "request-resync purge"),
        (M, B, True, False, False, "request-resync"),
        (None, B, False, False, True, "request-resync"),
        (F, B, False, False, True, "request-resync"),
        (M, B, False, True, True, "request-resync purge"),
        # FAULT: conntrackd's -t, after being master.
        (M, F, True, False, True, "purge"),
        (B, F, True, False, True, ""),
        # STOP and repeats: nothing.
        (M, S, False, False, True, ""),
        (M, M, True, False, True, ""),
        (B, B, False, False, True, ""),
    ],
)
def test_plan(
    old: Role | None, new: Role, speaker: bool, inject: bool, purge: bool, expected: str
) -> None:
    steps = plan(old, new, speaker=speaker, inject=inject, purge=purge)
    assert " ".join(steps) == expected


def test_commit_precedes_addresses_whenever_both_are_planned() -> None:
    for old in (None, *Role):
        steps = plan(old, M, speaker=True, inject=False, purge=True)
        if steps:
            assert steps.index(Step.COMMIT) < steps.index(Step.ADDRESSES)


# --- parsing what keepalived and operators say --------------------------------------------


@pytest.mark.parametrize(
    ("word", "role"),
    [("primary", M), ("MASTER", M), ("master", M), ("backup", B), ("fault", F), ("STOP", S)],
)
def test_parse_role(word: str, role: Role) -> None:
    assert parse_role(word) is role


def test_parse_role_rejects_unknown_word() -> None:
    with pytest.raises(ValueError, match="unknown state 'slave'"):
        parse_role("slave")


def test_parse_notify_forms() -> None:
    assert parse_notify(["primary"]) == (M, None)
    assert parse_notify(["GROUP", "G1", "BACKUP", "0"]) == (B, "GROUP G1")
    assert parse_notify(["INSTANCE", "VI_1", "MASTER", "100"]) == (M, "INSTANCE VI_1")
    for bad in ([], ["a", "b"], ["INSTANCE", "VI_1", "MASTER_RX_LOWER_PRI", "100"]):
        with pytest.raises(ValueError):
            parse_notify(bad)


def test_parse_fifo_line() -> None:
    assert parse_fifo_line('INSTANCE "VI_1" MASTER 100\n') == ("INSTANCE", "VI_1", M)
    assert parse_fifo_line('GROUP "G1" BACKUP 0') == ("GROUP", "G1", B)
    assert parse_fifo_line('GROUP "G1" FAULT 0') == ("GROUP", "G1", F)
    for line in (
        'INSTANCE "VI_1" MASTER_RX_LOWER_PRI 100',
        'INSTANCE "VI_1" MASTER_PRIORITY 90',
        "INSTANCE VI_1 MASTER 100",
        'VS "x" UP 0',
        "",
        "garbage \x00\xff",
    ):
        assert parse_fifo_line(line) is None


# --- the controller ---------------------------------------------------------------------------


class FakeSteps:
    """Records the order of the steps; ``commit_seconds`` makes the commit slow."""

    def __init__(self, commit_seconds: float = 0.0) -> None:
        self.calls: list[str] = []
        self.commit_seconds = commit_seconds
        self.fail: set[str] = set()

    def _note(self, name: str) -> dict[str, Any]:
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"{name} broke")
        return {"step": name}

    async def commit(self) -> dict[str, Any]:
        self.calls.append("commit-start")
        await asyncio.sleep(self.commit_seconds)
        return self._note("commit")

    def adopt(self) -> dict[str, Any]:
        return self._note("adopt")

    def flush_external(self) -> dict[str, Any]:
        return self._note("flush-external")

    async def resync_kernel(self) -> dict[str, Any]:
        await asyncio.sleep(0)
        return self._note("resync")

    def bulk_send(self) -> dict[str, Any]:
        return self._note("bulk-send")

    def request_resync(self) -> dict[str, Any]:
        return self._note("request-resync")

    async def purge(self, timeout: int) -> dict[str, Any]:
        return self._note(f"purge {timeout}")


def controller(steps: FakeSteps, **kw: Any) -> FailoverController:
    options: dict[str, Any] = {
        "mechanism": "keepalived",
        "speaker": False,
        "inject": False,
        "purge_timeout": 60,
        "commit_wait": 5.0,
    }
    options.update(kw)
    return FailoverController(steps, **options)


def test_controller_runs_the_plan_and_keeps_the_record() -> None:
    async def main() -> None:
        steps = FakeSteps()
        ctl = controller(steps)
        first = await ctl.set_role(M, "test")
        assert steps.calls == ["commit-start", "commit", "flush-external", "resync", "bulk-send"]
        assert [s.step for s in first.steps] == ["commit", "flush-external", "resync", "bulk-send"]
        assert first.done is not None and all(s.seconds is not None for s in first.steps)
        steps.calls.clear()
        await ctl.set_role(M, "again")  # idempotent
        assert steps.calls == []
        await ctl.set_role(B, "test")
        assert steps.calls == ["request-resync", "purge 60"]
        status = ctl.status()
        assert status["state"] == "BACKUP"
        assert [(t["from"], t["to"]) for t in status["transitions"]] == [
            (None, "MASTER"),
            ("MASTER", "MASTER"),
            ("MASTER", "BACKUP"),
        ]

    asyncio.run(main())


def test_a_failing_step_is_recorded_and_the_others_still_run() -> None:
    async def main() -> None:
        steps = FakeSteps()
        steps.fail.add("flush-external")
        ctl = controller(steps)
        transition = await ctl.set_role(M, "test")
        errors = {s.step: s.error for s in transition.steps}
        assert errors["flush-external"] == "flush-external broke"
        assert errors["bulk-send"] is None and "bulk-send" in steps.calls

    asyncio.run(main())


def test_commit_wait_bounds_the_commit() -> None:
    async def main() -> None:
        steps = FakeSteps(commit_seconds=0.5)
        ctl = controller(steps, commit_wait=0.1)
        transition = await ctl.set_role(M, "test")
        commit = transition.steps[0]
        assert commit.result == {"timed_out": True}
        assert commit.seconds is not None and commit.seconds < 0.4
        # The rest ran while the commit went on in the background; it still finishes.
        assert "bulk-send" in steps.calls and "commit" not in steps.calls
        await asyncio.sleep(0.5)
        assert "commit" in steps.calls
        await ctl.close()

    asyncio.run(main())


def test_latest_request_wins() -> None:
    """keepalived's notify scripts run concurrently: requests that queue up behind a
    running transition are superseded by the newest one."""

    async def main() -> None:
        steps = FakeSteps(commit_seconds=0.05)
        ctl = controller(steps)
        first = asyncio.create_task(ctl.set_role(M, "1"))
        await asyncio.sleep(0.01)  # the commit is running
        second = asyncio.create_task(ctl.set_role(B, "2"))
        third = asyncio.create_task(ctl.set_role(F, "3"))
        done = await asyncio.gather(first, second, third)
        assert [t.skipped for t in done] == [False, True, False]
        assert ctl.role is F
        assert steps.calls[-1] == "purge 60"  # MASTER -> FAULT, BACKUP never ran
        assert "request-resync" not in steps.calls

    asyncio.run(main())


def test_speaker_split_commits_before_the_addresses() -> None:
    """With the VRRP speaker: before_addresses() returns after the commit; the rest of the
    plan runs after the speaker has added the addresses."""

    async def main() -> None:
        steps = FakeSteps()
        ctl = controller(steps, mechanism="vrrp", speaker=True)
        await ctl.before_addresses("VRRP")
        assert steps.calls == ["commit-start", "commit"]
        await asyncio.sleep(0.01)
        assert steps.calls == ["commit-start", "commit"]  # waits for the addresses
        steps.calls.append("ADDRESSES")  # what the speaker does next
        ctl.addresses_done(True)
        await asyncio.sleep(0.01)
        assert steps.calls == [
            "commit-start",
            "commit",
            "ADDRESSES",
            "flush-external",
            "resync",
            "bulk-send",
        ]
        transition = ctl.transitions[-1]
        assert [s.step for s in transition.steps] == [
            "commit",
            "addresses",
            "flush-external",
            "resync",
            "bulk-send",
        ]
        assert transition.done is not None
        # A BACKUP right after waits for the MASTER plan, then runs.
        await ctl.set_role(B, "VRRP")
        assert steps.calls[-2:] == ["request-resync", "purge 60"]

    asyncio.run(main())


# --- the hook command's fast path and its output ------------------------------------------


def test_fast_path_parses_keepalived_notify_arguments() -> None:
    from ctsync.cli.entry import _parse

    assert _parse(["failover", "primary"]) == (
        "failover",
        "/run/ctsync/ctsync.sock",
        {"args": ["primary"]},
        False,
    )
    parsed = _parse(["failover", "-S", "/tmp/s", "GROUP", "G1", "MASTER", "0", "--json"])
    assert parsed == ("failover", "/tmp/s", {"args": ["GROUP", "G1", "MASTER", "0"]}, True)
    # Anything the fast path cannot vouch for goes to the full CLI (usage errors, help).
    assert _parse(["failover", "slave"]) is None
    assert _parse(["failover", "--help"]) is None
    assert _parse(["failover"]) is None


def test_failover_exit_status_and_text() -> None:
    from ctsync.cli.entry import exit_status, format_failover

    ok = {
        "to": "MASTER",
        "skipped": False,
        "steps": [
            {"step": "commit", "seconds": 0.25, "result": {"failed": 0}, "error": None},
            {"step": "bulk-send", "seconds": 0.001, "result": {}, "error": None},
        ],
    }
    assert exit_status("failover", ok) == 0
    assert format_failover(ok) == "MASTER: commit 0.250s, bulk-send 0.001s"
    failed_entries = {**ok, "steps": [{**ok["steps"][0], "result": {"failed": 3}}]}
    assert exit_status("failover", failed_entries) == 1
    broken = {**ok, "steps": [{**ok["steps"][1], "error": "boom"}]}
    assert exit_status("failover", broken) == 1
    assert format_failover(broken) == "MASTER: bulk-send 0.001s FAILED"


def test_status_text_shows_transitions_and_steps() -> None:
    from ctsync.cli.render_sync import render_status

    transition = {
        "at": 1_700_000_000.0,
        "from": "BACKUP",
        "to": "MASTER",
        "reason": "VRRP: master down",
        "steps": [{"step": "commit", "seconds": 0.3, "error": None}],
        "done": 1_700_000_000.5,
        "skipped": False,
    }
    text = render_status(
        {
            "sync_interfaces": ["eth1"],
            "failover_mechanism": "vrrp [sync-group ctsync]",
            "last_transition": transition,
            "node_id": 1,
            "state": "MASTER",
            "failover": {"transitions": [transition]},
            "vrrp": {
                "sync_group": "ctsync",
                "state": "MASTER",
                "instances": [
                    {"name": "lan", "state": "MASTER", "priority": 150, "master": "192.0.2.1"}
                ],
            },
        }
    )
    assert "last state transition : MASTER at " in text
    assert "(from BACKUP, VRRP: master down), done in 0.500s" in text
    assert "commit          0.300s" in text
    assert "vrrp lan              : MASTER, priority 150, master 192.0.2.1" in text


def test_speaker_master_again_before_backup_ran_is_a_no_op() -> None:
    """MASTER -> BACKUP -> MASTER in the speaker while the first MASTER plan still waits
    for its addresses: the queued BACKUP is superseded, the first plan runs to its end
    (MASTER is still what is wanted) and the second MASTER has nothing to do."""

    async def main() -> None:
        steps = FakeSteps()
        ctl = controller(steps, mechanism="vrrp", speaker=True)
        await ctl.before_addresses("VRRP")  # the lock stays held until the addresses
        backup = asyncio.create_task(ctl.set_role(B, "VRRP"))
        again = asyncio.create_task(ctl.before_addresses("VRRP"))
        await asyncio.sleep(0.01)
        ctl.addresses_done(True)
        assert (await backup).skipped
        await again
        assert steps.calls == [
            "commit-start",
            "commit",
            "flush-external",
            "resync",
            "bulk-send",
        ]
        assert ctl.role is M
        await ctl.set_role(B, "VRRP")  # and the lock is free again
        assert steps.calls[-2:] == ["request-resync", "purge 60"]

    asyncio.run(main())


def test_leaving_master_while_the_addresses_are_added_skips_the_rest() -> None:
    async def main() -> None:
        steps = FakeSteps()
        ctl = controller(steps, mechanism="vrrp", speaker=True)
        await ctl.before_addresses("VRRP")
        backup = asyncio.create_task(ctl.set_role(B, "VRRP: higher priority"))
        await asyncio.sleep(0.01)
        ctl.addresses_done(False)
        transition = await backup
        assert not transition.skipped
        assert steps.calls == ["commit-start", "commit", "request-resync", "purge 60"]
        master = ctl.transitions[0]
        assert [s.step for s in master.steps] == ["commit", "addresses"]
        assert master.done is not None

    asyncio.run(main())
