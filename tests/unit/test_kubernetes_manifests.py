"""deploy/kubernetes against the Kubernetes API schemas (kubernetes-validate, which ships them: no cluster
and no network here), and against the appliance itself: its settings parse, the probes reach the port it
serves grpc.health.v1 on, the state and the tokens are mounted where the settings say.

No cluster runs these manifests in the tests; the README says so."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from appliance.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are meant for (native gRPC probes are GA since 1.27) and the newest
# whose schemas kubernetes-validate ships.
VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def _resources() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in _documents() if doc["kind"] != "Kustomization"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "doc"), _resources(), ids=[f"{n}:{d['kind']}" for n, d in _resources()])
def test_each_manifest_is_valid_for_the_kubernetes_api(name: str, doc: dict[str, Any], version: str) -> None:
    # strict: a misspelt or misplaced field is an error, not silently ignored as a cluster would.
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_a_misspelt_field() -> None:
    daemonset = copy.deepcopy(_one("DaemonSet"))
    pod = daemonset["spec"]["template"]["spec"]
    pod["hostNetwrok"] = pod.pop("hostNetwork")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_one("Kustomization")["resources"])
    assert listed == {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}


def _settings(tmp_path: Path) -> Settings:
    config = tmp_path / "scistream.yaml"
    config.write_text(_one("ConfigMap")["data"]["scistream.yaml"])
    return load_settings(config)  # unknown keys and bad values are refused here


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def test_the_daemonset_runs_the_appliance_as_the_settings_say(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (appliance,) = pod["containers"]
    assert "NET_ADMIN" in appliance["securityContext"]["capabilities"]["add"]
    # Native gRPC probes on the plaintext health port the appliance serves.
    assert settings.health_port and settings.health_port != settings.listen_address.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert appliance[probe]["grpc"] == {"port": settings.health_port}, probe
    # State on the node, where the appliance keeps it.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = _mounts(appliance)
    state = volumes[mounts[str(settings.state_dir)]]
    assert state["hostPath"]["path"] == str(settings.state_dir)
    # The settings file is where the image's entrypoint looks for it, from the ConfigMap.
    assert volumes[mounts["/etc/scistream"]]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    # The tokens file: copied from the Secret by the init container into the volume the settings name.
    assert settings.tokens_file is not None
    tokens_dir = str(settings.tokens_file.parent)
    (init,) = pod["initContainers"]
    assert init["command"][-1] == str(settings.tokens_file)
    assert _mounts(init)[tokens_dir] == mounts[tokens_dir]
    secret_dir = str(Path(init["command"][-2]).parent)
    secret = volumes[_mounts(init)[secret_dir]]["secret"]
    assert secret["secretName"] == _one("Secret")["metadata"]["name"]
    assert Path(init["command"][-2]).name in _one("Secret")["stringData"]
    assert init["command"][:7] == ["install", "-o", "10001", "-g", "10001", "-m", "0400"]


def test_the_placeholder_secret_is_a_tokens_file_with_no_token() -> None:
    assert yaml.safe_load(_one("Secret")["stringData"]["tokens.yaml"]) == {"tokens": []}
