"""Traffic counters exposed by both relay sides."""

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Counters:
    """Byte and connection counts of one relay side, as seen by its local apps."""

    bytes_in: int = 0  # received from local apps (entry point / destination sockets)
    bytes_out: int = 0  # delivered to local apps
    connections: int = 0  # TCP connections / UDP flows opened so far
    active: int = 0  # currently open
    dropped_datagrams: int = 0  # undecodable, unroutable, incomplete or unqueueable datagrams
    # Called when a connection or flow closes: a process reporting these counters elsewhere reports
    # then, so a transfer that just ended is counted in full by whoever asks next.
    on_closed: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def opened(self) -> None:
        self.connections += 1
        self.active += 1

    def closed(self) -> None:
        self.active -= 1
        if self.on_closed is not None:
            self.on_closed()
