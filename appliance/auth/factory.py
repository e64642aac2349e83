"""Choosing the authenticator from configuration (`--auth none|tokens|jwt`)."""

from __future__ import annotations

from pathlib import Path

from appliance.auth.jwt_auth import JwtAuth
from appliance.auth.noauth import NoAuth
from appliance.auth.principal import Authenticator
from appliance.auth.tokens import TokenFileAuth
from appliance.errors import InvalidArgument

AUTH_KINDS = ("none", "tokens", "jwt")


def _existing(path: Path | None, option: str, kind: str) -> Path:
    flag = "--" + option.replace("_", "-")  # as the CLI and SCISTREAM_* settings spell it
    if path is None:
        raise InvalidArgument(f"--auth {kind} needs {flag}")
    if not path.is_file():
        raise InvalidArgument(f"{flag} {path} does not exist or is not a file")
    return path


def build_authenticator(
    kind: str,
    *,
    tokens_file: Path | None = None,
    jwks_file: Path | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    leeway_seconds: float = 30.0,
) -> Authenticator:
    """The authenticator for `kind`, its files loaded and checked now.

    Raises InvalidArgument, naming the option or file, for an unknown kind, a missing option, or a
    file that is missing or malformed. `none` accepts everyone as admin: the caller must warn loudly.
    """
    if kind == "none":
        return NoAuth()
    if kind == "tokens":
        return TokenFileAuth(_existing(tokens_file, "tokens_file", kind))
    if kind == "jwt":
        if leeway_seconds < 0:
            raise InvalidArgument(f"leeway_seconds must not be negative, got {leeway_seconds}")
        return JwtAuth(
            _existing(jwks_file, "jwks_file", kind),
            issuer=issuer,
            audience=audience,
            leeway_seconds=leeway_seconds,
        )
    raise InvalidArgument(f"unknown auth kind {kind!r}; expected one of {', '.join(AUTH_KINDS)}")
