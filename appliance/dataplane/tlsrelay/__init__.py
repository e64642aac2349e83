"""TLS mode's relay: TCP connections and UDP flows over TLS 1.3 connections with pinned certificates.

`wire` is the sans-I/O wire format, `contexts` the TLS settings, `channel` one TLS connection (OpenSSL on
the socket, driven by the event loop), `relay` the pump of one TCP connection, `udp` datagram flows,
`sessions` one session's endpoint or entry points, `worker` the relay process and `pool` the control
process's supervisor of relay processes.
"""
