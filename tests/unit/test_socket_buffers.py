"""UDP socket buffers: raised past the host's net.core limits when the process holds CAP_NET_ADMIN (as
the appliance does), and as far as those limits allow when it does not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from quic_relay.udp import raise_buffers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for CAP_NET_ADMIN")

RAISE = """
import socket, sys
from quic_relay.udp import raise_buffers
size = int(sys.argv[1])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    raise_buffers(sock, size, send=True)
    print(*(sock.getsockopt(socket.SOL_SOCKET, o) for o in (socket.SO_RCVBUF, socket.SO_SNDBUF)))
"""


def limits() -> tuple[int, int]:
    core = Path("/proc/sys/net/core")
    return int((core / "rmem_max").read_text()), int((core / "wmem_max").read_text())


def test_buffers_are_raised_past_the_hosts_limits_with_cap_net_admin() -> None:
    rmem_max, wmem_max = limits()
    size = 2 * max(rmem_max, wmem_max)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        raise_buffers(sock, size, send=True)
        # The kernel reports twice the size asked for (half of it is bookkeeping).
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * size
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * size


def test_without_cap_net_admin_the_buffers_stop_at_the_hosts_limits() -> None:
    rmem_max, wmem_max = limits()
    size = 2 * max(rmem_max, wmem_max)
    # Dropped from the bounding set, the capability is gone from the root process exec'd below.
    done = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin", sys.executable, "-c", RAISE, str(size)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert [int(x) for x in done.stdout.split()] == [2 * rmem_max, 2 * wmem_max]
