"""Fixtures of the integration tests: two facilities in network namespaces, an appliance in each.

`topology` gives fresh namespaces per test; `appliance_a` (producer side, facility A) and `appliance_b`
(consumer side, facility B) are started together and stopped with SIGTERM at teardown. Everything a test
started is killed and the namespaces deleted even when the test fails; a session-end sweep removes any
namespace of this run that is still there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .topology import (
    Appliance,
    ApplianceFactory,
    Facility,
    Topology,
    create_topology,
    destroy_topology,
    have_tools,
    sweep,
)

_HERE = Path(__file__).parent
_why_not: str | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips this package where it cannot run (not root, no `ip netns` or iperf3), except in CI."""
    global _why_not
    ours = [item for item in items if _HERE in Path(str(item.path)).parents]
    if not ours:
        return
    _why_not = have_tools()
    if _why_not is None:
        return
    if os.environ.get("CI"):
        return  # CI has everything installed: a missing prerequisite must fail, not skip (see below)
    skip = pytest.mark.skip(reason=f"integration tests skipped: {_why_not}")
    for item in ours:
        item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _namespace_sweep() -> Iterator[None]:
    if _why_not is not None:
        if os.environ.get("CI"):
            pytest.fail(f"integration tests cannot run in CI: {_why_not}")
        yield
        return
    sweep(stale_runs=True)  # leftovers of runs that were killed before their own sweep
    yield
    sweep()


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    topo = create_topology(tmp_path)
    try:
        yield topo
    finally:
        destroy_topology(topo)


@pytest.fixture
def facility_a(topology: Topology) -> Facility:
    return topology.a


@pytest.fixture
def facility_b(topology: Topology) -> Facility:
    return topology.b


@pytest.fixture
def appliance_factory(topology: Topology) -> Iterator[ApplianceFactory]:
    """`appliance_factory(facility, ..., port_range=...)` starts appliances (for unusual settings)."""
    factory = ApplianceFactory()
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def appliances(topology: Topology, appliance_factory: ApplianceFactory) -> tuple[Appliance, Appliance]:
    a, b = appliance_factory(topology.a, topology.b)
    return a, b


@pytest.fixture
def appliance_a(appliances: tuple[Appliance, Appliance]) -> Appliance:
    """The producer-side appliance, in facility A."""
    return appliances[0]


@pytest.fixture
def appliance_b(appliances: tuple[Appliance, Appliance]) -> Appliance:
    """The consumer-side appliance, in facility B."""
    return appliances[1]
