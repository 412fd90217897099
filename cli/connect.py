"""Connect a run's hosts in parallel, each whole connection (name resolution included) timed."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyinfra.api import Host, State, StringCommand
    from pyinfra.connectors.util import CommandOutput

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Host data: why the host cannot be reached, known before trying (a Proxmox VE cluster member
# pve-cluster lists offline, cli/cluster.py). It is not connected to; this is its reason.
UNREACHABLE_DATA = "ksm_unreachable"


def one_line(text: str) -> str:
    """``text`` without ANSI colour, its lines and runs of spaces joined by single spaces."""
    return " ".join(_ANSI.sub("", text).split())


def connect_hosts(state: State, hosts: list[Host], timeout: float) -> dict[str, str]:
    """
    Connect ``hosts`` at once (at most the State's PARALLEL) and activate those that connected.
    Each host gets ``timeout`` seconds from its first step, name resolution included, to login.

    Returns why each other host failed, by name: pyinfra's connect error on one line, or
    ``timed out after 10 s (connect, name resolution included)``, or the host's own
    ``ksm_unreachable`` data (it is not tried).
    """
    import gevent
    from pyinfra import logger
    from pyinfra.api.exceptions import PyinfraError

    _room_for_stuck_lookups(len(hosts))

    def attempt(host: Host) -> str | None:
        timer = gevent.Timeout(timeout)
        timer.start()  # here, not at spawn: waiting for a free slot in the pool is not counted
        try:
            host.connect(raise_exceptions=True)  # pyinfra logs a ConnectError itself
        except gevent.Timeout as expired:
            if expired is not timer:
                raise
            _drop_half_open(host)
            reason = f"timed out after {timeout:g} s (connect, name resolution included)"
            host.log(reason, log_func=logger.error)
            return reason
        except PyinfraError as error:  # ConnectError, or an unreadable key file
            return one_line(str(error.args[0] if error.args else error)) or type(error).__name__
        except Exception as error:  # one host's surprise must not end the whole run
            reason = one_line(f"{type(error).__name__}: {error}")
            host.log(reason, log_func=logger.error)
            return reason
        finally:
            timer.close()
        return None if host.connected else "could not connect"

    failed: dict[str, str] = {
        host.name: str(host.data.get(UNREACHABLE_DATA))
        for host in hosts
        if host.data.get(UNREACHABLE_DATA)
    }
    tried = [host for host in hosts if host.name not in failed]
    attempts = [(host, state.pool.spawn(attempt, host)) for host in tried]
    gevent.joinall([greenlet for _, greenlet in attempts])
    for host, greenlet in attempts:
        reason = greenlet.get()  # re-raises what is not a host's failure (Ctrl-C)
        if reason is None:
            state.activate_host(host)
        else:
            failed[host.name] = reason
    return failed


def _room_for_stuck_lookups(count: int) -> None:
    """
    Let gevent's resolver threads outnumber the hosts. A timed-out name lookup is abandoned, not
    stopped: its thread stays blocked in getaddrinfo() until the resolver gives up (resolv.conf's
    timeout x attempts, up to minutes). With gevent's default of 10 threads, ten dead lookups
    would starve every later host, even one listed in /etc/hosts, into a timeout of its own.
    Threads are started only when a lookup waits for one, so the higher cap costs nothing.
    """
    import gevent

    pool = gevent.get_hub().threadpool
    pool.maxsize = max(pool.maxsize, count + 10)


def _drop_half_open(host: Host) -> None:
    """Close what a timed-out SSH connect left open: its socket and paramiko's transport."""
    client = getattr(host.connector, "client", None)
    if client is not None:
        client.close()


def run_command(state: State, host: Host, command: StringCommand) -> tuple[bool, CommandOutput]:
    """Run ``command`` on a connected host with its own global arguments (sudo, su, shell...)."""
    from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
    from pyinfra.context import ctx_host, ctx_state

    with ctx_state.use(state), ctx_host.use(host):
        arguments, _ = pop_global_arguments(state, host, {})
        connector_arguments = {
            key: value for key, value in arguments.items() if key in CONNECTOR_ARGUMENT_KEYS
        }
        return host.run_shell_command(command, **connector_arguments)
