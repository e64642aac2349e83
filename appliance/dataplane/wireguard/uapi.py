"""wireguard-go's configuration protocol: `get=1` / `set=1` over /var/run/wireguard/IFACE.sock.

Requests are `key=value` lines ended by an empty line; the answer ends with `errno=N` and an empty line.
Keys are lowercase hex. The socket path is not scoped per network namespace, hence host-unique names.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

SOCKET_DIR = Path(os.environ.get("WG_SOCKET_DIR", "/var/run/wireguard"))


class UapiError(Exception):
    """The device refused a request, or its socket did not answer."""


@dataclass(frozen=True)
class PeerStats:
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float = 0.0  # Unix time; 0 before the first handshake


def socket_path(ifname: str) -> Path:
    return SOCKET_DIR / f"{ifname}.sock"


def _exchange(ifname: str, request: str, timeout: float) -> list[tuple[str, str]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path(ifname)))
            sock.sendall(request.encode())
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise UapiError(f"{ifname}: no answer on {socket_path(ifname)}: {exc}") from None
    pairs = [tuple(line.split("=", 1)) for line in data.decode().splitlines() if "=" in line]
    result = [(k, v) for k, v in pairs]
    errno = dict(result).get("errno")
    if errno != "0":
        raise UapiError(f"{ifname}: the device refused the request (errno={errno})")
    return result


def set_device(ifname: str, items: list[tuple[str, str]], timeout: float = 5.0) -> None:
    """One `set=1` transaction; `items` in protocol order (device keys, then each peer's)."""
    for key, value in items:
        if "\n" in key or "\n" in value or "=" in key:
            raise ValueError(f"bad UAPI item {key!r}")
    body = "".join(f"{k}={v}\n" for k, v in items)
    _exchange(ifname, f"set=1\n{body}\n", timeout)


def get_device(ifname: str, timeout: float = 2.0) -> list[tuple[str, str]]:
    return _exchange(ifname, "get=1\n\n", timeout)


def peer_stats(items: list[tuple[str, str]]) -> PeerStats:
    """Totals over the device's peers (a session's device has one)."""
    rx = tx = 0
    sec = nsec = 0
    for key, value in items:
        if key == "rx_bytes":
            rx += int(value)
        elif key == "tx_bytes":
            tx += int(value)
        elif key == "last_handshake_time_sec":
            sec = max(sec, int(value))
        elif key == "last_handshake_time_nsec":
            nsec = int(value)
    return PeerStats(rx, tx, sec + nsec / 1e9 if sec else 0.0)
