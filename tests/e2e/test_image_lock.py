"""The appliance image holds exactly the Python packages of requirements/runtime.lock (plus the project):
images/build makes the wheelhouse from the lock and the Dockerfile installs it with --require-hashes."""

from __future__ import annotations

import json
import re

import docker
import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from .topology import IMAGE, ROOT

pytestmark = pytest.mark.e2e
LIST = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
)


def _locked_for_linux() -> dict[str, str]:
    pins: dict[str, str] = {}
    environment = {
        "sys_platform": "linux",
        "platform_python_implementation": "CPython",
        "implementation_name": "cpython",
    }
    for line in (ROOT / "requirements" / "runtime.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if match and (match[3] is None or Marker(match[3]).evaluate(environment)):
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_the_image_holds_the_locked_packages_and_nothing_else(image: str) -> None:
    out = docker.from_env().containers.run(
        IMAGE, ["/opt/scistream/bin/python", "-c", LIST], entrypoint=[], remove=True
    )
    installed: dict[str, str] = {canonicalize_name(k): v for k, v in json.loads(out).items()}
    assert installed.pop("scistream") == "0.1.0"
    assert installed == _locked_for_linux()
    assert "docker" not in installed
