"""TLS mode's relay: TCP connections and UDP flows over TLS 1.3 connections with pinned certificates.

`wire` is the sans-I/O wire format, `contexts` the TLS settings, `relay` the asyncio protocols,
`worker` the relay process and `pool` the control process's supervisor of relay processes.
"""
