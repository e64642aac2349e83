"""The sans-I/O half of `--auth introspection`: its configuration, and what an RFC 7662 introspection
answer must say for a call to be accepted (see introspection.py for the HTTP half)."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from appliance.auth.principal import ADMIN_ROLE, NO_AUTH_SUBJECT, Principal
from appliance.errors import InvalidArgument, Unauthenticated

GLOBUS_INTROSPECTION_ENDPOINT = "https://auth.globus.org/v2/oauth2/token/introspect"
NBF_LEEWAY_SECONDS = 30.0  # clocks of the appliance and the authorization server may differ a little

Identity = Literal["sub", "username"]


@dataclass(frozen=True)
class IntrospectionConfig:
    """What `IntrospectionAuth` needs; `client_secret` is never shown (repr) or logged."""

    endpoint: str
    client_id: str
    client_secret: str = field(repr=False)
    scope: str
    audience: str
    identity: Identity = "sub"
    admins: frozenset[str] = frozenset()
    ca_file: Path | None = None
    timeout: float = 5.0
    cache_ttl: float = 60.0
    cache_size: int = 10_000


def check_endpoint(url: str) -> str:
    """`url` if it is a usable introspection endpoint, else InvalidArgument.

    HTTPS always, except to a loopback address (the secret then never leaves the host): a plain-HTTP
    endpoint elsewhere would send the client secret and every user's token in the clear.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidArgument(f"introspection endpoint {url!r} must be an https:// URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument("the introspection endpoint URL must not contain credentials")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise InvalidArgument(
            f"introspection endpoint {url!r} must use https (plain http only to a loopback address)"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_client_secret(path: Path) -> str:
    """The client secret in `path` (one line), which must be readable by its owner only."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        data = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read the client secret file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidArgument(f"the client secret file {path} is not text") from None
    if mode & 0o077:
        raise InvalidArgument(f"the client secret file {path} has mode {mode:04o}; make it 0600")
    secret = data.strip()
    if not secret or "\n" in secret:
        raise InvalidArgument(f"the client secret file {path} must hold the secret on one line")
    return secret


def _audiences(value: Any) -> Collection[str]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return value
    return ()


def _timestamp(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"token '{name}' is not a number")
    return float(value)


def principal_from(claims: Mapping[str, Any], config: IntrospectionConfig, now: float) -> Principal:
    """The caller an introspection answer vouches for, at wall-clock time `now`; Unauthenticated else.

    Checks, in order: `active` is true, `exp` is present and in the future, `nbf` (if any) is not in
    the future, `scope` holds the required scope, `aud` names the configured audience, and the
    identity claim is a non-empty string without whitespace.
    """
    if claims.get("active") is not True:
        raise Unauthenticated("token is not active (expired, revoked or unknown)")
    expires = _timestamp(claims, "exp")
    if expires is None:
        raise Unauthenticated("token has no expiry")
    if expires <= now:
        raise Unauthenticated("token expired")
    not_before = _timestamp(claims, "nbf")
    if not_before is not None and not_before > now + NBF_LEEWAY_SECONDS:
        raise Unauthenticated("token not yet valid")
    scope = claims.get("scope")
    if not isinstance(scope, str) or config.scope not in scope.split():
        raise Unauthenticated("token lacks the required scope")
    if config.audience not in _audiences(claims.get("aud")):
        raise Unauthenticated("token is for another audience")
    subject = claims.get(config.identity)
    if not isinstance(subject, str) or not subject or any(ch.isspace() for ch in subject):
        raise Unauthenticated(f"token has no usable '{config.identity}'")
    if subject == NO_AUTH_SUBJECT:
        raise Unauthenticated(f"subject {NO_AUTH_SUBJECT} is reserved")
    roles = frozenset({ADMIN_ROLE}) if subject in config.admins else frozenset()
    return Principal(subject, roles)
