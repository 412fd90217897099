"""Loopback helpers shared by the benchmark and the tests: free ports and SSH banners.

Standard library only, so that the unit tests, the VM harness and ``bench`` can all import it
cheaply. It lives under ``bench/`` because ``bench`` never imports ``tests`` (the tests may
import the repository's tools, not the other way round).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

_port_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def free_port() -> int:
    """Return a 127.0.0.1 TCP port that nothing listens on, never the same one twice."""
    with _port_lock:
        for _ in range(100):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise OSError("no free local port found")


def wait_for_ssh_banner(
    port: int,
    timeout: float,
    *,
    check: Callable[[], None] | None = None,
    host: str = "127.0.0.1",
    interval: float = 0.05,
) -> None:
    """Return once the server on ``host:port`` sends its ``SSH-`` banner.

    Reading the banner, not just connecting, matters: QEMU's user network accepts connections
    before the guest's sshd is up. ``check`` runs before every attempt and raises when waiting is
    pointless (the server's process has exited). Raises ``TimeoutError`` after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        with (
            contextlib.suppress(OSError),
            socket.create_connection((host, port), timeout=1) as conn,
        ):
            conn.settimeout(1)
            if conn.recv(8).startswith(b"SSH-"):
                return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no SSH banner from {host}:{port} within {timeout:.0f} s")
        time.sleep(interval)
