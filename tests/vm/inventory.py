"""pyinfra inventories of guests (and of addresses where nothing answers)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bench.netutil import free_port
from tests.localssh import ssh_data
from tests.vm.cache import ensure_key
from tests.vm.guest import Guest, HostEntry


def unreachable_host(name: str = "dead") -> HostEntry:
    """Return an inventory entry pointing at a local port where nothing listens."""
    return (name, ssh_data(free_port(), ensure_key()))


def write_inventory(
    path: Path, entries: Iterable[Guest | HostEntry], extra_hosts: Iterable[HostEntry] = ()
) -> Path:
    """Write a pyinfra inventory module with one list ``guests`` of (name, data) tuples."""
    hosts = [e.pyinfra_host() if isinstance(e, Guest) else e for e in entries]
    hosts += list(extra_hosts)
    names = [name for name, _ in hosts]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate host names in inventory: {names}")
    lines = [f"    ({name!r}, {dict(sorted(data.items()))!r})," for name, data in hosts]
    path = Path(path)
    path.write_text(
        '"""pyinfra inventory written by ksm-guard\'s VM test harness."""\n\n'
        "guests = [\n" + "\n".join(lines) + "\n]\n"
    )
    return path
