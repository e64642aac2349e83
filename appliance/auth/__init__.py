"""Who may call the appliance: authenticators (`none`, `tokens`, `jwt`, `introspection`) and session
ownership.

The control service passes each call's `authorization` metadata to `Authenticator.authenticate` and
checks `Principal.may_access(session_owner)` before showing, changing or releasing a session.
"""

from appliance.auth.factory import AUTH_KINDS, authenticator_from_settings, build_authenticator
from appliance.auth.introspection_rules import GLOBUS_INTROSPECTION_ENDPOINT, IntrospectionConfig
from appliance.auth.jwt_auth import JwtAuth
from appliance.auth.noauth import NoAuth
from appliance.auth.principal import (
    ADMIN_ROLE,
    NO_AUTH_SUBJECT,
    Authenticator,
    Principal,
    parse_authorization,
)
from appliance.auth.tokens import TokenFileAuth, add_token, hash_token, new_token

__all__ = [
    "ADMIN_ROLE",
    "AUTH_KINDS",
    "GLOBUS_INTROSPECTION_ENDPOINT",
    "NO_AUTH_SUBJECT",
    "Authenticator",
    "IntrospectionConfig",
    "JwtAuth",
    "NoAuth",
    "Principal",
    "TokenFileAuth",
    "add_token",
    "authenticator_from_settings",
    "build_authenticator",
    "hash_token",
    "new_token",
    "parse_authorization",
]
