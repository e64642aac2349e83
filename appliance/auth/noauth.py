"""`--auth none`: every caller is an administrator. Development only."""

from __future__ import annotations

from appliance.auth.principal import ADMIN_ROLE, NO_AUTH_SUBJECT, Principal

_EVERYONE = Principal(NO_AUTH_SUBJECT, frozenset({ADMIN_ROLE}))


class NoAuth:
    """Accepts every call, with or without a token, as the admin principal NO_AUTH.

    The server logs the loud warning when it is chosen; this class stays silent.
    """

    kind = "none"

    async def authenticate(self, authorization: str | None) -> Principal:
        return _EVERYONE

    async def close(self) -> None:
        pass
