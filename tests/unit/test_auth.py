"""Behaviour of the authenticators (none, tokens, jwt) and of session ownership."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

from appliance.auth import (
    ADMIN_ROLE,
    NO_AUTH_SUBJECT,
    JwtAuth,
    Principal,
    TokenFileAuth,
    add_token,
    build_authenticator,
    hash_token,
    new_token,
    parse_authorization,
)
from appliance.errors import InvalidArgument, Unauthenticated, Unavailable

ISSUER = "https://idp.example.org"
AUDIENCE = "scistream"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- helpers ---------------------------------------------------------------------------------------


def _jwk(public_jwk: str, kid: str) -> dict[str, Any]:
    key: dict[str, Any] = json.loads(public_jwk)
    key["kid"] = kid
    return key


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    keys = [
        _jwk(RSAAlgorithm.to_jwk(RSA_KEY.public_key()), "rsa1"),
        _jwk(ECAlgorithm.to_jwk(EC_KEY.public_key()), "ec1"),
    ]
    path.write_text(json.dumps({"keys": keys}))
    return path


@pytest.fixture
def jwt_auth(jwks_file: Path) -> JwtAuth:
    return JwtAuth(jwks_file, issuer=ISSUER, audience=AUDIENCE, leeway_seconds=5)


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(claims: dict[str, Any], key: Any = RSA_KEY, algorithm: str = "RS256", kid: str = "rsa1") -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})


async def _reason(auth: Any, authorization: str | None) -> str:
    with pytest.raises(Unauthenticated) as info:
        await auth.authenticate(authorization)
    return info.value.message


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    return tmp_path / "tokens.yaml"


# --- none ------------------------------------------------------------------------------------------


async def test_none_gives_admin_no_auth_principal_without_a_token() -> None:
    auth = build_authenticator("none")
    principal = await auth.authenticate(None)
    assert auth.kind == "none"
    assert principal == Principal(NO_AUTH_SUBJECT, frozenset({ADMIN_ROLE}))
    assert principal.is_admin


# --- parse_authorization ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER\tabc", "abc"), ("abc", "abc"), (" ", None)],
)
def test_parse_authorization_strips_optional_bearer_prefix(value: str, token: str | None) -> None:
    assert parse_authorization(value) == token


def test_parse_authorization_treats_missing_and_bare_scheme_as_no_token() -> None:
    assert parse_authorization(None) is None
    assert parse_authorization("Bearer") is None


# --- tokens ----------------------------------------------------------------------------------------


async def test_tokens_valid_bearer_token_gives_its_subject_and_roles(tokens_file: Path) -> None:
    token = add_token(tokens_file, "alice", ["admin"])
    auth = build_authenticator("tokens", tokens_file=tokens_file)
    assert auth.kind == "tokens"
    assert await auth.authenticate(f"Bearer {token}") == Principal("alice", frozenset({ADMIN_ROLE}))


async def test_tokens_bare_token_without_bearer_is_accepted(tokens_file: Path) -> None:
    token = add_token(tokens_file, "bob", [])
    auth = TokenFileAuth(tokens_file)
    assert await auth.authenticate(token) == Principal("bob")


async def test_tokens_unknown_token_is_invalid(tokens_file: Path) -> None:
    add_token(tokens_file, "alice", [])
    stranger = new_token()
    reason = await _reason(TokenFileAuth(tokens_file), f"Bearer {stranger}")
    assert reason == "invalid token"
    assert stranger not in reason


async def test_tokens_missing_header_is_missing_bearer_token(tokens_file: Path) -> None:
    add_token(tokens_file, "alice", [])
    assert await _reason(TokenFileAuth(tokens_file), None) == "missing bearer token"
    assert await _reason(TokenFileAuth(tokens_file), "Bearer ") == "missing bearer token"


async def test_tokens_file_is_reloaded_after_add_token(tokens_file: Path) -> None:
    add_token(tokens_file, "alice", [])
    auth = TokenFileAuth(tokens_file)
    later = add_token(tokens_file, "carol", ["operator"])
    assert await auth.authenticate(later) == Principal("carol", frozenset({"operator"}))


async def test_tokens_bad_edit_keeps_previous_tokens(tokens_file: Path) -> None:
    token = add_token(tokens_file, "alice", [])
    auth = TokenFileAuth(tokens_file)
    tokens_file.write_text("tokens: [oops")
    assert (await auth.authenticate(token)).subject == "alice"


def test_tokens_group_readable_file_is_warned_about(tokens_file: Path) -> None:
    add_token(tokens_file, "alice", [])
    tokens_file.chmod(0o640)
    with capture_logs() as logs:
        TokenFileAuth(tokens_file)
    assert any("0640" in str(entry.get("warning")) for entry in logs)


async def test_tokens_deleted_file_refuses_every_call(tokens_file: Path) -> None:
    token = add_token(tokens_file, "alice", [])
    auth = TokenFileAuth(tokens_file)
    tokens_file.unlink()
    with pytest.raises(Unavailable):
        await auth.authenticate(token)


def test_add_token_creates_file_with_mode_0600(tokens_file: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        add_token(tokens_file, "alice", [])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600


def test_add_token_stores_only_the_hash(tokens_file: Path) -> None:
    token = add_token(tokens_file, "alice", [])
    assert hash_token(token) != token
    assert token not in tokens_file.read_text()
    assert hash_token(token) in tokens_file.read_text()


def test_new_token_is_prefixed_and_unique() -> None:
    token = new_token()
    assert token.startswith("sst_")
    assert len(token) >= 4 + 43  # 32 random bytes, base64url
    assert token != new_token()


@pytest.mark.parametrize("subject", ["", "al ice", "bob\n", NO_AUTH_SUBJECT])
def test_add_token_rejects_invalid_subject(tokens_file: Path, subject: str) -> None:
    with pytest.raises(InvalidArgument):
        add_token(tokens_file, subject, [])
    assert not tokens_file.exists()


def test_add_token_refuses_to_overwrite_a_malformed_file(tokens_file: Path) -> None:
    tokens_file.write_text("tokens: [{sha256: nothex, subject: alice}]")
    with pytest.raises(InvalidArgument, match=r"tokens\[0\]"):
        add_token(tokens_file, "bob", [])
    assert "nothex" in tokens_file.read_text()


# --- jwt -------------------------------------------------------------------------------------------


async def test_jwt_valid_rs256_token_gives_subject_and_roles(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(roles=["admin", "operator"]))
    principal = await jwt_auth.authenticate(f"Bearer {token}")
    assert principal == Principal("alice", frozenset({"admin", "operator"}))


async def test_jwt_valid_es256_token_takes_roles_from_scope(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(sub="bob", scope="read write"), key=EC_KEY, algorithm="ES256", kid="ec1")
    assert await jwt_auth.authenticate(token) == Principal("bob", frozenset({"read", "write"}))


async def test_jwt_expired_token_is_rejected(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(exp=int(time.time()) - 60))
    assert await _reason(jwt_auth, token) == "token expired"


async def test_jwt_expiry_within_leeway_is_accepted(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(exp=int(time.time()) - 2))
    assert (await jwt_auth.authenticate(token)).subject == "alice"


async def test_jwt_wrong_issuer_is_rejected(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(iss="https://evil.example.org"))
    assert await _reason(jwt_auth, token) == "wrong issuer"


async def test_jwt_wrong_audience_is_rejected(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(aud="another-service"))
    assert await _reason(jwt_auth, token) == "wrong audience"


async def test_jwt_signed_by_another_key_has_bad_signature(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(), key=OTHER_RSA_KEY)
    assert await _reason(jwt_auth, token) == "bad signature"


async def test_jwt_unknown_kid_is_rejected(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(), kid="rotated-away")
    assert await _reason(jwt_auth, token) == "unknown key id"


@pytest.mark.parametrize(
    ("algorithm", "key"), [("none", None), ("HS256", "shared-secret-of-32-bytes-or-more")]
)
async def test_jwt_unsigned_or_symmetric_token_is_rejected(
    jwt_auth: JwtAuth, algorithm: str, key: Any
) -> None:
    token = _sign(_claims(), key=key, algorithm=algorithm)
    assert await _reason(jwt_auth, token) == "algorithm not allowed"


async def test_jwt_algorithm_not_matching_key_type_is_rejected(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(), key=EC_KEY, algorithm="ES256", kid="rsa1")
    assert await _reason(jwt_auth, token) == "algorithm does not match the key"


async def test_jwt_missing_exp_is_rejected(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(exp=None))
    assert await _reason(jwt_auth, token) == "token has no 'exp' claim"


async def test_jwt_error_never_contains_the_token(jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(aud="another-service"))
    assert token not in await _reason(jwt_auth, token)


async def test_jwt_single_key_is_used_for_token_without_kid(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [json.loads(RSAAlgorithm.to_jwk(RSA_KEY.public_key()))]}))
    auth = JwtAuth(path)
    token = jwt.encode(_claims(aud=None), RSA_KEY, algorithm="RS256")
    assert (await auth.authenticate(token)).subject == "alice"


async def test_jwt_jwks_is_reloaded_when_it_changes(jwks_file: Path, jwt_auth: JwtAuth) -> None:
    token = _sign(_claims(), key=OTHER_RSA_KEY, kid="rsa2")
    assert await _reason(jwt_auth, token) == "unknown key id"
    jwks = json.loads(jwks_file.read_text())
    jwks["keys"].append(_jwk(RSAAlgorithm.to_jwk(OTHER_RSA_KEY.public_key()), "rsa2"))
    jwks_file.write_text(json.dumps(jwks))
    assert (await jwt_auth.authenticate(token)).subject == "alice"


def test_jwks_with_symmetric_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}))
    with pytest.raises(InvalidArgument, match="key type"):
        build_authenticator("jwt", jwks_file=path)


# --- build_authenticator ---------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "option"), [("tokens", "--tokens-file"), ("jwt", "--jwks-file")])
def test_build_authenticator_without_file_option_names_it(kind: str, option: str) -> None:
    with pytest.raises(InvalidArgument, match=option):
        build_authenticator(kind)


@pytest.mark.parametrize(("kind", "option"), [("tokens", "tokens_file"), ("jwt", "jwks_file")])
def test_build_authenticator_with_missing_file_raises_invalid_argument(
    tmp_path: Path, kind: str, option: str
) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(InvalidArgument, match="does not exist"):
        options: dict[str, Any] = {option: missing}
        build_authenticator(kind, **options)


def test_build_authenticator_rejects_unknown_kind() -> None:
    with pytest.raises(InvalidArgument, match="unknown auth kind"):
        build_authenticator("kerberos")


# --- Principal -------------------------------------------------------------------------------------


def test_principal_may_access_own_sessions() -> None:
    assert Principal("alice").may_access("alice")


def test_principal_admin_may_access_any_session() -> None:
    assert Principal("root", frozenset({ADMIN_ROLE})).may_access("alice")


def test_principal_may_not_access_other_users_sessions() -> None:
    assert not Principal("bob", frozenset({"operator"})).may_access("alice")
