"""A small least-recently-used cache whose entries also expire: bounded in size and in age.

Sans-I/O: the caller passes the time in, so tests step through expiry without sleeping.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most `max_entries` values, each dropped at its own expiry time (or evicted earlier, least
    recently used first, to make room)."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> V | None:
        """The value stored under `key` if it has not expired by `now`, else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if now >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V, expires_at: float, now: float) -> None:
        """Stores `value` until `expires_at` (nothing is stored if that is not after `now`)."""
        self._entries.pop(key, None)
        if expires_at <= now:
            return
        self._entries[key] = (expires_at, value)
        if len(self._entries) > self.max_entries:
            # O(1): an expired entry left behind is as good as gone, and ages out of the order too.
            self._entries.popitem(last=False)
