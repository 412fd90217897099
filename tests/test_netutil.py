"""bench.netutil: the one SSH-banner wait and free-port helper of the tests, the VMs and bench."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bench.netutil import free_port, wait_for_ssh_banner
from tests.localssh import silent_listener


@pytest.fixture
def banner_server() -> Iterator[int]:
    """A loopback port that greets every connection with an SSH banner."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-ksm-guard-test\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    done.set()
    thread.join(timeout=5)
    listener.close()


def test_banner_wait_returns_on_the_banner(banner_server: int) -> None:
    """A server that sends ``SSH-`` is ready at once."""
    start = time.monotonic()
    wait_for_ssh_banner(banner_server, 5.0)
    assert time.monotonic() - start < 2


def test_banner_wait_times_out_on_a_server_that_accepts_but_stays_silent() -> None:
    """Accepting is not enough (QEMU's user network accepts before the guest is up)."""
    with silent_listener() as listener:
        port = int(listener.getsockname()[1])
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
            wait_for_ssh_banner(port, 1.5)
    assert 1.5 <= time.monotonic() - start < 5


def test_banner_wait_stops_when_the_check_raises() -> None:
    """``check`` ends the wait early: the server's process is gone."""

    def check() -> None:
        raise RuntimeError("sshd exited")

    with pytest.raises(RuntimeError, match="sshd exited"):
        wait_for_ssh_banner(free_port(), 60.0, check=check)


def test_free_port_never_hands_out_a_port_twice() -> None:
    """Ports handed out in this process are distinct, even once their probe socket is closed."""
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
