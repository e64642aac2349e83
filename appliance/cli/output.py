"""What the CLI prints: the JSON objects of the contract (DESIGN.md §5), or lines for people."""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

import click

from appliance.api.scistream import v1 as api


def _name(value: int) -> str:
    """Enum value as printed: `quic`, `tcp`, `producer`; betterproto enums carry their name."""
    return str(getattr(value, "name", value)).lower()


def _time(value: Any) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else ""


def session_json(session: api.Session) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "side": _name(session.side),
        "mode": _name(session.mode),
        "protocol": _name(session.protocol),
        "state": _name(session.state).upper(),
        "destinations": list(session.destinations),
        "entry_points": list(session.entry_points),
        "data_endpoints": list(session.data_endpoints),
        "bytes_in": session.bytes_in,
        "bytes_out": session.bytes_out,
        "created_at": _time(session.created_at),
        "expires_at": _time(session.expires_at),
        "num_conn": session.num_conn,
        "rate_bps": session.rate_bps,
        "owner": session.owner,
        "peer": session.peer,
        "reason": session.reason,
        "packet_size": session.packet_size,
    }


def inbound_json(reply: api.CreateSessionResponse) -> dict[str, Any]:
    s = session_json(reply.session)
    keys = (
        "session_id",
        "mode",
        "protocol",
        "state",
        "destinations",
        "data_endpoints",
        "num_conn",
        "expires_at",
    )
    return {"session_id": s["session_id"], "ticket": reply.ticket, **{k: s[k] for k in keys[1:]}}


def outbound_json(session: api.Session) -> dict[str, Any]:
    s = session_json(session)
    keys = ("session_id", "mode", "protocol", "state", "entry_points", "destinations", "expires_at")
    return {k: s[k] for k in keys}


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def describe(session: api.Session) -> list[str]:
    """A session for people, in the vocabulary: destination, entry point, data endpoint."""
    s = session_json(session)
    lines = [f"Session {s['session_id']}: {s['state']} ({s['side']} side, {s['mode']}, {s['protocol']})"]
    if s["destinations"]:
        lines.append(f"  destinations:   {', '.join(s['destinations'])}")
    if s["entry_points"]:
        lines.append(f"  entry points:   {', '.join(s['entry_points'])}")
    if s["data_endpoints"]:
        lines.append(f"  data endpoints: {', '.join(s['data_endpoints'])}")
    lines.append(f"  traffic:        {s['bytes_in']} bytes in, {s['bytes_out']} bytes out")
    if s["packet_size"]:
        lines.append(f"  packet size:    {s['packet_size']} bytes (QUIC, path MTU discovery)")
    lines.append(f"  owner:          {s['owner']}")
    lines.append(f"  expires:        {s['expires_at']}")
    if s["peer"]:
        lines.append(f"  peer appliance: {s['peer']}")
    if s["reason"]:
        lines.append(f"  reason:         {s['reason']}")
    return lines
