"""Sans-I/O reassembly of UDP datagrams that crossed the relay as fragments (see framing.py).

Time is passed in, so the behaviour is deterministic. Memory stays bounded three ways: an
incomplete datagram is dropped `timeout` seconds after its first fragment arrived, one flow holds
at most `max_pending_per_flow` incomplete datagrams, and all of them together at most `max_bytes`;
when a bound is reached the oldest incomplete datagram goes first. As with UDP itself, a datagram
missing one fragment is lost as a whole.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .errors import FramingError
from .framing import MAX_UDP_PAYLOAD, DatagramFragment, DatagramFrame, decode_datagram

REASSEMBLY_TIMEOUT = 2.0  # seconds; far above any RTT a fragment's siblings may lag behind by
MAX_PENDING_PER_FLOW = 64
MAX_PENDING_BYTES = 8 * 1024 * 1024
# Bookkeeping charged per held fragment on top of its bytes, so that many tiny fragments from a
# misbehaving peer are bounded too.
FRAGMENT_COST = 64

_Key = tuple[int, int]  # (flow id, datagram sequence number)


@dataclass
class ReassemblyDrops:
    """What a Reassembler discarded, by reason."""

    invalid: int = 0  # frames that do not parse
    duplicate: int = 0  # fragments already held
    inconsistent: int = 0  # datagrams whose fragments disagree or add up to more than UDP allows
    expired: int = 0  # datagrams still incomplete after the timeout
    evicted: int = 0  # incomplete datagrams pushed out by a memory bound or a forgotten flow

    @property
    def total(self) -> int:
        return self.invalid + self.duplicate + self.inconsistent + self.expired + self.evicted


@dataclass
class _Partial:
    dest_index: int
    count: int
    deadline: float
    fragments: dict[int, bytes] = field(default_factory=dict)
    size: int = 0  # payload bytes held
    cost: int = 0  # what it counts against max_bytes


class Reassembler:
    """Turns received DATAGRAM frame payloads back into whole UDP datagrams.

    `now` must not go backwards between calls (use a monotonic clock).
    """

    def __init__(
        self,
        *,
        timeout: float = REASSEMBLY_TIMEOUT,
        max_pending_per_flow: int = MAX_PENDING_PER_FLOW,
        max_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self.timeout = timeout
        self.max_pending_per_flow = max_pending_per_flow
        self.max_bytes = max_bytes
        self.drops = ReassemblyDrops()
        self._by_age: OrderedDict[_Key, _Partial] = OrderedDict()  # oldest first
        self._by_flow: dict[int, OrderedDict[int, _Partial]] = {}  # flow id -> seq -> partial
        self._bytes = 0

    @property
    def pending(self) -> int:
        """Incomplete datagrams held."""
        return len(self._by_age)

    @property
    def pending_bytes(self) -> int:
        """What the incomplete datagrams count against `max_bytes`."""
        return self._bytes

    def receive(self, data: bytes, now: float) -> DatagramFrame | None:
        """Take one DATAGRAM frame payload; return the datagram it carries or completes, if any."""
        self.expire(now)
        try:
            frame = decode_datagram(data)
        except FramingError:
            self.drops.invalid += 1
            return None
        if isinstance(frame, DatagramFrame):
            return frame
        return self._add(frame, now)

    def expire(self, now: float) -> None:
        """Drop incomplete datagrams whose first fragment is more than `timeout` seconds old."""
        while self._by_age:
            key, partial = next(iter(self._by_age.items()))
            if partial.deadline > now:
                return
            self._remove(key)
            self.drops.expired += 1

    def forget_flow(self, flow_id: int) -> None:
        """Drop the incomplete datagrams of a flow that is gone."""
        for seq in list(self._by_flow.get(flow_id, ())):
            self._remove((flow_id, seq))
            self.drops.evicted += 1

    def clear(self) -> None:
        """Drop every incomplete datagram (e.g. the connection that carried them ended)."""
        for key in list(self._by_age):
            self._remove(key)
            self.drops.evicted += 1

    def _add(self, fragment: DatagramFragment, now: float) -> DatagramFrame | None:
        key = (fragment.flow_id, fragment.seq)
        partial = self._by_age.get(key)
        if partial is None:
            partial = self._start(key, fragment, now)
        elif partial.count != fragment.count or partial.dest_index != fragment.dest_index:
            self._remove(key)
            self.drops.inconsistent += 1
            return None
        if fragment.index in partial.fragments:
            self.drops.duplicate += 1
            return None
        if partial.size + len(fragment.payload) > MAX_UDP_PAYLOAD:
            self._remove(key)
            self.drops.inconsistent += 1
            return None
        partial.fragments[fragment.index] = fragment.payload
        partial.size += len(fragment.payload)
        partial.cost += len(fragment.payload) + FRAGMENT_COST
        self._bytes += len(fragment.payload) + FRAGMENT_COST
        if len(partial.fragments) == partial.count:
            self._remove(key)
            payload = b"".join(partial.fragments[index] for index in range(partial.count))
            return DatagramFrame(fragment.flow_id, partial.dest_index, payload)
        while self._bytes > self.max_bytes:
            self._remove(next(iter(self._by_age)))
            self.drops.evicted += 1
        return None

    def _start(self, key: _Key, fragment: DatagramFragment, now: float) -> _Partial:
        flow = self._by_flow.setdefault(fragment.flow_id, OrderedDict())
        if len(flow) >= self.max_pending_per_flow:
            self._remove((fragment.flow_id, next(iter(flow))))
            self.drops.evicted += 1
            flow = self._by_flow.setdefault(fragment.flow_id, OrderedDict())
        partial = _Partial(fragment.dest_index, fragment.count, now + self.timeout)
        self._by_age[key] = partial
        flow[fragment.seq] = partial
        return partial

    def _remove(self, key: _Key) -> None:
        partial = self._by_age.pop(key)
        self._bytes -= partial.cost
        flow_id, seq = key
        flow = self._by_flow[flow_id]
        del flow[seq]
        if not flow:
            del self._by_flow[flow_id]
