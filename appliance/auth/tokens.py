"""`--auth tokens`: opaque bearer tokens listed, as SHA-256 hashes, in a YAML file.

The file looks like::

    tokens:
      - sha256: 9f86d081...      # hex sha256 of the token; the token itself is never stored
        subject: alice
        roles: [admin]

Operators add tokens with `add_token` (or by hand); the running appliance picks up changes on the next
call. Other keys in an entry (a note, a date) are allowed and kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import yaml

from appliance.auth.principal import NO_AUTH_SUBJECT, Principal, check_name, parse_authorization
from appliance.auth.watched import WatchedFile
from appliance.errors import InvalidArgument, Unauthenticated

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "sst_"
_SHA256_HEX_LEN = 64
_HEX = frozenset("0123456789abcdef")


def new_token() -> str:
    """A fresh token: 256 bits from the OS CSPRNG, prefixed so leaked tokens are recognisable."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 of `token`, as stored in the tokens file."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    sha256: str
    principal: Principal


def _check_subject(subject: str) -> str:
    check_name("subject", subject)
    if subject == NO_AUTH_SUBJECT:
        raise InvalidArgument(f"subject {NO_AUTH_SUBJECT} is reserved for --auth none")
    return subject


def _raw_entries(path: Path, data: bytes) -> list[Any]:
    """The `tokens` list of a tokens file (empty for an empty file)."""
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{path} is not valid YAML: {exc}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens", []), list):
        raise InvalidArgument(f"{path} must be a mapping with a 'tokens' list")
    entries: list[Any] = doc.get("tokens") or []
    return entries


def _parse_entry(path: Path, index: int, raw: Any) -> TokenEntry:
    where = f"{path}: tokens[{index}]"
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where} must be a mapping")
    digest, subject, roles = raw.get("sha256"), raw.get("subject"), raw.get("roles", [])
    if not isinstance(digest, str) or len(digest) != _SHA256_HEX_LEN or not set(digest) <= _HEX:
        raise InvalidArgument(f"{where}: 'sha256' must be 64 lowercase hex digits")
    if not isinstance(subject, str):
        raise InvalidArgument(f"{where}: 'subject' must be a string")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise InvalidArgument(f"{where}: 'roles' must be a list of strings")
    try:
        principal = Principal(_check_subject(subject), frozenset(check_name("role", r) for r in roles))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from None
    return TokenEntry(digest, principal)


def parse_tokens_file(path: Path, data: bytes) -> tuple[TokenEntry, ...]:
    """The entries of a tokens file; InvalidArgument naming the bad entry otherwise."""
    entries = tuple(_parse_entry(path, i, raw) for i, raw in enumerate(_raw_entries(path, data)))
    if len({e.sha256 for e in entries}) != len(entries):
        raise InvalidArgument(f"{path}: the same token hash is listed twice")
    return entries


def exposure_warning(path: Path) -> str | None:
    """A warning if users other than the owner can read or write `path`, else None."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        return f"{path} has mode {mode:04o}; it should be 0600 (readable by its owner only)"
    return None


def _load_tokens_file(path: Path, data: bytes) -> tuple[TokenEntry, ...]:
    """parse_tokens_file, logging a warning (on every load) while the file is exposed."""
    entries = parse_tokens_file(path, data)
    warning = exposure_warning(path)
    if warning:
        log.warning("tokens file is group/world accessible", path=str(path), warning=warning)
    return entries


class TokenFileAuth:
    """Checks bearer tokens against the hashes in a tokens file, reloaded when the file changes."""

    kind = "tokens"

    def __init__(self, tokens_file: Path) -> None:
        self._file = WatchedFile(tokens_file, _load_tokens_file)

    async def authenticate(self, authorization: str | None) -> Principal:
        token = parse_authorization(authorization)
        if token is None:
            raise Unauthenticated("missing bearer token")
        digest = hash_token(token)
        found: Principal | None = None
        # Compare against every entry, so timing says nothing about where (or whether) it matched.
        for entry in self._file.current():
            if hmac.compare_digest(entry.sha256, digest) and found is None:
                found = entry.principal
        if found is None:
            raise Unauthenticated("invalid token")
        return found

    async def close(self) -> None:
        pass


def add_token(tokens_file: Path, subject: str, roles: Sequence[str]) -> str:
    """Mint a token for `subject` with `roles`, record its hash in `tokens_file`, and return the token.

    The token is returned once and stored nowhere: the caller shows it to the operator. The file is
    created 0600 if missing and rewritten atomically (temporary 0600 file + rename), so a running
    appliance never sees half a file. Raises InvalidArgument for a bad subject or role, or if the
    existing file is not a valid tokens file (it is never overwritten then).
    """
    _check_subject(subject)
    role_list = sorted({check_name("role", r) for r in roles})
    token = new_token()
    with _locked(tokens_file):
        data = tokens_file.read_bytes() if tokens_file.exists() else b""
        parse_tokens_file(tokens_file, data)  # never rewrite a file we could not read back
        entries = _raw_entries(tokens_file, data)
        entries.append(
            {
                "sha256": hash_token(token),
                "subject": subject,
                "roles": role_list,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        _write_private(tokens_file, yaml.safe_dump({"tokens": entries}, sort_keys=False).encode())
    return token


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise writers (two operators adding tokens at once) on a 0600 lock file next to `path`."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically; the file is 0600 from the moment it exists."""
    # mkstemp opens with O_EXCL and mode 0600; fchmod undoes an unusual umask that would strip bits.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
