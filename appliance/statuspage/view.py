"""What the status page's data endpoint returns: the live sessions a principal may see, as JSON."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from appliance.auth import Principal
from appliance.sessions.model import Session
from appliance.statuspage.history import ThroughputHistory


def session_view(session: Session, history: ThroughputHistory) -> dict[str, Any]:
    """One row of the page. Times are Unix seconds; the page shows them relative to `now` of the
    snapshot, so a browser with a wrong clock still shows the right age and lease."""
    rates = history.rates(session.session_id)
    latest = rates[-1] if rates else None
    return {
        "session_id": session.session_id,
        "side": session.side.value,
        "mode": session.mode.value,
        "protocol": session.protocol.value,
        "state": session.state.value,
        "destinations": [str(a) for a in session.destinations],
        "entry_points": [str(a) for a in session.entry_points],
        "data_endpoints": [str(a) for a in session.data_endpoints],
        "created_at": session.created_at,
        "expires_at": session.expires_at,
        "bytes_in": session.bytes_in,
        "bytes_out": session.bytes_out,
        "bps_in": latest.bps_in if latest else 0.0,
        "bps_out": latest.bps_out if latest else 0.0,
        # Oldest first: [Unix time, bits/s in, bits/s out].
        "throughput": [[r.at, round(r.bps_in), round(r.bps_out)] for r in rates],
    }


def snapshot(
    principal: Principal, visible: Iterable[Session], history: ThroughputHistory, now: float
) -> dict[str, Any]:
    """The page's data for `principal`: the live (not ended) ones of `visible`, the sessions the
    session manager lets it see (as `scistream ls` does: its own, or all of them for an admin)."""
    return {
        "now": now,
        "subject": principal.subject,
        "sessions": [session_view(s, history) for s in visible if not s.ended],
    }
