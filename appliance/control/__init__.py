"""grpclib services (Control, Peer, health, reflection), the server, and clients of other appliances."""
