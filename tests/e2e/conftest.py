"""Gating and fixtures of the ``e2e`` tests: the docker-compose cluster.

Every test collected under this directory gets the ``e2e`` marker. Such a test is skipped
with "needs Docker: <why>" when the host cannot run the cluster (no docker CLI, no daemon,
no compose, no way to build the base image), except when ``CI=true``: CI must run these
tests (``.ci/run`` installs docker.io, docker-compose and debootstrap and starts dockerd),
so there a missing capability is a test error.

The ``cluster`` fixture builds the image (``deploy/docker/build-image.sh``: cached, no
registry), brings up a compose project with a unique name, fw1 first so that it is the
master, and runs ``down -v`` at teardown whatever happened (also on SIGTERM).
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from tests.e2e.compose import (
    ComposeCluster,
    build_image,
    compose_command,
    docker_problem,
    other_clusters,
    wait_until,
)

_HERE = Path(__file__).parent


def _sigterm_to_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if threading.current_thread() is threading.main_thread() and (
    signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
):
    # A killed run still reaches the fixtures' teardown (docker-compose down -v).
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)


@functools.cache
def capability_problem() -> str | None:
    return docker_problem()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("e2e") is None:
        return
    problem = capability_problem()
    if problem is None:
        return
    reason = f"needs Docker: {problem}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: e2e tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def image() -> str:
    """The ctsync image, built from this checkout (layers cached between runs)."""
    tag = os.environ.get("CTSYNC_IMAGE", "ctsync:local")
    seconds = build_image(tag)
    print(f"image {tag} built in {seconds:.1f}s")
    return tag


@pytest.fixture(scope="module")
def cluster(image: str) -> Iterator[ComposeCluster]:
    """The compose cluster, fw1 MASTER and fw2 BACKUP; removed at teardown."""
    busy = other_clusters()
    assert not busy, (
        f"another ctsync compose cluster holds the subnets: {busy}"
        f" (remove it with: {' '.join(compose_command() or ('docker-compose',))}"
        f" -p {busy[0]} down -v)"
    )
    project = f"ctsync-e2e-{os.getpid()}-{secrets.token_hex(3)}"
    cluster = ComposeCluster(project, image)
    started = time.monotonic()
    try:
        # fw1 alone first: it becomes master; fw2 (depends_on fw1) then joins as backup.
        cluster.up("fw1", "server")
        wait_until(
            lambda: cluster.role("fw1") == "MASTER",
            30,
            "fw1 to become MASTER",
            describe=lambda: cluster.logs("fw1", tail=40),
        )
        cluster.up()
        wait_until(
            lambda: cluster.role("fw2") == "BACKUP",
            30,
            "fw2 to come up as BACKUP",
            describe=lambda: cluster.logs("fw2", tail=60),
        )
        print(f"cluster {project} up in {time.monotonic() - started:.1f}s")
        yield cluster
    finally:
        for service in ("fw1", "fw2", "client", "server"):
            try:
                print(f"--- {service} (last lines) ---\n{cluster.logs(service, tail=60)}")
            except Exception as exc:
                print(f"--- {service}: no logs ({exc})")
        cluster.down()
