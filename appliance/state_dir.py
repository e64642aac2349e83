"""The state directory: private to one user, and held by one appliance at a time.

Everything an appliance restores and sweeps on start (its SQLite store, certificates, WireGuard
state) lives here, so two appliances on one directory would restore, fail and sweep each other's
sessions. `claim_state_dir` therefore takes an exclusive `flock` on a lock file inside it before
anything else reads it, and keeps it for the life of the process: the kernel drops the lock when the
process ends, even on SIGKILL, so a stale lock never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import FailedPrecondition

LOCK_FILE = "appliance.lock"
# Only its owner may read the store (it holds session secrets) or list what is there.
MODE = 0o700


@dataclass
class StateDirLock:
    """The held lock on a state directory; `release()` it when the appliance stops."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1


def claim_state_dir(path: Path) -> StateDirLock:
    """Creates `path` (0700) or makes an existing one 0700, then locks it for this process.

    FailedPrecondition, with a message for one line, when the directory is open to others and not
    ours to change, or when another appliance holds it; in both cases nothing in it was touched.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=MODE)
        _make_private(path)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise FailedPrecondition(f"cannot use state directory {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise FailedPrecondition(
            f"state directory {path} is in use by another appliance{holder}; "
            "give each appliance its own --state-dir"
        ) from None
    # The holder's pid, for the message above and for operators; the lock itself is the flock.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateDirLock(path, fd)


def _make_private(path: Path) -> None:
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise FailedPrecondition(f"state directory {path} is not a directory")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077 == 0:
        return
    if info.st_uid != os.geteuid():
        raise FailedPrecondition(
            f"state directory {path} has mode {mode:04o} and belongs to uid {info.st_uid}, not to this "
            f"appliance (uid {os.geteuid()}); make it 0700 or choose another --state-dir"
        )
    os.chmod(path, MODE)


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (pid {pid})"
    return ""
