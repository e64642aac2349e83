"""SQLite store of sessions and their secrets, in the state directory (file mode 0600)."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.sessions.model import Address, Mode, Protocol, Session, Side, State

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    ended_at REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    session_id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leaves (
    session_id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class SessionSecrets:
    """What a session needs to run that must never be shown: the shared secret and data-plane keys."""

    secret: bytes
    cert_pem: bytes
    key_pem: bytes
    server_name: str
    peer_cert_pem: bytes = b""
    data_plane: bytes = b""  # the tunnel's saved_state() (WireGuard: private key, peer, addresses)


@dataclass(frozen=True)
class PendingLeave:
    """A Leave the peer appliance has not answered yet: kept (with the secret that signs it) until it
    does, or until `until` (the session's lease end)."""

    session_id: str  # ours
    peer_address: str
    peer_fingerprint: str
    peer_session_id: str
    secret: bytes
    reason: str
    until: float  # Unix time


def _session_to_json(session: Session) -> str:
    data = dataclasses.asdict(session)
    for name in ("destinations", "entry_points", "data_endpoints"):
        data[name] = [str(a) for a in getattr(session, name)]
    return json.dumps(data)


def _stored_address(text: str) -> Address:
    """An address as we stored it: checked when it came in, so not re-validated (a stricter check in
    a later release must not make old records unreadable)."""
    host, port = text.rsplit(":", 1)
    return Address(host.removeprefix("[").removesuffix("]"), int(port))


def _session_from_json(text: str) -> Session:
    data: dict[str, Any] = json.loads(text)
    for name in ("destinations", "entry_points", "data_endpoints"):
        data[name] = tuple(_stored_address(a) for a in data[name])
    data["state"] = State(data["state"])
    data["side"] = Side(data["side"])
    data["mode"] = Mode(data["mode"])
    data["protocol"] = Protocol(data["protocol"])
    return Session(**data)


def _secrets_to_json(item: SessionSecrets) -> str:
    return json.dumps(
        {k: v.hex() if isinstance(v, bytes) else v for k, v in dataclasses.asdict(item).items()}
    )


def _secrets_from_json(text: str) -> SessionSecrets:
    data = json.loads(text)
    return SessionSecrets(
        secret=bytes.fromhex(data["secret"]),
        cert_pem=bytes.fromhex(data["cert_pem"]),
        key_pem=bytes.fromhex(data["key_pem"]),
        server_name=data["server_name"],
        peer_cert_pem=bytes.fromhex(data["peer_cert_pem"]),
        data_plane=bytes.fromhex(data.get("data_plane", "")),
    )


class SessionStore:
    """Durable session records. Secrets live in their own table and are deleted when a session ends."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Create the file 0600 before SQLite opens it, so secrets are never world-readable.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        # The metrics endpoint reads from its own thread; one lock serializes every use.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Deleted secrets are overwritten with zeros in the database file, not left in a free page.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, session: Session, secrets: SessionSecrets | None = None) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
                (session.session_id, session.state.value, session.ended_at, _session_to_json(session)),
            )
            if secrets is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO secrets VALUES (?, ?)",
                    (session.session_id, _secrets_to_json(secrets)),
                )
            ended = session.ended
            if ended:
                self._db.execute("DELETE FROM secrets WHERE session_id = ?", (session.session_id,))
        if ended:
            self._scrub_log()

    def _scrub_log(self) -> None:
        """Copies the write-ahead log into the database and truncates it: the pages that held a
        deleted secret would otherwise stay readable in `-wal` until SQLite's next checkpoint."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            row = self._db.execute(
                "SELECT record FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            return _session_from_json(row[0]) if row else None

    def secrets(self, session_id: str) -> SessionSecrets | None:
        with self._lock:
            row = self._db.execute(
                "SELECT record FROM secrets WHERE session_id = ?", (session_id,)
            ).fetchone()
            return _secrets_from_json(row[0]) if row else None

    def all(self) -> list[Session]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM sessions ORDER BY rowid").fetchall()
            return [_session_from_json(r[0]) for r in rows]

    def purge_ended(self, before: float) -> int:
        """Deletes records of sessions that ended before `before` (Unix time); returns how many."""
        with self._lock:
            with self._db:
                cursor = self._db.execute(
                    "DELETE FROM sessions WHERE state IN (?, ?) AND ended_at < ?",
                    (State.RELEASED.value, State.FAILED.value, before),
                )
            return cursor.rowcount

    def put_leave(self, leave: PendingLeave) -> None:
        record = {**dataclasses.asdict(leave), "secret": leave.secret.hex()}
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO leaves VALUES (?, ?)", (leave.session_id, json.dumps(record))
            )

    def leaves(self) -> list[PendingLeave]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM leaves ORDER BY rowid").fetchall()
        found = []
        for (text,) in rows:
            data = json.loads(text)
            found.append(PendingLeave(**{**data, "secret": bytes.fromhex(data["secret"])}))
        return found

    def drop_leave(self, session_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM leaves WHERE session_id = ?", (session_id,))
        self._scrub_log()  # a pending Leave holds the session secret that signs it
