"""Fixtures and gating for the root-only ``linux`` tests (network namespaces).

Every test collected under this directory gets the ``linux`` marker. Such a
test is skipped with "needs root and network namespaces: <why>" when the host
cannot run it (not root, ``ip``/``nft``/``conntrack``/``sysctl`` missing, or a
namespace with conntrack cannot be created), except when ``CI=true``: CI must
run these tests, so there the missing capability is a test error.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.linux.agents import Cluster
from tests.linux.netns import (
    CT_ENABLE_RULESET,
    Namespace,
    NamespaceFactory,
    Topology,
    build_router_topology,
    install_sigterm_handler,
)

_HERE = Path(__file__).parent
_TOOLS = ("ip", "nft", "conntrack", "sysctl")

install_sigterm_handler()


@functools.cache
def capability_problem() -> str | None:
    """Why linux tests cannot run here, or None. Probed once per session."""
    if sys.platform != "linux":
        return f"platform is {sys.platform}, not linux"
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()})"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    try:
        with Namespace.create("probe") as ns:
            ns.nft(CT_ENABLE_RULESET)
            ns.conntrack("-L")
    except Exception as exc:
        return f"cannot create a network namespace with conntrack: {exc}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.linux)


def require_capability(problem: str | None, *, ci: bool) -> None:
    """Skip (or, on CI, fail) the current test if *problem* is set."""
    if problem is None:
        return
    reason = f"needs root and network namespaces: {problem}"
    if ci:
        pytest.fail(f"{reason} (CI=true: linux tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("linux") is not None:
        require_capability(capability_problem(), ci=os.environ.get("CI") == "true")


@pytest.fixture
def netns_factory() -> Iterator[NamespaceFactory]:
    """Creates :class:`Namespace` objects (one random tag per test); all closed at teardown."""
    with NamespaceFactory() as factory:
        yield factory


@pytest.fixture
def make_cluster(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(n, **kw)``: a :class:`Cluster` of *n* firewalls (not started); the
    agents' logs are printed at teardown (shown on failure). The factory stops them."""
    clusters: list[Cluster] = []

    def make(count: int, **kwargs: Any) -> Cluster:
        cluster = Cluster(netns_factory, tmp_path, count, **kwargs)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        for node_id in cluster.nodes:
            print(cluster.output(node_id)[-20_000:])


@pytest.fixture
def ct_netns(netns_factory: NamespaceFactory) -> Namespace:
    """One namespace with conntrack active and ``nf_conntrack_events=1`` (if settable)."""
    ns = netns_factory.create("ct")
    ns.nft(CT_ENABLE_RULESET)
    ns.sysctl("net.netfilter.nf_conntrack_events", 1, check=False)
    return ns


@pytest.fixture
def router_topology(netns_factory: NamespaceFactory) -> Topology:
    """client -- fw -- server (see ``netns.build_router_topology``); no programs started."""
    return build_router_topology(netns_factory)
