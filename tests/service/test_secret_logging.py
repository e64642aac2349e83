"""No token or secret in the appliance's log at any level: `--log-level debug` included, where the
HTTP/2 libraries would otherwise print every header they encode and decode (`authorization` too)."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.auth import add_token
from tests.authserver import AuthServer

from .conftest import free_port_block

SCISTREAM = Path(sys.executable).parent / "scistream"


def _env(token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_")}
    if token:
        env["SCISTREAM_TOKEN"] = token
    return env


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_a_bearer_token_never_appears_in_a_debug_log(tmp_path: Path, log_format: str) -> None:
    base = free_port_block(3)
    tokens_file = tmp_path / "tokens.yaml"
    token = add_token(tokens_file, "alice", ["admin"])
    log_file = tmp_path / "server.log"
    address = f"127.0.0.1:{base}"
    with log_file.open("wb") as out:
        server = subprocess.Popen(
            [SCISTREAM, "server", "--listen", address, "--advertise", "127.0.0.1",
             "--state-dir", tmp_path / "state", "--auth", "tokens", "--tokens-file", tokens_file,
             "--port-range", f"{base + 1}-{base + 2}", "--log-level", "debug", "--log-format", log_format],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
        )  # fmt: skip
    try:
        ca = tmp_path / "state" / "tls" / "control.crt"
        client = [SCISTREAM, "ls", "--server", address, "--ca", ca]
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log_file.read_text(errors="replace")
            if ca.is_file():
                done = subprocess.run(client, capture_output=True, text=True, env=_env(token), timeout=30)
                if done.returncode == 0:
                    break
            assert time.monotonic() < deadline, f"no answer: {done.stderr}\n{log_file.read_text()}"
            time.sleep(0.2)
        # A wrong token too: refusals must not quote what they refused.
        wrong = token[:-4] + "AAAA"
        subprocess.run(client, capture_output=True, env=_env(wrong), timeout=30)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=15)
    text = log_file.read_text(errors="replace")
    assert "debug" in text.lower(), "the appliance did not log at debug level"
    secret_part = token.split("_", 1)[-1]
    for needle in (token, secret_part, wrong, wrong.split("_", 1)[-1]):
        assert needle not in text, "a bearer token is in the appliance's log"


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_introspection_never_logs_the_client_secret_or_a_token(tmp_path: Path, log_format: str) -> None:
    """`--auth introspection` at debug level: the client secret (also as the HTTP basic credentials
    it travels in) and the users' tokens stay out of the log, accepted or refused."""
    auth_server = AuthServer()
    appliance_client = auth_server.register("appliance", resource_server=True)
    auth_server.register("alice-app", scope="scistream", subject="alice", audience="appliance")
    auth_server.start()
    token = auth_server.issue("alice-app", "scistream")
    revoked = auth_server.issue("alice-app", "scistream")
    auth_server.revoke("alice-app", revoked)
    secret = appliance_client.client_secret
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(secret + "\n")
    os.chmod(secret_file, 0o600)
    base = free_port_block(3)
    log_file = tmp_path / "server.log"
    address = f"127.0.0.1:{base}"
    with log_file.open("wb") as out:
        server = subprocess.Popen(
            [SCISTREAM, "server", "--listen", address, "--advertise", "127.0.0.1",
             "--state-dir", tmp_path / "state", "--auth", "introspection",
             "--introspection-endpoint", auth_server.introspection_endpoint,
             "--introspection-client-id", "appliance", "--introspection-client-secret-file", secret_file,
             "--introspection-scope", "scistream",
             "--port-range", f"{base + 1}-{base + 2}", "--log-level", "debug", "--log-format", log_format],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
        )  # fmt: skip
    try:
        ca = tmp_path / "state" / "tls" / "control.crt"
        client = [SCISTREAM, "ls", "--server", address, "--ca", ca]
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log_file.read_text(errors="replace")
            if ca.is_file():
                done = subprocess.run(client, capture_output=True, text=True, env=_env(token), timeout=30)
                if done.returncode == 0:
                    break
            assert time.monotonic() < deadline, f"no answer: {done.stderr}\n{log_file.read_text()}"
            time.sleep(0.2)
        for refused in (revoked, token[:-4] + "AAAA"):
            done = subprocess.run(client, capture_output=True, text=True, env=_env(refused), timeout=30)
            assert done.returncode != 0 and "not active" in done.stderr, done.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=15)
        auth_server.stop()
    text = log_file.read_text(errors="replace")
    assert "token introspected" in text, "the appliance did not log at debug level"
    basic = base64.b64encode(f"appliance:{secret}".encode()).decode()
    for needle in (secret, basic, basic.rstrip("="), token, revoked, token[:-4]):
        assert needle not in text, "a secret or token is in the appliance's log"
