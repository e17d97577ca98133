"""free_port never hands out a port that a default Ray instance binds."""

import socket

from spatialrl import ports


class KernelHandingOut:
    """Stands in for socket.socket: bind(port 0) gets the next of `handed` in turn."""

    def __init__(self, handed: list[int], opened: list):
        self.handed, self.opened, self.port, self.closed = handed, opened, None, False
        opened.append(self)

    def bind(self, address):
        assert address[1] == 0
        self.port = self.handed.pop(0)

    def getsockname(self):
        return ("127.0.0.1", self.port)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed = True


def test_a_ray_default_port_is_refused_and_held_until_another_is_chosen(monkeypatch):
    handed, opened = [52365, 8265, 40123], []
    monkeypatch.setattr(ports.socket, "socket", lambda: KernelHandingOut(handed, opened))
    assert ports.free_port() == 40123
    assert [s.port for s in opened] == [52365, 8265, 40123]
    assert all(s.closed for s in opened)  # every socket released once the choice is made


def test_a_free_port_can_be_bound():
    port = ports.free_port()
    assert port not in ports.RAY_DEFAULT_PORTS
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
