"""The lock files (requirements/*.lock, made by scripts/lock) match pyproject.toml and pin what it asks for.

A stale lock fails here, in scripts/bootstrap and in images/build alike: all three use scripts/lockspec.py.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "requirements" / "runtime.lock"
DEV = ROOT / "requirements" / "dev.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def _lockspec() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lockspec", ROOT / "scripts" / "lockspec.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(lock: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if match := _PIN.match(line):
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_locks_were_compiled_from_pyproject() -> None:
    assert _lockspec().stale() == [], "run scripts/lock"
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lockspec.py"), "check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_a_changed_dependency_makes_the_locks_stale(tmp_path: Path) -> None:
    lockspec = _lockspec()
    text = (ROOT / "pyproject.toml").read_text()
    changed = tmp_path / "pyproject.toml"
    changed.write_text(text.replace('"click>=8.1",', '"click>=8.1",\n  "authlib>=1.3",'))
    assert changed.read_text() != text
    problems = lockspec.stale(pyproject=changed)
    assert len(problems) == 2 and all("not compiled from" in p for p in problems)
    # A tightened bound stales it too; it may need another version than the one pinned.
    tightened = tmp_path / "tightened.toml"
    tightened.write_text(text.replace('"click>=8.1"', '"click>=99"'))
    assert len(lockspec.stale(pyproject=tightened)) == 2
    # Layout carries no meaning: other whitespace and order keep the locks current.
    reordered = tmp_path / "reordered.toml"
    reordered.write_text(
        text.replace('  "grpclib>=0.4.7",\n', "").replace(
            '"click>=8.1",', '"click >= 8.1", "grpclib >=0.4.7",'
        )
    )
    assert lockspec.stale(pyproject=reordered) == []


def test_the_check_fails_with_a_message_naming_the_fix(tmp_path: Path) -> None:
    stale = tmp_path / "runtime.lock"
    stale.write_text(RUNTIME.read_text().replace("# pyproject-digest: ", "# pyproject-digest: 0"))
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lockspec.py"), "check", str(stale)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1
    assert "run scripts/lock" in check.stderr and "Traceback" not in check.stderr


@pytest.mark.parametrize("lock", [RUNTIME, DEV], ids=lambda p: p.name)
def test_every_locked_package_is_pinned_with_hashes(lock: Path) -> None:
    # A requirement is `name==version \` followed by its `--hash=sha256:...` lines.
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text().split("\n", 3)[3])
    assert entries
    for entry in entries:
        assert _PIN.match(entry), entry
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"no hash for {entry.splitlines()[0]}"


def test_the_pins_satisfy_pyproject_and_the_image_ships_what_the_tests_run() -> None:
    runtime, dev = _pins(RUNTIME), _pins(DEV)
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    for line in project["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in runtime, f"{name} is not in {RUNTIME.name}"
        assert req.specifier.contains(runtime[name], prereleases=True), (name, runtime[name])
    for line in project["optional-dependencies"]["dev"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert req.specifier.contains(dev[name], prereleases=True), (name, dev[name])
    assert {name: dev.get(name) for name in runtime} == runtime


def test_the_docker_sdk_is_a_test_dependency_only() -> None:
    assert "docker" not in _pins(RUNTIME)
    assert "docker" in _pins(DEV)
    importers = []
    for package in ("appliance", "quic_relay"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                if any(n == "docker" or n.startswith("docker.") for n in names):
                    importers.append(str(path.relative_to(ROOT)))
    assert importers == []
