"""Free ports on this machine, for the processes the project starts (learner rendezvous,
local Ray heads, HTTP services)."""

import socket
from contextlib import ExitStack

# Fixed ports that a Ray instance started with its defaults binds (the GCS, the dashboard and
# its agent, the client server, Serve's HTTP and gRPC proxies). A port handed out here must
# not be one of them: a CI run failed when free_port() gave 52365 to a Serve proxy and the
# dashboard agent of a default `ray.init()` took it first.
RAY_DEFAULT_PORTS = frozenset({6379, 8000, 8265, 9000, 10001, 52365})


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now ("" for every interface), never one of
    RAY_DEFAULT_PORTS. Refused ports stay bound until the choice is made, so the kernel
    cannot hand the same one out again."""
    with ExitStack() as held:
        while True:
            sock = held.enter_context(socket.socket())
            sock.bind((host, 0))
            port = sock.getsockname()[1]
            if port not in RAY_DEFAULT_PORTS:
                return port
