"""Exception types raised by quic_relay."""


class RelayError(Exception):
    """A relay could not be started or its QUIC connection failed."""


class FramingError(RelayError):
    """Bytes on a stream or in a datagram do not follow the relay framing."""
