"""The status page's parts without I/O: throughput from counters, the rows it shows, the page itself."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import replace
from importlib import resources

import pytest

from appliance.auth import Principal
from appliance.sessions.model import Mode, Protocol, Session, Side, State
from appliance.statuspage.app import load_page
from appliance.statuspage.history import Rate, ThroughputHistory
from appliance.statuspage.view import snapshot

T0 = 1_000_000.0


def session(session_id: str = "s1", bytes_in: int = 0, bytes_out: int = 0, **fields: object) -> Session:
    base = Session(session_id, Side.CONSUMER, Mode.QUIC, Protocol.TCP, owner="alice", created_at=T0 - 100)
    return replace(base, bytes_in=bytes_in, bytes_out=bytes_out, **fields)  # type: ignore[arg-type]


def test_a_rate_is_the_counter_difference_over_the_time_between_observations() -> None:
    history = ThroughputHistory()
    history.observe(T0, [session(bytes_in=1000, bytes_out=0)])
    history.observe(T0 + 2, [session(bytes_in=3000, bytes_out=500)])

    assert history.rates("s1") == [Rate(T0 + 2, 8000.0, 2000.0)]


def test_a_session_seen_once_before_it_was_created_has_no_rate_yet() -> None:
    history = ThroughputHistory()
    history.observe(T0, [session(bytes_in=5000)])  # the first observation: when did 5000 bytes pass?
    assert history.rates("s1") == []


def test_a_session_created_between_observations_counts_from_its_creation() -> None:
    history = ThroughputHistory()
    history.observe(T0, [])
    history.observe(T0 + 1, [session(bytes_in=1000, created_at=T0 + 0.5)])

    assert history.rates("s1") == [Rate(T0 + 1, 16000.0, 0.0)]


def test_counters_that_start_again_from_zero_give_zero_not_a_negative_rate() -> None:
    history = ThroughputHistory()
    history.observe(T0, [session(bytes_in=10_000, bytes_out=10_000)])
    history.observe(T0 + 1, [session(bytes_in=100, bytes_out=20_000)])

    assert history.rates("s1") == [Rate(T0 + 1, 0.0, 80_000.0)]


def test_a_clock_that_steps_back_adds_no_point() -> None:
    history = ThroughputHistory()
    history.observe(T0, [session(bytes_in=0)])
    history.observe(T0 - 5, [session(bytes_in=1000)])
    history.observe(T0, [session(bytes_in=1000)])

    assert history.rates("s1") == []


def test_only_the_last_points_are_kept() -> None:
    history = ThroughputHistory(points=3)
    for i in range(6):
        history.observe(T0 + i, [session(bytes_in=i * 125)])

    assert [r.at for r in history.rates("s1")] == [T0 + 3, T0 + 4, T0 + 5]
    assert {r.bps_in for r in history.rates("s1")} == {1000.0}


def test_a_session_no_longer_observed_is_forgotten() -> None:
    history = ThroughputHistory()
    history.observe(T0, [session("s1"), session("s2")])
    history.observe(T0 + 1, [session("s1", bytes_in=1), session("s2", bytes_in=1)])
    history.observe(T0 + 2, [session("s1", bytes_in=2)])

    assert len(history) == 1
    assert history.rates("s2") == []
    assert len(history.rates("s1")) == 2


def test_a_history_needs_at_least_one_point() -> None:
    with pytest.raises(ValueError):
        ThroughputHistory(points=0)


def test_the_page_data_holds_live_sessions_with_their_latest_rate() -> None:
    history = ThroughputHistory()
    live = session("live", expires_at=T0 + 3600)
    ended = session("gone", state=State.RELEASED)
    history.observe(T0, [live, ended])
    history.observe(T0 + 1, [replace(live, bytes_out=1250)])

    data = snapshot(Principal("alice"), [replace(live, bytes_out=1250), ended], history, T0 + 1)

    assert data["subject"] == "alice"
    assert [row["session_id"] for row in data["sessions"]] == ["live"]
    row = data["sessions"][0]
    assert (row["bps_in"], row["bps_out"]) == (0.0, 10_000.0)
    assert row["throughput"] == [[T0 + 1, 0, 10_000]]
    assert (row["created_at"], row["expires_at"]) == (T0 - 100, T0 + 3600)


def test_the_pages_policy_allows_exactly_its_own_inline_script_and_style() -> None:
    html, policy = load_page()
    text = html.decode()
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        (block,) = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}';" in policy


def test_the_token_field_is_never_submitted_with_a_form() -> None:
    text = resources.files("appliance.statuspage").joinpath("page.html").read_text()
    (field,) = re.findall(r"<input[^>]*>", text)
    assert 'type="password"' in field
    assert "name=" not in field  # an unnamed input is never part of a submitted form
    assert 'method="post"' in re.findall(r"<form[^>]*>", text)[0]
