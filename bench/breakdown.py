"""Where an audit's time goes: interpreter start, imports, setup, SSH connect, the fact, our Python.

``python -m bench.breakdown INVENTORY PARALLEL ksm|command`` replays what ``ksm-guard audit``
does, through the same ``pyinfra.api`` calls and ``cli.engine``'s own gathering, and prints the
wall-clock time (``time.time()``) at the end of each stage as JSON; the parent, which started it
at a known time, turns those into durations. ``command`` gathers pyinfra's built-in
``server.Command`` fact with the same remote command instead (``get_facts``, as pyinfra's CLI
does), so the two differ only in the fact and in what is done with its output.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGES = ("interpreter", "imports", "setup", "connect", "fact", "processing", "disconnect", "exit")
REPO = Path(__file__).resolve().parents[1]


def _child(inventory_path: str, parallel: int, fact: str) -> None:
    marks = {"interpreter": time.time()}
    from gevent import monkey

    monkey.patch_all()  # as cli.main does before any pyinfra import
    from pyinfra.api import Config, State
    from pyinfra.api.connect import connect_all, disconnect_all
    from pyinfra.api.facts import get_facts
    from pyinfra.facts.server import Command

    from ksm_guard.cli import app, render  # noqa: F401  (the CLI imports them; so must we)
    from ksm_guard.cli.engine import HostResult, RunResult, read
    from ksm_guard.cli.inventory import make_inventory
    from ksm_guard.operations import modes  # noqa: F401
    from ksm_guard.operations.facts import KSM_HOST_COMMAND
    from ksm_guard.operations.model import Mode, Status
    from ksm_guard.operations.report import audit_record

    marks["imports"] = time.time()
    inventory, chosen = make_inventory(inventory_path, {"ksm_mode": "audit"}, [])
    state = State(check_for_changes=True)
    hosts = [inventory.get_host(name) for name in chosen]
    state.init(inventory, Config(PARALLEL=parallel, CONNECT_TIMEOUT=10), initial_limit=hosts)
    marks["setup"] = time.time()
    connect_all(state)
    marks["connect"] = time.time()
    if fact == "ksm":
        facts: dict[Any, Any] = {
            h: reading.state for h, reading in zip(hosts, read(state, hosts).values(), strict=True)
        }
    else:
        facts = get_facts(state, Command, kwargs={"command": KSM_HOST_COMMAND})
    marks["fact"] = time.time()
    if fact == "ksm":
        results = [HostResult(h.name, Status.OK, audit=audit_record(facts[h])) for h in hosts]
        render.as_json(RunResult(Mode.AUDIT, False, results))
    marks["processing"] = time.time()
    disconnect_all(state)
    marks["disconnect"] = time.time()
    if sum(1 for value in facts.values() if value) != len(hosts):
        raise SystemExit(f"only {len(facts)} of {len(hosts)} hosts answered")
    print(json.dumps(marks))


@dataclass(frozen=True)
class Breakdown:
    """Median seconds per stage over several runs."""

    fact: str
    hosts: int
    stages: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.stages.values())


def breakdown(inventory: Path, parallel: int, fact: str, runs: int) -> Breakdown:
    """Run the replay ``runs`` times in fresh interpreters; median seconds per stage."""
    per_stage: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for _ in range(runs):
        start = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "bench.breakdown", str(inventory), str(parallel), fact],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        end = time.time()
        if done.returncode != 0:
            raise RuntimeError(f"breakdown replay failed: {done.stderr.strip()[-500:]}")
        marks = json.loads(done.stdout.strip().splitlines()[-1])
        previous = start
        for stage in STAGES[:-1]:
            per_stage[stage].append(marks[stage] - previous)
            previous = marks[stage]
        per_stage["exit"].append(end - previous)
    hosts = len(inventory.read_text().split("ssh_hostname")) - 1
    return Breakdown(fact, hosts, {s: statistics.median(v) for s, v in per_stage.items()})


def import_profile(top: int = 8) -> list[tuple[str, float]]:
    """Seconds of import time per top-level package on the audit path (``-X importtime``).

    Each module's own ("self") time goes to its top-level package, so the figures add up to the
    whole import phase.
    """
    code = (
        "from gevent import monkey; monkey.patch_all(); "
        "import ksm_guard.cli.app, ksm_guard.cli.engine, ksm_guard.cli.render, "
        "ksm_guard.operations.modes, pyinfra.api.connect, pyinfra.api.facts"
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    totals: dict[str, float] = {}
    for line in done.stderr.splitlines():
        # "import time: self [us] | cumulative | imported package"
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue
        package = parts[2].strip().split(".")[0]
        totals[package] = totals.get(package, 0.0) + int(parts[0]) / 1e6
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
