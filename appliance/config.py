"""Appliance configuration: flags over `SCISTREAM_*` environment variables over a YAML file over defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from appliance.dataplane.wireguard.pool import DEFAULT_POOL as DEFAULT_TUNNEL_POOL
from appliance.dataplane.wireguard.pool import parse_pool
from appliance.errors import InvalidArgument
from appliance.sessions.model import Address
from appliance.sessions.ports import PortRange
from quic_relay import RelayConfig

DEFAULT_CONTROL_PORT = 5000
DEFAULT_PORT_RANGE = "5100-5200"
DEFAULT_WIREGUARD_PORT = 51820
DEFAULT_STATE_DIR = Path("/var/lib/scistream")
WILDCARDS = ("0.0.0.0", "::", "")  # listen hosts that mean every address: never an address to hand out


class Settings(BaseSettings):
    """Everything `scistream server` can be told.

    Field `foo_bar` is flag `--foo-bar`, environment variable `SCISTREAM_FOO_BAR`, YAML key `foo_bar`.
    """

    model_config = SettingsConfigDict(env_prefix="SCISTREAM_", extra="forbid")

    listen: str = f"0.0.0.0:{DEFAULT_CONTROL_PORT}"
    # Address peers and users reach this appliance at; goes into tickets and certificates.
    advertise: str = ""
    port_range: str = DEFAULT_PORT_RANGE
    # Address data-plane sockets (entry points, data endpoints) bind to.
    data_bind: str = "0.0.0.0"
    # Held by one appliance at a time (a lock file in it); `s2cs` defaults to one per control port.
    state_dir: Path = DEFAULT_STATE_DIR
    auth: Literal["none", "tokens", "jwt", "introspection"] = "tokens"
    tokens_file: Path | None = None
    jwks_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    # `--auth introspection` (RFC 7662), e.g. Globus Auth: the endpoint, this appliance's client id and
    # secret there (the secret from a 0600 file, or SCISTREAM_INTROSPECTION_CLIENT_SECRET; never a
    # flag, which every user on the host could read), the scope every token must carry, the audience
    # it must name (default: the client id), the claim that names the caller, callers who are admins,
    # a CA file for the endpoint's certificate (default: the system's), the time an answer may take,
    # and how long (at most) and how many answers are cached: a revoked token works that long.
    introspection_endpoint: str | None = None
    introspection_client_id: str | None = None
    introspection_client_secret: SecretStr | None = None
    introspection_client_secret_file: Path | None = None
    introspection_scope: str | None = None
    introspection_audience: str | None = None
    introspection_identity: Literal["sub", "username"] = "sub"
    introspection_admins: list[str] = Field(default_factory=list)
    introspection_ca: Path | None = None
    introspection_timeout: float = Field(default=5.0, gt=0, le=60)
    introspection_cache_ttl: float = Field(default=60.0, ge=0, le=600)
    introspection_cache_size: int = Field(default=10_000, ge=1, le=1_000_000)
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int = 0
    # The status page (a web page of sessions, same auth as the API, TLS unless --insecure); 0: off.
    status_port: int = Field(default=0, ge=0, le=65535)
    # grpc.health.v1 alone, in plaintext, for probes that cannot speak TLS (Kubernetes); 0 = off.
    health_port: int = Field(default=0, ge=0, le=65535)
    log_format: Literal["console", "json"] = "console"
    log_level: str = "info"
    default_ttl: float = Field(default=24 * 3600, gt=0)
    retention: float = Field(default=24 * 3600, ge=0)
    wireguard_port: int = DEFAULT_WIREGUARD_PORT
    # WireGuard mode: `kernel` (pyroute2), `userspace` (wireguard-go), or `auto` (kernel if it works);
    # tunnel addresses come from `wireguard_pool` (one IPv4 and at most one IPv6 network).
    wireguard_backend: Literal["auto", "kernel", "userspace"] = "auto"
    wireguard_pool: str = DEFAULT_TUNNEL_POOL
    wireguard_go: str = "wireguard-go"  # the userspace backend's program
    peer_timeout: float = Field(default=10.0, gt=0)
    # Seconds an ACTIVE session's data plane may stay without a connection to the peer appliance
    # before the session is FAILED (both sides check; the peer is told when it can be reached).
    peer_grace: float = Field(default=60.0, gt=0)
    # TLS mode's relay processes; 0 = one per core.
    workers: int = Field(default=0, ge=0)
    # QUIC mode: largest QUIC packet (UDP payload) path MTU discovery may raise to; 1200 turns it off.
    quic_max_packet_size: int = Field(default=RelayConfig.max_datagram_size, ge=1200, le=65507)
    # SciStream 1.2.1 protocol (scistream.Control): the data plane its sessions use, how long a `req`
    # waits for its hello, the control port of producer appliances, and a CA file for their certificates
    # (unset: accepted on first use, as 1.2.1 does).
    # TLS by default: TCP like 1.2.1's stunnel, through the TCP port ranges its users opened.
    legacy_mode: Literal["quic", "wireguard", "tls", "auto"] = "tls"
    legacy_hello_timeout: float = Field(default=180.0, gt=0)
    legacy_peer_port: int = Field(default=DEFAULT_CONTROL_PORT, ge=1, le=65535)
    legacy_peer_ca: Path | None = None
    # SciStream 1.2.1 uids waiting for their next call (a req for its hello, an early hello for its
    # req, a consumer reservation for its update), per client address and in all: each may hold a
    # call and ports for `legacy_hello_timeout`, so more are RESOURCE_EXHAUSTED.
    legacy_max_pending_per_client: int = Field(default=32, ge=1)
    legacy_max_pending: int = Field(default=256, ge=1)

    @field_validator("port_range")
    @classmethod
    def _valid_range(cls, value: str) -> str:
        PortRange.parse(value)
        return value

    @field_validator("wireguard_pool")
    @classmethod
    def _valid_pool(cls, value: str) -> str:
        parse_pool(value)
        return value

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        Address.parse(value, what="listen address")
        return value

    @property
    def listen_address(self) -> Address:
        return Address.parse(self.listen)

    @property
    def ports(self) -> PortRange:
        return PortRange.parse(self.port_range)

    @property
    def advertise_host(self) -> str:
        """The host peers use: --advertise, else the listen host unless it is a wildcard."""
        if self.advertise:
            return self.advertise
        host = self.listen_address.host
        return "127.0.0.1" if host in WILDCARDS else host

    @property
    def advertise_address(self) -> str:
        return str(Address(self.advertise_host, self.listen_address.port))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # YamlConfigSettingsSource reads `yaml_file` from model_config; None means no file.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Settings from flags (those not None), the environment and `config_file`; InvalidArgument if bad."""
    if config_file is not None and not config_file.is_file():
        raise InvalidArgument(f"config file {config_file} does not exist")
    # A subclass per load carries the file name, so no global state is shared between loads.
    with_file = type(
        "Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": config_file}}
    )
    try:
        settings: Settings = with_file(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise InvalidArgument(f"invalid setting {where}: {first['msg']}") from None
    return settings
