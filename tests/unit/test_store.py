"""The SQLite session store: durable records, secrets kept 0600 and dropped when a session ends."""

import os
import stat
from pathlib import Path

from appliance.sessions.model import Address, Mode, Protocol, Session, Side, State
from appliance.sessions.store import PendingLeave, SessionSecrets, SessionStore


def _session(session_id: str = "s1") -> Session:
    return Session(
        session_id,
        Side.PRODUCER,
        Mode.QUIC,
        Protocol.UDP,
        owner="alice",
        destinations=(Address("10.0.0.1", 5000), Address("fd00::1", 6000)),
        data_endpoints=(Address("198.18.0.1", 5100),),
        created_at=1_700_000_000.0,
    )


SECRETS = SessionSecrets(secret=b"\x01" * 32, cert_pem=b"cert", key_pem=b"key", server_name="s1.session")


def test_record_round_trips(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "db")
    store.put(_session(), SECRETS)
    assert store.get("s1") == _session()
    assert store.secrets("s1") == SECRETS


def test_records_survive_reopening(tmp_path: Path) -> None:
    SessionStore(tmp_path / "db").put(_session(), SECRETS)
    assert SessionStore(tmp_path / "db").get("s1") == _session()


def test_database_file_is_private(tmp_path: Path) -> None:
    SessionStore(tmp_path / "db")
    assert stat.S_IMODE((tmp_path / "db").stat().st_mode) == 0o600


def test_secrets_are_deleted_when_the_session_ends(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "db")
    store.put(_session(), SECRETS)
    store.put(_session().transition(State.RELEASED))
    assert store.secrets("s1") is None
    assert store.get("s1") is not None and store.get("s1").state is State.RELEASED  # type: ignore[union-attr]


def test_ended_records_are_purged_after_retention(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "db")
    ended = _session("old").transition(State.FAILED)
    store.put(ended)
    store.put(_session("live"))
    assert store.purge_ended(before=ended.ended_at + 1) == 1
    assert [s.session_id for s in store.all()] == ["live"]


def test_unknown_session_is_none(tmp_path: Path) -> None:
    assert SessionStore(tmp_path / "db").get("nope") is None


def test_secrets_of_an_ended_session_are_gone_from_the_database_and_its_wal(tmp_path: Path) -> None:
    """An attacker who reads the state directory after a release finds no secret: not in the table,
    not in a free page, not in the write-ahead log."""
    secret = os.urandom(32)
    key = b"-----BEGIN PRIVATE KEY-----" + os.urandom(24).hex().encode()
    store = SessionStore(tmp_path / "sessions.db")
    store.put(_session(), SessionSecrets(secret=secret, cert_pem=b"cert", key_pem=key, server_name="s1"))
    store.put(_session().transition(State.RELEASED))
    files = [p for p in tmp_path.iterdir() if p.name.startswith("sessions.db")]
    assert files
    for path in files:
        raw = path.read_bytes()
        for needle in (secret, secret.hex().encode(), key, key.hex().encode()):
            assert needle not in raw, f"a secret of the released session is still in {path.name}"
    store.close()


def test_an_undelivered_leave_survives_reopening_until_dropped(tmp_path: Path) -> None:
    leave = PendingLeave("s1", "198.18.0.2:5000", "ab" * 32, "peer-1", b"\x02" * 32, "released", 1e10)
    SessionStore(tmp_path / "db").put_leave(leave)
    store = SessionStore(tmp_path / "db")
    assert store.leaves() == [leave]
    store.drop_leave("s1")
    assert store.leaves() == []


def test_the_secret_of_a_dropped_leave_is_gone_from_the_database_and_its_wal(tmp_path: Path) -> None:
    secret = os.urandom(32)
    store = SessionStore(tmp_path / "sessions.db")
    store.put_leave(PendingLeave("s1", "198.18.0.2:5000", "ab" * 32, "peer-1", secret, "released", 1e10))
    store.drop_leave("s1")
    for path in (p for p in tmp_path.iterdir() if p.name.startswith("sessions.db")):
        raw = path.read_bytes()
        assert secret not in raw and secret.hex().encode() not in raw, path.name
    store.close()
