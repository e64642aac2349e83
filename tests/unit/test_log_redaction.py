"""Credentials are redacted from log lines, whichever logger wrote them."""

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from appliance.logging import PROTOCOL_LOGGERS, REDACTED, configure_logging, redact

TOKEN = "sst_NLl-mywqfw5O2Vt9l0oIaJyw-Pm9tFogKd0jIqHYcus"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


@pytest.mark.parametrize("text", [TOKEN, f"Bearer {TOKEN}", f"authorization: Bearer {JWT}", JWT])
def test_credentials_are_replaced(text: str) -> None:
    out = redact(f"header ({text!r}) added")
    assert REDACTED in out
    assert TOKEN not in out and JWT not in out


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in (*PROTOCOL_LOGGERS, "hpack.hpack")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


@pytest.mark.usefixtures("restore_logging")
def test_a_third_party_debug_line_with_a_token_is_redacted_or_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("json", "debug")
    logging.getLogger("hpack.hpack").debug("Decoded %s", (b"authorization", f"Bearer {TOKEN}".encode()))
    logging.getLogger("some.library").debug("token=%s", TOKEN)
    assert TOKEN not in stream.getvalue()
    assert REDACTED in stream.getvalue()
    assert logging.getLogger("hpack").getEffectiveLevel() >= logging.INFO
