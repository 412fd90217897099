"""Connect to hosts with the whole connection bounded by one timeout (interim version)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyinfra.api import Host, State

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def connect_hosts(state: State, hosts: list[Host], timeout: float) -> dict[str, str]:
    """Connect ``hosts`` in parallel; the one-line reason for each that could not be reached."""
    import gevent
    from pyinfra.api import BaseStateCallback

    errors: dict[str, str] = {}

    class Errors(BaseStateCallback):
        @staticmethod
        def host_connect_error(state: Any, host: Any, error: Any) -> None:
            text = str(error.args[0] if getattr(error, "args", None) else error)
            errors[host.name] = " ".join(_ANSI.sub("", text).split())

    state.add_callback_handler(Errors())

    def connect_one(host: Host) -> None:
        try:
            with gevent.Timeout(timeout, TimeoutError):
                host.connect(show_errors=False)
        except TimeoutError:
            errors.setdefault(host.name, f"timed out after {timeout:g} s")
        if host.connected:
            state.activate_host(host)
        else:
            errors.setdefault(host.name, "could not connect")

    gevent.joinall([state.pool.spawn(connect_one, host) for host in hosts])
    return errors
