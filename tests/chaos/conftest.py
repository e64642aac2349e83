"""The chaos campaign needs what the integration tests need (root, network namespaces, iperf3, nft,
wireguard-go); elsewhere it is skipped with the reason, except in CI, where that fails."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.topology import have_tools, sweep


@pytest.fixture(scope="module", autouse=True)
def _namespaces() -> Iterator[None]:
    why_not = have_tools()
    if why_not is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the chaos campaign cannot run in CI: {why_not}")
        pytest.skip(f"chaos campaign skipped: {why_not}")
    sweep(stale_runs=True)
    yield
    sweep()
