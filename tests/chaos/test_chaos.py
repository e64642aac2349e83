"""A short seeded chaos campaign (see campaign.py): every cycle ends with nothing leaked and every
session RELEASED or FAILED. CHAOS_CYCLES and CHAOS_SEED change its length and seed; `scripts/chaos`
runs long campaigns; `-m "not chaos"` leaves it out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .campaign import run

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

CYCLES = int(os.environ.get("CHAOS_CYCLES", "30"))
SEED = int(os.environ.get("CHAOS_SEED", "1204"))
GRACE = 3.0


def test_a_seeded_campaign_of_faults_leaves_nothing_behind(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = run(CYCLES, SEED, GRACE, tmp_path, lines.append)
    print("\n".join(lines))
    assert len(summary.results) == CYCLES
    assert (summary.leaks, summary.errors) == (0, 0), "\n".join(lines)
