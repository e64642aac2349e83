"""A configuration file parsed once and re-parsed whenever it changes on disk.

Operators edit token and key files while the appliance runs; a stat per call is cheap next to a gRPC
round trip, so every lookup checks whether the file changed instead of relying on a watcher thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import structlog

from appliance.errors import ApplianceError, InvalidArgument, Unavailable

log = structlog.get_logger(__name__)

T = TypeVar("T")

# (device, inode, size, mtime): os.replace gives a new inode, so even a rewrite within the
# filesystem's timestamp granularity is noticed.
_Stamp = tuple[int, int, int, int]


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class WatchedFile(Generic[T]):
    """The parsed contents of `path`, reloaded when the file changes.

    `parse(path, data)` raises InvalidArgument for bad contents. At construction a missing or bad file
    raises InvalidArgument (a configuration error). Later, a file that fails to parse keeps the previous
    contents (an operator mid-edit must not lock everyone out) and is logged; a file that disappears
    fails closed with Unavailable.
    """

    def __init__(self, path: Path, parse: Callable[[Path, bytes], T]) -> None:
        self.path = path
        self._parse = parse
        try:
            self._stamp, self._value = self._load()
        except OSError as exc:
            raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from None

    def current(self) -> T:
        """The contents as of now (reloaded if the file changed since the last call)."""
        try:
            changed = _stamp(os.stat(self.path)) != self._stamp
        except FileNotFoundError:
            log.error("auth file missing, refusing all calls", path=str(self.path))
            raise Unavailable("authentication is unavailable") from None
        if changed:
            self._reload()
        return self._value

    def _reload(self) -> None:
        try:
            self._stamp, self._value = self._load()
        except (OSError, ApplianceError) as exc:
            reason = exc.message if isinstance(exc, ApplianceError) else exc.strerror
            log.error("auth file reload failed, keeping previous contents", path=str(self.path), error=reason)
            return
        log.info("auth file reloaded", path=str(self.path))

    def _load(self) -> tuple[_Stamp, T]:
        # Stamp and contents come from the same open file, so a concurrent replace is seen next call.
        with open(self.path, "rb") as f:
            stamp = _stamp(os.fstat(f.fileno()))
            data = f.read()
        return stamp, self._parse(self.path, data)
