"""A real OAuth2 authorization server for the tests of `--auth introspection`, built with Authlib's
Flask integration and served by werkzeug on 127.0.0.1 (plain HTTP, or HTTPS with a test CA).

It issues bearer tokens with the client-credentials grant (RFC 6749 §4.4), answers RFC 7662
introspection requests from resource servers (the appliance), and revokes tokens (RFC 7009). Each
client's tokens carry that client's subject, audience and lifetime (negative: issued expired), so a
test gets an expired, wrong-audience or wrong-scope token from the server itself, as a user would.
`introspections` counts the introspection requests; `fail_status` makes the introspection endpoint
answer with that HTTP status instead (a broken authorization server).
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.integrations.httpx_client import OAuth2Client
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask, Response
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

ISSUER = "https://auth.test.invalid"


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # no access log on the test output


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    """A registered client: a user's app (gets tokens) or a resource server (may introspect)."""

    client_id: str
    client_secret: str
    scope: str = ""
    subject: str = ""
    audience: str = ""
    expires_in: int = 3600
    resource_server: bool = False

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        allowed = self.scope.split()
        if not scope:
            return self.scope
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(self.client_secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "client_secret_basic"

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials" and not self.resource_server


@dataclass
class Token(TokenMixin):  # type: ignore[misc]
    access_token: str
    client: Client
    scope: str
    issued_at: float
    expires_in: int
    revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return self.issued_at + self.expires_in <= time.time()

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> None:
        return None

    def get_client(self) -> Client:
        return self.client


class _Introspection(IntrospectionEndpoint):  # type: ignore[misc]
    def __init__(self, server: AuthServer, authorization_server: AuthorizationServer) -> None:
        super().__init__(authorization_server)
        self._tokens = server.tokens

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return self._tokens.get(token_string)

    def check_permission(self, token: Token, client: Client, request: Any) -> bool:
        return client.resource_server

    def introspect_token(self, token: Token) -> dict[str, Any]:
        owner = token.client
        return {
            "active": True,
            "client_id": owner.client_id,
            "token_type": "Bearer",
            "scope": token.scope,
            "sub": owner.subject,
            "username": f"{owner.subject}@example.org",
            "aud": [owner.audience],
            "iss": ISSUER,
            "iat": int(token.issued_at),
            "exp": int(token.issued_at + token.expires_in),
        }


class _Revocation(RevocationEndpoint):  # type: ignore[misc]
    def __init__(self, server: AuthServer, authorization_server: AuthorizationServer) -> None:
        super().__init__(authorization_server)
        self._tokens = server.tokens

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return self._tokens.get(token_string)

    def revoke_token(self, token: Token, request: Any) -> None:
        token.revoked = True


@dataclass
class AuthServerTls:
    """A CA and a certificate it signed for 127.0.0.1 and localhost, as PEM files."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_test_ca(directory: Path) -> AuthServerTls:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    found = AuthServerTls(directory / "as-ca.pem", directory / "as.pem", directory / "as.key")
    found.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    found.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    found.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return found


@dataclass
class AuthServer:
    """The authorization server; `start()` serves it on 127.0.0.1 and returns its base URL."""

    tls: AuthServerTls | None = None
    clients: dict[str, Client] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    introspections: int = 0
    fail_status: int | None = None
    base_url: str = ""
    _server: BaseWSGIServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.base_url}/introspect"

    def register(self, client_id: str, **fields: Any) -> Client:
        """A client with a fresh secret; `fields` set the rest (see Client)."""
        client = Client(client_id, secrets.token_urlsafe(24), **fields)
        self.clients[client_id] = client
        return client

    def start(self) -> str:
        app = Flask(__name__)
        server = AuthorizationServer(app, query_client=self.clients.get, save_token=self._save_token)
        server.register_token_generator(
            "default",
            BearerTokenGenerator(
                access_token_generator=lambda **_: secrets.token_urlsafe(32),
                expires_generator=lambda client, grant_type: client.expires_in,
            ),
        )
        server.register_grant(grants.ClientCredentialsGrant)
        server.register_endpoint(_Introspection(self, server))
        server.register_endpoint(_Revocation(self, server))

        @app.post("/token")
        def token() -> Any:
            return server.create_token_response()

        @app.post("/introspect")
        def introspect() -> Any:
            with self._lock:
                self.introspections += 1
            if self.fail_status is not None:
                return Response("unavailable", status=self.fail_status)
            return server.create_endpoint_response("introspection")

        @app.post("/revoke")
        def revoke() -> Any:
            return server.create_endpoint_response("revocation")

        context = None
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        self._server = make_server(
            "127.0.0.1", 0, app, threaded=True, ssl_context=context, request_handler=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        scheme = "https" if context else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self._server.server_port}"
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _save_token(self, token: dict[str, Any], request: Any) -> None:
        client = request.client
        self.tokens[token["access_token"]] = Token(
            token["access_token"], client, token.get("scope", ""), time.time(), token["expires_in"]
        )

    def _oauth(self, client_id: str) -> OAuth2Client:
        client = self.clients[client_id]
        verify: ssl.SSLContext | bool = True
        if self.tls is not None:
            verify = ssl.create_default_context(cafile=str(self.tls.ca_file))
        return OAuth2Client(client.client_id, client.client_secret, verify=verify)

    def issue(self, client_id: str, scope: str | None = None) -> str:
        """A token for `client_id`, fetched over HTTP with the client-credentials grant."""
        with self._oauth(client_id) as oauth:
            kwargs = {"scope": scope} if scope else {}
            token = oauth.fetch_token(f"{self.base_url}/token", grant_type="client_credentials", **kwargs)
        return str(token["access_token"])

    def revoke(self, client_id: str, token: str) -> None:
        """Revokes `token` over HTTP (RFC 7009), as its client would."""
        with self._oauth(client_id) as oauth:
            response = oauth.revoke_token(f"{self.base_url}/revoke", token=token)
        response.raise_for_status()
