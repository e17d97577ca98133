"""Free ports on this machine, for the processes the project starts (learner rendezvous,
local Ray heads, HTTP services)."""

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now ("" for every interface)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
