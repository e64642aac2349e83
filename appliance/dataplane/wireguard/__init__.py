"""WireGuard mode: kernel links via pyroute2, or a supervised wireguard-go where the module is missing.

`build_driver()` checks what the host offers and picks the backend; the rest of the package is the
backend interface (backend.py) and its two implementations (kernel.py, userspace.py + uapi.py), the
tunnel address pool (pool.py), the nftables rules (rules.py), keys (keys.py) and the driver itself.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import structlog

from appliance.dataplane.wireguard.backend import Backend
from appliance.dataplane.wireguard.driver import WireGuardDriver, appliance_tag
from appliance.dataplane.wireguard.kernel import KernelBackend, kernel_supported
from appliance.dataplane.wireguard.links import host_networks
from appliance.dataplane.wireguard.pool import AddressPool, parse_pool
from appliance.dataplane.wireguard.userspace import UserspaceBackend
from appliance.errors import FailedPrecondition

log = structlog.get_logger(__name__)

BackendChoice = Literal["auto", "kernel", "userspace"]
CAP_NET_ADMIN = 12
TUN = Path("/dev/net/tun")

__all__ = ["WireGuardDriver", "build_driver", "missing_requirement"]


def _has_net_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def missing_requirement(choice: BackendChoice, wireguard_go: str = "wireguard-go") -> str | None:
    """None if `choice` can work here, else one line naming what is missing (container hints included)."""
    if not _has_net_admin():
        return "WireGuard mode needs the NET_ADMIN capability (compose: `cap_add: [NET_ADMIN]`)"
    if shutil.which("nft") is None:
        return "WireGuard mode needs the `nft` command (nftables)"
    if choice == "kernel":
        return kernel_supported()
    if not TUN.exists():
        return "WireGuard mode needs /dev/net/tun (compose: `devices: [/dev/net/tun:/dev/net/tun]`)"
    if shutil.which(wireguard_go) is None:
        return f"WireGuard mode needs {wireguard_go} (no kernel module here, so userspace is the fallback)"
    return None


def build_driver(
    choice: BackendChoice, pool: str, state_dir: Path, wireguard_go: str = "wireguard-go"
) -> WireGuardDriver | None:
    """The WireGuard driver for this host, or None (logged once) when `auto` finds neither backend.

    An explicit `kernel` or `userspace` that cannot work is a FailedPrecondition naming what is missing.
    """
    networks = parse_pool(pool)
    backend: Backend | None = None
    if choice in ("auto", "kernel") and missing_requirement("kernel") is None:
        backend = KernelBackend()
    elif choice == "kernel":
        raise FailedPrecondition(f"--wireguard-backend kernel: {missing_requirement('kernel')}")
    else:
        why = missing_requirement("userspace", wireguard_go)
        if why is not None:
            if choice == "userspace":
                raise FailedPrecondition(f"--wireguard-backend userspace: {why}")
            log.warning("WireGuard mode unavailable", reason=why)
            return None
        log.warning("no WireGuard kernel module: WireGuard mode falls back to wireguard-go (userspace)")
        backend = UserspaceBackend(wireguard_go, log_dir=state_dir / "wireguard")
        (state_dir / "wireguard").mkdir(parents=True, exist_ok=True, mode=0o700)
    return WireGuardDriver(
        backend, AddressPool(networks, host_networks), appliance_tag(str(state_dir.resolve()))
    )
