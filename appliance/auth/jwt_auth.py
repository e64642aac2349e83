"""`--auth jwt`: bearer JWTs from an identity provider, verified against public keys in a JWKS file.

Only asymmetric algorithms are accepted, and each key is used only with the algorithms of its key type
(and its declared `alg`, if any), so neither `alg: none` nor HMAC-with-a-public-key confusion can pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog

from appliance.auth.principal import Principal, parse_authorization
from appliance.auth.watched import WatchedFile
from appliance.errors import InvalidArgument, Unauthenticated

log = structlog.get_logger(__name__)

# Accepted token algorithm -> the JWK key type (kty) that can verify it.
ALGORITHM_KEY_TYPES: Mapping[str, str] = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "EdDSA": "OKP",
}

# Most specific first: PyJWT subclasses several of these (ExpiredSignatureError is an InvalidTokenError).
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidKeyError, "algorithm does not match the key"),
    (jwt.DecodeError, "malformed token"),
)


@dataclass(frozen=True)
class VerifyingKey:
    """One public key from the JWKS, and the algorithm its JWK pins it to (None: any of its type)."""

    kid: str | None
    key_type: str
    algorithm: str | None
    key: Any  # a cryptography public key object


@dataclass(frozen=True)
class KeySet:
    keys: tuple[VerifyingKey, ...]

    def find(self, kid: str | None) -> VerifyingKey:
        """The key named by a token's `kid`; without one, the only key, if there is only one."""
        if kid is None:
            if len(self.keys) == 1:
                return self.keys[0]
            raise Unauthenticated("token has no key id")
        for key in self.keys:
            if key.kid == kid:
                return key
        raise Unauthenticated("unknown key id")


def _parse_key(path: Path, index: int, raw: Any) -> VerifyingKey:
    where = f"{path}: keys[{index}]"
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where} must be a JSON object")
    declared = raw.get("alg")
    if declared is not None and declared not in ALGORITHM_KEY_TYPES:
        raise InvalidArgument(f"{where}: algorithm {declared!r} is not allowed (asymmetric only)")
    if raw.get("kty") not in ALGORITHM_KEY_TYPES.values():
        raise InvalidArgument(f"{where}: key type {raw.get('kty')!r} is not allowed (RSA, EC, OKP only)")
    if "d" in raw:
        raise InvalidArgument(f"{where} is a private key; the JWKS file must hold public keys only")
    try:
        jwk = jwt.PyJWK(raw)
    except jwt.PyJWTError as exc:
        raise InvalidArgument(f"{where}: unusable key ({exc})") from None
    return VerifyingKey(jwk.key_id, raw["kty"], declared, jwk.key)


def parse_jwks(path: Path, data: bytes) -> KeySet:
    """The public keys of a JWKS document; InvalidArgument naming the bad key otherwise."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"{path} is not valid JSON: {exc}") from None
    raw_keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(raw_keys, list) or not raw_keys:
        raise InvalidArgument(f"{path} must be a JWKS object with a non-empty 'keys' list")
    keys = tuple(_parse_key(path, i, raw) for i, raw in enumerate(raw_keys))
    kids = [k.kid for k in keys if k.kid is not None]
    if len(set(kids)) != len(kids):
        raise InvalidArgument(f"{path}: the same 'kid' is used by two keys")
    return KeySet(keys)


def _roles(claims: Mapping[str, Any]) -> frozenset[str]:
    """Roles from a `roles` list claim, else from the space-separated OAuth `scope` claim."""
    roles = claims.get("roles")
    if roles is not None:
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated("'roles' claim must be a list of strings")
        return frozenset(roles)
    scope = claims.get("scope")
    if scope is None:
        return frozenset()
    if not isinstance(scope, str):
        raise Unauthenticated("'scope' claim must be a string")
    return frozenset(scope.split())


class JwtAuth:
    """Verifies bearer JWTs: signature by a JWKS key, `exp` always, `iss`/`aud` when configured."""

    kind = "jwt"

    def __init__(
        self,
        jwks_file: Path,
        *,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_seconds: float = 30.0,
    ) -> None:
        self._keys = WatchedFile(jwks_file, parse_jwks)
        self.issuer = issuer
        self.audience = audience
        self.leeway_seconds = leeway_seconds
        self._required = ["exp", "sub"] + (["iss"] if issuer else []) + (["aud"] if audience else [])
        if audience is None:
            # Without it, a token minted for any other service of the same provider is accepted.
            log.warning("jwt audience not configured: tokens for any audience are accepted")

    async def authenticate(self, authorization: str | None) -> Principal:
        token = parse_authorization(authorization)
        if token is None:
            raise Unauthenticated("missing bearer token")
        try:
            claims = self._verify(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(_reason(exc)) from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("'sub' claim must be a non-empty string")
        return Principal(subject, _roles(claims))

    async def close(self) -> None:
        pass

    def _verify(self, token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHM_KEY_TYPES:
            raise Unauthenticated("algorithm not allowed")
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated("malformed token")
        key = self._keys.current().find(kid)
        if ALGORITHM_KEY_TYPES[algorithm] != key.key_type or key.algorithm not in (None, algorithm):
            raise Unauthenticated("algorithm does not match the key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway_seconds,
                options={"require": self._required, "verify_aud": self.audience is not None},
            )
        except (TypeError, ValueError):
            # A key PyJWT cannot use with this algorithm (e.g. an EC key on the wrong curve).
            raise Unauthenticated("algorithm does not match the key") from None
        return claims


def _reason(exc: jwt.PyJWTError) -> str:
    """A short, token-free reason for a failed verification."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token has no '{exc.claim}' claim"
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "invalid token"
