"""The control port's request decoder: valid bodies decode as before, anything else is refused."""

import pytest

from appliance.api.scistream import v1 as api
from appliance.control.edge import MAX_ITEMS, decode
from appliance.errors import InvalidArgument


def test_valid_requests_decode_unchanged() -> None:
    request = api.JoinSessionRequest(ticket="sst1.a.b", entry_ports=[5000, 5001], bind_host="0.0.0.0")
    assert decode(bytes(request), api.JoinSessionRequest) == request


def test_a_repeated_scalar_may_come_packed_or_one_by_one() -> None:
    packed = b"\x12\x02\x01\x02"  # entry_ports = [1, 2], packed
    unpacked = b"\x10\x01\x10\x02"
    assert decode(packed, api.JoinSessionRequest).entry_ports == [1, 2]
    assert decode(unpacked, api.JoinSessionRequest).entry_ports == [1, 2]


def test_unknown_fields_are_skipped() -> None:
    assert (
        decode(b"\xf8\x01\x05" + bytes(api.GetSessionRequest("s")), api.GetSessionRequest).session_id == "s"
    )


def test_nested_messages_are_checked_too() -> None:
    wireguard = b"\x4a\x02\x08\x01"  # JoinRequest.wireguard with public_key (bytes) sent as a varint
    with pytest.raises(InvalidArgument, match="public_key"):
        decode(wireguard, api.JoinRequest)


@pytest.mark.parametrize(
    "body",
    [b"\x0a\x05ab", b"\x08", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x00\x01", b"\x0f"],
    ids=["truncated-length", "truncated-varint", "varint-over-64-bits", "field-zero", "wire-type-7"],
)
def test_malformed_bodies_are_invalid_argument(body: bytes) -> None:
    with pytest.raises(InvalidArgument):
        decode(body, api.GetSessionRequest)


def test_too_many_items_are_invalid_argument() -> None:
    body = bytes(api.CreateSessionRequest(destinations=["a:1"] * (MAX_ITEMS + 1)))
    with pytest.raises(InvalidArgument, match="destinations"):
        decode(body, api.CreateSessionRequest)
