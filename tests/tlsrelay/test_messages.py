"""What the control process tells a relay process survives the trip as JSON."""

from __future__ import annotations

import socket

from appliance.dataplane.tlsrelay import messages
from appliance.dataplane.tlsrelay.sessions import ConsumerSpec, ProducerSpec
from appliance.dataplane.tlsrelay.wire import Kind


def test_producer_spec_round_trips() -> None:
    spec = ProducerSpec("s", b"cert\n", b"key\n", (("127.0.0.1", 5201), ("::1", 80)), b"peer", 5.0)
    assert messages.spec_from_json(ProducerSpec, messages.spec_to_json(spec)) == spec


def test_consumer_spec_round_trips() -> None:
    spec = ConsumerSpec("s", b"c", b"k", b"p", "x.session.scistream", ("10.0.0.1", 5100), Kind.UDP, (0, 1, 0))
    assert messages.spec_from_json(ConsumerSpec, messages.spec_to_json(spec)) == spec


def test_a_message_carries_its_sockets() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    passed = socket.socket()
    try:
        messages.send(ours, {"op": "x"}, [passed.fileno()])
        received = messages.receive(theirs)
        assert received is not None
        message, fds = received
        assert message == {"op": "x"} and len(fds) == 1
        socket.socket(fileno=fds[0]).close()
        ours.close()
        assert messages.receive(theirs) is None  # end of stream: the other side closed
    finally:
        passed.close()
        theirs.close()
