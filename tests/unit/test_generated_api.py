"""The committed generated code under appliance/api matches what proto/ generates."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_api_matches_the_protos(tmp_path: Path) -> None:
    out = tmp_path / "api"
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto"), str(out)],
        check=True,
        capture_output=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    generated, committed = _files(out), _files(ROOT / "appliance" / "api")
    assert generated.keys() == committed.keys()
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"appliance/api is stale; run scripts/gen-proto: {stale}"
