"""Conversions between the session model and the generated API messages."""

from __future__ import annotations

from datetime import UTC, datetime

from appliance.api.scistream import v1 as api
from appliance.errors import InvalidArgument
from appliance.sessions.model import Mode, Protocol, Session, Side, State

# By name, so both sides stay in step with the proto without repeating numbers.
_MODES_API: dict[Mode, api.Mode] = {m: api.Mode[m.name] for m in Mode}
_MODES = {v: k for k, v in _MODES_API.items()}
_PROTOCOLS_API: dict[Protocol, api.Protocol] = {p: api.Protocol[p.name] for p in Protocol}
_PROTOCOLS = {v: k for k, v in _PROTOCOLS_API.items()}
_STATES: dict[State, api.State] = {s: api.State[s.name] for s in State}
_SIDES: dict[Side, api.Side] = {s: api.Side[s.name] for s in Side}


def mode_from_api(value: api.Mode, default: Mode = Mode.QUIC) -> Mode:
    if value == 0:  # unset
        return default
    if value not in _MODES:
        raise InvalidArgument(f"unknown mode {int(value)}")
    return _MODES[value]


def protocol_from_api(value: api.Protocol) -> Protocol:
    if value == 0:  # unset
        return Protocol.TCP
    if value not in _PROTOCOLS:
        raise InvalidArgument(f"unknown protocol {int(value)}")
    return _PROTOCOLS[value]


def mode_to_api(mode: Mode) -> api.Mode:
    return _MODES_API[mode]


def protocol_to_api(protocol: Protocol) -> api.Protocol:
    return _PROTOCOLS_API[protocol]


def _time(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def session_to_api(session: Session) -> api.Session:
    return api.Session(
        session_id=session.session_id,
        side=_SIDES[session.side],
        mode=mode_to_api(session.mode),
        protocol=protocol_to_api(session.protocol),
        state=_STATES[session.state],
        destinations=[str(a) for a in session.destinations],
        entry_points=[str(a) for a in session.entry_points],
        data_endpoints=[str(a) for a in session.data_endpoints],
        bytes_in=session.bytes_in,
        bytes_out=session.bytes_out,
        created_at=_time(session.created_at),
        expires_at=_time(session.expires_at),
        num_conn=session.num_conn,
        rate_bps=session.rate_bps,
        owner=session.owner,
        reason=session.reason,
        peer=session.peer_address,
        packet_size=session.packet_size,
    )
