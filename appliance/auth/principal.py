"""Who is calling: the principal an authenticator vouches for, and the authenticator interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from appliance.errors import InvalidArgument

ADMIN_ROLE = "admin"
NO_AUTH_SUBJECT = "NO_AUTH"

_BEARER = "bearer"
LEGACY_NO_TOKEN = "INVALID_TOKEN"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a subject (user name) and the roles granted to it."""

    subject: str
    roles: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles

    def may_access(self, owner: str) -> bool:
        """True if this caller may see, change or release a session created by `owner`."""
        return self.is_admin or self.subject == owner


@runtime_checkable
class Authenticator(Protocol):
    """Turns the `authorization` metadata of a call into a Principal."""

    kind: str  # "none" | "tokens" | "jwt" | "introspection"

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind `authorization` (raw metadata value: "Bearer X", a bare token, or None).

        Raises Unauthenticated with a short reason that never contains the token.
        """
        ...

    async def close(self) -> None:
        """Frees what the authenticator holds (connections); called once, when the appliance stops."""
        ...


def parse_authorization(value: str | None) -> str | None:
    """The token in an authorization value: "Bearer X" or a bare "X" (SciStream 1.2.1); None if empty."""
    if value is None:
        return None
    parts = value.split(maxsplit=1)
    if parts and parts[0].lower() == _BEARER:
        parts = parts[1:]
    if parts == [LEGACY_NO_TOKEN]:  # what SciStream 1.2.1 clients send when they have no token
        return None
    return parts[0].strip() if parts else None


def check_name(what: str, name: str) -> str:
    """`name` if it is usable as a subject or role (non-empty, no whitespace), else InvalidArgument."""
    if not name or any(ch.isspace() for ch in name):
        raise InvalidArgument(f"invalid {what} {name!r}: must be non-empty and contain no whitespace")
    return name
