"""The dependency spec that requirements/*.lock were compiled from, as one digest.

scripts/lock writes `# pyproject-digest: <sha256>` into each lock file; `check` recomputes the digest from
pyproject.toml and fails when a lock was compiled from other dependencies (a stale lock). Offline and
stdlib-only on purpose: scripts/bootstrap runs it with the host's python3 before any virtual environment
exists, and re-resolving (the other way to detect staleness) needs the index.

Usage: python3 scripts/lockspec.py digest | check [LOCK...]
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = (ROOT / "requirements" / "runtime.lock", ROOT / "requirements" / "dev.lock")
MARK = "# pyproject-digest: "


def _canonical(requirement: str) -> str:
    # Whitespace and order carry no meaning in a requirement list; reformatting must not stale the lock.
    return re.sub(r"\s+", "", requirement)


def digest(pyproject: Path = ROOT / "pyproject.toml") -> str:
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    spec = {
        "requires-python": project.get("requires-python", ""),
        "build-system": sorted(_canonical(r) for r in data.get("build-system", {}).get("requires", [])),
        "dependencies": sorted(_canonical(r) for r in project.get("dependencies", [])),
        "optional-dependencies": {
            extra: sorted(_canonical(r) for r in reqs)
            for extra, reqs in sorted(project.get("optional-dependencies", {}).items())
        },
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def recorded(lock: Path) -> str | None:
    """The digest a lock file says it was compiled from, or None when it records none."""
    for line in lock.read_text().splitlines():
        if line.startswith(MARK):
            return line[len(MARK) :].strip()
    return None


def stale(locks: tuple[Path, ...] = LOCKS, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """One line per lock that does not match pyproject.toml; empty when all are current."""
    want = digest(pyproject)
    problems = []
    for lock in locks:
        name = lock.relative_to(ROOT) if lock.is_relative_to(ROOT) else lock
        if not lock.is_file():
            problems.append(f"{name} is missing")
        elif recorded(lock) != want:
            problems.append(f"{name} was not compiled from pyproject.toml's dependencies")
    return problems


def main(argv: list[str]) -> int:
    if argv[:1] == ["digest"] and len(argv) == 1:
        print(digest())
        return 0
    if argv[:1] == ["check"]:
        locks = tuple(Path(a).resolve() for a in argv[1:]) or LOCKS
        problems = stale(locks)
        for problem in problems:
            print(f"stale lock: {problem}; run scripts/lock", file=sys.stderr)
        return 1 if problems else 0
    print(__doc__.strip().splitlines()[-1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
