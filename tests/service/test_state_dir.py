"""The state directory belongs to one appliance at a time and to its user alone."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.errors import FailedPrecondition

from .conftest import Facility, echo_through, free_port_block, open_session, start_facility

BIN = Path(sys.executable).parent


@pytest.fixture
async def first(tmp_path: Path) -> AsyncIterator[Facility]:
    facility = await start_facility(tmp_path, "shared")
    try:
        yield facility
    finally:
        await facility.appliance.stop()


def _second(command: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    """Another appliance on `state_dir`, on ports of its own; killed if it is still running after 30 s."""
    base = free_port_block(4)
    if command == "scistream":
        args = ["server", "--listen", f"127.0.0.1:{base}", "--auth", "none", "--insecure"]
    else:
        args = ["--listener_ip", "127.0.0.1", "--port", str(base), "--ssl", "False"]
    args += ["--port-range", f"{base + 1}-{base + 3}", "--state-dir", str(state_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_")}
    try:
        return subprocess.run(
            [str(BIN / command), *args], capture_output=True, text=True, timeout=30, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"a second appliance on {state_dir} kept running: {exc.stderr!r}") from None


@pytest.mark.parametrize("command", ["scistream", "s2cs"])
async def test_a_second_appliance_on_a_held_state_dir_stops_with_one_line_and_touches_nothing(
    first: Facility, echo_server: str, tmp_path: Path, command: str
) -> None:
    state_dir = tmp_path / "shared"
    created, _ = await open_session((first, first), echo_server)
    files_before = sorted(p.name for p in state_dir.iterdir())

    done = _second(command, state_dir)

    assert done.returncode != 0
    assert done.stderr.count("\n") == 1, done.stderr
    assert "in use by another appliance" in done.stderr and "Traceback" not in done.stderr
    assert str(os.getpid()) in done.stderr  # it names the holder
    assert sorted(p.name for p in state_dir.iterdir()) == files_before
    async with first.client() as client:
        assert (await client.get(created.session.session_id)).state.name == "ACTIVE"
    sessions = [s for s in (await _sessions(first)) if s.state.name == "ACTIVE"]
    assert len(sessions) == 2  # producer and consumer halves, both still ACTIVE
    entry_point = next(s for s in sessions if s.entry_points).entry_points[0]
    assert await echo_through(entry_point, b"still mine") == b"still mine"


async def _sessions(f: Facility) -> list:  # type: ignore[type-arg]
    async with f.client("root") as client:
        return await client.list()


async def test_the_lock_is_released_when_the_appliance_stops(tmp_path: Path) -> None:
    facility = await start_facility(tmp_path, "again")
    await facility.appliance.stop()
    facility = await start_facility(tmp_path, "again")
    await facility.appliance.stop()


async def test_a_pre_created_state_dir_open_to_others_is_made_0700(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    facility = await start_facility(tmp_path, "open")
    try:
        assert (tmp_path / "open").stat().st_mode & 0o777 == 0o700
    finally:
        await facility.appliance.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another user")
async def test_a_state_dir_open_to_others_and_owned_by_another_user_is_refused_untouched(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "theirs"
    state_dir.mkdir()
    os.chmod(state_dir, 0o755)
    os.chown(state_dir, 65534, 65534)
    with pytest.raises(FailedPrecondition, match=r"mode 0755 and belongs to uid 65534"):
        await start_facility(tmp_path, "theirs")
    assert list(state_dir.iterdir()) == []
    assert state_dir.stat().st_mode & 0o777 == 0o755
