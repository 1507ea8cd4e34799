"""The failover controller: runs :func:`ctsync.core.failover.plan` for the agent.

Whoever decides the role (the VRRP speaker, keepalived's FIFO, ``ctsync failover``) calls
:meth:`FailoverController.set_role`. Transitions run one at a time, in order; a request
that is superseded while it waits is skipped (the latest role wins: keepalived's notify
scripts may run concurrently and finish out of order). Each step is timed and logged, and
the last transitions are kept for ``ctsync show status``.

With ctsync's VRRP speaker the MASTER plan is split at the ADDRESSES step: the speaker
awaits :meth:`before_addresses` (commit, bounded by ``failover.commit-wait``), adds the
addresses and sends GARP/NA, and the rest of the plan runs after that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ctsync.core.failover import Role, Step, plan

log = logging.getLogger("ctsync.failover")

HISTORY = 10
ADDRESSES_WAIT = 5.0  # seconds; adding addresses and sending GARPs takes milliseconds


class Operations(Protocol):
    """What the steps do, provided by the agent."""

    async def commit(self) -> dict[str, Any]: ...
    def adopt(self) -> dict[str, Any]: ...
    def flush_external(self) -> dict[str, Any]: ...
    async def resync_kernel(self) -> dict[str, Any]: ...
    def bulk_send(self) -> dict[str, Any]: ...
    def request_resync(self) -> dict[str, Any]: ...
    async def purge(self, timeout: int) -> dict[str, Any]: ...


@dataclass
class StepRecord:
    step: str
    started: float  # unix time
    seconds: float | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Transition:
    at: float  # unix time of the request
    old: str | None
    new: str
    reason: str
    planned: list[Step] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    done: float | None = None
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["planned"] = [str(step) for step in self.planned]
        data["from"] = data.pop("old")
        data["to"] = data.pop("new")
        return data


class FailoverController:
    def __init__(
        self,
        ops: Operations,
        *,
        mechanism: str,
        speaker: bool,
        inject: bool,
        purge_timeout: int,
        commit_wait: float,
    ) -> None:
        self.ops = ops
        self.mechanism = mechanism
        self.speaker = speaker
        self.inject = inject
        self.purge_timeout = purge_timeout
        self.commit_wait = commit_wait
        self.role: Role | None = None
        self.transitions: deque[Transition] = deque(maxlen=HISTORY)
        self.transition_counts: Counter[str] = Counter()  # by new role, for the metrics
        self._lock = asyncio.Lock()
        self._latest = 0  # number of the newest request; older waiting ones are skipped
        self._wanted: Role | None = None  # the role of the newest request
        self._pending_post: asyncio.Task[None] | None = None
        self._addresses_done = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- entry points ---------------------------------------------------------------------

    async def set_role(self, role: Role, reason: str) -> Transition:
        """Move to ``role``: run its plan to the end (also the part after the addresses)."""
        self._latest += 1
        self._wanted = role
        ticket = self._latest
        transition = Transition(time.time(), None, role.value, reason)
        async with self._lock:
            if ticket != self._latest:
                transition.skipped = True
                transition.done = time.time()
                log.info("failover: %s (%s) superseded by a newer request", role, reason)
                return transition
            await self._run(transition, role, split=False)
        return transition

    def request_role(self, role: Role, reason: str) -> None:
        """Fire-and-forget :meth:`set_role` (the FIFO reader and the speaker's callback)."""
        task = asyncio.get_running_loop().create_task(self.set_role(role, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def before_addresses(self, reason: str = "VRRP") -> None:
        """The VRRP speaker is MASTER and about to add its addresses: commit first.

        Returns when the steps before ADDRESSES are done (or ``commit-wait`` ran out); the
        steps after it run once the speaker has had the loop to add the addresses.
        """
        self._latest += 1
        self._wanted = Role.MASTER
        transition = Transition(time.time(), None, Role.MASTER.value, reason)
        await self._lock.acquire()
        try:
            await self._run(transition, Role.MASTER, split=True)
        except BaseException:
            self._lock.release()
            raise
        if Step.ADDRESSES not in transition.planned:
            self._lock.release()  # already MASTER (a BACKUP request not run yet): no steps
            return
        # The lock stays held until the post-address steps are done.
        self._addresses_done.clear()
        self._pending_post = asyncio.get_running_loop().create_task(self._post(transition))

    def addresses_done(self, added: bool) -> None:
        """The speaker added and announced the addresses (or, no longer master, did not)."""
        self._addresses_done.set()

    async def close(self) -> None:
        tasks = list(self._tasks)
        if self._pending_post is not None:
            tasks.append(self._pending_post)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- execution --------------------------------------------------------------------------

    async def _run(self, transition: Transition, role: Role, *, split: bool) -> None:
        old = self.role
        transition.old = None if old is None else old.value
        steps = plan(
            old, role, speaker=self.speaker, inject=self.inject, purge=self.purge_timeout > 0
        )
        self.transitions.append(transition)
        self.transition_counts[role.value] += 1
        self.role = role
        log.info(
            "failover: %s -> %s (%s): %s",
            old or "start",
            role,
            transition.reason,
            ", ".join(steps) or "nothing to do",
        )
        transition.planned = list(steps)
        for step in steps:
            if step is Step.ADDRESSES:
                if split:
                    return  # the speaker takes the addresses now; _post does the rest
                continue
            await self._step(transition, step)
        self._finish(transition)

    async def _post(self, transition: Transition) -> None:
        try:
            # The speaker adds its addresses once before_addresses() has returned.
            record = StepRecord(Step.ADDRESSES.value, time.time())
            transition.steps.append(record)
            started = time.monotonic()
            try:
                async with asyncio.timeout(ADDRESSES_WAIT):  # not wait_for: see Agent._timer
                    await self._addresses_done.wait()
            except TimeoutError:
                record.error = f"the speaker did not report within {ADDRESSES_WAIT:.0f}s"
            record.seconds = time.monotonic() - started
            planned = transition.planned
            rest = planned[planned.index(Step.ADDRESSES) + 1 :]
            for step in rest:
                if self._wanted is not Role.MASTER:
                    break  # leaving MASTER again: the newer request takes over
                await self._step(transition, step)
            self._finish(transition)
        finally:
            self._pending_post = None
            self._lock.release()

    def _finish(self, transition: Transition) -> None:
        transition.done = time.time()
        log.info(
            "failover: %s done in %.3fs (%s)",
            transition.new,
            transition.done - transition.at,
            ", ".join(f"{s.step} {s.seconds or 0:.3f}s" for s in transition.steps) or "-",
        )

    async def _step(self, transition: Transition, step: Step) -> None:
        record = StepRecord(step.value, time.time())
        transition.steps.append(record)
        started = time.monotonic()
        try:
            record.result = await self._do(step)
        except Exception as exc:  # one failed step must not stop the others
            record.error = str(exc) or type(exc).__name__
            log.error("failover step %s failed: %s", step, record.error)
        record.seconds = time.monotonic() - started

    async def _do(self, step: Step) -> dict[str, Any]:
        ops = self.ops
        if step is Step.COMMIT:
            return await self._bounded_commit()
        if step is Step.ADOPT:
            return ops.adopt()
        if step is Step.FLUSH_EXTERNAL:
            return ops.flush_external()
        if step is Step.RESYNC_KERNEL:
            return await ops.resync_kernel()
        if step is Step.BULK_SEND:
            return ops.bulk_send()
        if step is Step.REQUEST_RESYNC:
            return ops.request_resync()
        if step is Step.PURGE:
            return await ops.purge(self.purge_timeout)
        raise AssertionError(step)

    async def _bounded_commit(self) -> dict[str, Any]:
        """The commit, but never more than ``commit-wait``: past it the node takes the
        addresses anyway (forwarding with part of the state beats not forwarding) and the
        commit goes on in the background."""
        task = asyncio.get_running_loop().create_task(self.ops.commit())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            async with asyncio.timeout(self.commit_wait):  # not wait_for: see Agent._timer
                return await asyncio.shield(task)
        except TimeoutError:
            log.warning(
                "failover: commit still running after commit-wait %.1fs; taking over anyway",
                self.commit_wait,
            )
            return {"timed_out": True}

    # --- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "state": None if self.role is None else self.role.value,
            "transitions": [t.to_dict() for t in self.transitions],
        }
