"""The status page: a read-only web page of the sessions a user may see, with live throughput.

Off by default (`--status-port`); same authenticator and ownership rule as the gRPC API; TLS with the
control certificate unless the appliance runs `--insecure`.
"""

from appliance.statuspage.app import DATA_PATH, PAGE_PATH, StatusPage, http_context

__all__ = ["DATA_PATH", "PAGE_PATH", "StatusPage", "http_context"]
