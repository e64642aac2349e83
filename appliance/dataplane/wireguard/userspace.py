"""The userspace backend: one supervised `wireguard-go -f IFACE` per device, configured over UAPI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path

from appliance.dataplane.wireguard import links, sockbuf
from appliance.dataplane.wireguard.backend import Backend, BackendError, DeviceConfig
from appliance.dataplane.wireguard.uapi import (
    SOCKET_DIR,
    PeerStats,
    UapiError,
    get_device,
    peer_stats,
    set_device,
    socket_path,
)

START_TIMEOUT = 5.0
STOP_TIMEOUT = 3.0
STALE_SOCKET_AGE = 30.0  # seconds


def uapi_items(config: DeviceConfig) -> list[tuple[str, str]]:
    """The `set=1` lines for `config` (hex keys; the peer replaces any other)."""
    items = [("private_key", config.private_key.hex()), ("listen_port", str(config.listen_port))]
    items.append(("replace_peers", "true"))
    peer = config.peer
    if peer is not None:
        items += [("public_key", peer.public_key.hex()), ("preshared_key", peer.preshared_key.hex())]
        if peer.endpoint is not None:
            host, port = peer.endpoint
            items.append(("endpoint", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
        items.append(("persistent_keepalive_interval", str(peer.keepalive)))
        items.append(("replace_allowed_ips", "true"))
        items += [("allowed_ip", cidr) for cidr in peer.allowed_ips]
    return items


class UserspaceBackend(Backend):
    name = "userspace"

    def __init__(self, binary: str = "wireguard-go", log_dir: Path | None = None) -> None:
        self._binary = binary
        self._log_dir = log_dir
        self._procs: dict[str, asyncio.subprocess.Process] = {}

    async def create(self, ifname: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            socket_path(ifname).unlink()
        log = self._log_file(ifname)
        out = log.open("wb") if log else None
        try:
            proc = await asyncio.create_subprocess_exec(
                self._binary,
                "-f",
                ifname,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out or asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.STDOUT,
                # Its own session: signals meant for the appliance's group must not stop the tunnel.
                start_new_session=True,
                env={**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"},
            )
        except OSError as exc:
            raise BackendError(f"cannot start {self._binary}: {exc.strerror}") from None
        finally:
            if out:
                out.close()
        self._procs[ifname] = proc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        # Ready when the socket answers: it exists a moment before wireguard-go listens on it.
        while not _answers(ifname):
            if proc.returncode is not None or loop.time() > deadline:
                await self.destroy(ifname)
                raise BackendError(f"wireguard-go could not create {ifname}: {self._last_line(ifname)}")
            await asyncio.sleep(0.01)

    def configure(self, ifname: str, config: DeviceConfig) -> None:
        try:
            set_device(ifname, uapi_items(config))
        except UapiError as exc:
            raise BackendError(str(exc)) from None
        self._widen_buffers(ifname)

    def _widen_buffers(self, ifname: str) -> None:
        """Setting the listen port has just bound new UDP sockets at the kernel's default buffer size,
        too small for wireguard-go (see sockbuf.py); best effort: the tunnel works without."""
        proc = self._procs.get(ifname)
        if proc is None or proc.returncode is not None:
            return
        try:
            sockbuf.widen(proc.pid)
        except OSError as exc:
            links.warn_once(
                "sockbuf",
                f"cannot widen wireguard-go's UDP buffers ({exc.strerror or exc}); throughput may suffer",
            )

    def stats(self, ifname: str) -> PeerStats:
        try:
            return peer_stats(get_device(ifname))
        except UapiError as exc:
            raise BackendError(str(exc)) from None

    async def destroy(self, ifname: str) -> None:
        proc = self._procs.pop(ifname, None)
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await _kill_strays(ifname)
        links.delete(ifname)
        with contextlib.suppress(FileNotFoundError):
            socket_path(ifname).unlink()
        log = self._log_file(ifname)
        if log:
            log.unlink(missing_ok=True)

    async def wait_failed(self, ifname: str) -> str:
        proc = self._procs.get(ifname)
        if proc is None:
            return "wireguard-go is not running"
        code = await proc.wait()
        return f"wireguard-go exited with status {code}: {self._last_line(ifname)}"

    async def sweep(self, prefix: str, keep: set[str]) -> list[str]:
        found = {name for _, name in _wireguard_go_processes() if name.startswith(prefix)}
        found |= set(links.names(prefix))
        if socket_path("x").parent.is_dir():
            found |= {p.name[:-5] for p in socket_path("x").parent.glob(f"{prefix}*.sock")}
        stale = sorted(found - keep)
        for name in stale:
            await self.destroy(name)
        _remove_dead_sockets()
        return stale

    def _log_file(self, ifname: str) -> Path | None:
        return self._log_dir / f"{ifname}.log" if self._log_dir else None

    def _last_line(self, ifname: str) -> str:
        log = self._log_file(ifname)
        lines = log.read_text(errors="replace").strip().splitlines() if log and log.exists() else []
        return lines[-1] if lines else "no output"


def _remove_dead_sockets(prefix: str = "ssw") -> None:
    """Removes UAPI sockets nobody listens on any more (wireguard-go killed with SIGKILL leaves them),
    whichever appliance made them: a socket that refuses connections is dead for everyone."""
    for path in SOCKET_DIR.glob(f"{prefix}*.sock"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime < STALE_SOCKET_AGE:
                continue  # perhaps a wireguard-go between bind() and listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def _answers(ifname: str) -> bool:
    if not socket_path(ifname).exists():
        return False
    try:
        get_device(ifname, timeout=1.0)
    except UapiError:
        return False
    return True


def _wireguard_go_processes() -> list[tuple[int, str]]:
    """(pid, interface) of every `wireguard-go -f IFACE` on this host (any namespace)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 3 and os.path.basename(argv[0]) == b"wireguard-go" and argv[1] == b"-f":
            found.append((int(entry.name), argv[2].decode(errors="replace")))
    return found


async def _kill_strays(ifname: str) -> None:
    """Kills a wireguard-go left for `ifname` by an earlier appliance process (e.g. after SIGKILL)."""
    pids = [pid for pid, name in _wireguard_go_processes() if name == ifname]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(int(STOP_TIMEOUT / 0.05)):
            # A killed process's cmdline reads empty (zombie), so it no longer matches.
            if not any(name == ifname for _, name in _wireguard_go_processes()):
                return
            await asyncio.sleep(0.05)
