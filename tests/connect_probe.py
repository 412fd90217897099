"""
``python -m tests.connect_probe SPEC``: call ``ksm_guard.cli.connect.connect_hosts`` in a
process patched by gevent, as the ``ksm-guard`` console script is; print what came of it as
JSON.

SPEC is JSON: ``{"hosts": [[name, data], ...], "timeout": 2, "parallel": 0}``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Connect the hosts of ``spec``; report the failures, the activated hosts and the time."""
    from gevent import monkey

    monkey.patch_all()
    from pyinfra.api import Config, Inventory, State

    from ksm_guard.cli.connect import connect_hosts

    entries = [(name, data) for name, data in spec["hosts"]]
    inventory = Inventory((entries, {}))
    state = State(check_for_changes=True)
    state.init(inventory, Config(PARALLEL=spec.get("parallel", 0)))
    hosts = [inventory.get_host(name) for name, _ in entries]
    started = time.monotonic()
    failed = connect_hosts(state, hosts, spec["timeout"])
    seconds = time.monotonic() - started
    return {
        "failed": failed,
        "active": sorted(host.name for host in state.active_hosts),
        "connected": sorted(host.name for host in hosts if host.connected),
        "seconds": seconds,
    }


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
