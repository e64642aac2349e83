"""Fixtures of the end-to-end tests: the compose demo profile on a real Docker engine.

The image is built (or reused) once per run, and one demo topology, on its own compose project and
subnets, serves the module; it is removed at the end, also when a test fails. Without a usable Docker
engine the tests are skipped, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .topology import Demo, build_image, docker_problem

_HERE = Path(__file__).parent
# Short enough for the fault tests, long enough for an appliance restart to come back within it.
PEER_GRACE = 15.0
_why_not: str | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    global _why_not
    ours = [item for item in items if _HERE in Path(str(item.path)).parents]
    if not ours:
        return
    for item in ours:
        item.add_marker(pytest.mark.e2e)
    _why_not = docker_problem()
    if _why_not is None or os.environ.get("CI"):
        return  # in CI a missing prerequisite fails (in the fixture below) instead of skipping
    skip = pytest.mark.skip(reason=f"e2e tests skipped: {_why_not}")
    for item in ours:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def image() -> str:
    if _why_not is not None:
        pytest.fail(f"e2e tests cannot run in CI: {_why_not}")
    return build_image()


@pytest.fixture(scope="module")
def demo(image: str) -> Iterator[Demo]:
    topology = Demo(project="scistream-e2e", net="10.202", peer_grace=PEER_GRACE)
    topology.down()  # a run killed before its teardown may have left this project behind
    try:
        topology.up()
        yield topology
    finally:
        topology.down()
        assert topology.leftovers() == [], "the e2e teardown left Docker objects behind"
