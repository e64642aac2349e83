"""QUIC relay: TCP connections and UDP datagrams between two hosts over one pinned, mutually
authenticated QUIC connection (aioquic). See RelayServer (producer side) and RelayClient
(consumer side)."""

from .client import RelayClient
from .config import RelayConfig
from .counters import Counters
from .errors import FramingError, RelayError
from .identity import Identity, fingerprint_of, generate_identity, normalize_fingerprint
from .server import RelayServer

__all__ = [
    "Counters",
    "FramingError",
    "Identity",
    "RelayClient",
    "RelayConfig",
    "RelayError",
    "RelayServer",
    "fingerprint_of",
    "generate_identity",
    "normalize_fingerprint",
]
