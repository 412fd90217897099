"""
The planner against host-state fixtures (tests/plans/<mode>/<case>.yaml, one scenario a file),
and the mode's operations given the same state: they carry out exactly that plan.

A case names a KsmHost fact fixture (``fact``), optional ``state`` overrides and ``options``,
then the plan: ``status``, and either ``refusal`` (code and reason) or ``changes``, ``skipped``
(what is left as is, which counts as refused; default none) and ``commands`` (shell text;
``<UNMERGE_SCRIPT>`` stands for the quoted unmerge script, ``<WATCH:path>`` for the quoted
drift watch file at ``path`` as the case's options make it). ``watch_files: current`` (or
``outdated``) gives the state a watch section whose files are those (or a stale script).
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from pyinfra.context import ctx_host, ctx_state
from pyinfra_testing.operations import parse_commands
from pyinfra_testing.util import FakeState, create_host

from ksm_guard.operations.model import HostState, Mode, Options
from ksm_guard.operations.modes import OPERATIONS
from ksm_guard.operations.plan import UNMERGE_SCRIPT, HostPlan, plan, watch_config
from ksm_guard.operations.watch import SCRIPT_PATH
from ksm_guard.operations.watchscript import watch_files

PLANS = Path(__file__).parent / "plans"
FACTS = Path(__file__).parent / "facts" / "facts.KsmHost"
CASES = sorted(PLANS.glob("*/*.yaml"))


def _case(path: Path) -> tuple[dict[str, Any], HostState, Mode, Options]:
    case = yaml.safe_load(path.read_text())
    state = yaml.safe_load((FACTS / f"{case['fact']}.yaml").read_text())["fact"]
    state.update(case.get("state", {}))
    options = dict(case.get("options", {}))
    if "vmids" in options:
        options["vmids"] = tuple(options["vmids"])
    built = Options(**options)
    if "watch_files" in case:
        files = {
            path: hashlib.sha256(text.encode()).hexdigest()
            for path, text in watch_files(watch_config(built)).items()
        }
        if case["watch_files"] == "outdated":
            files[SCRIPT_PATH] = "0" * 64
        state["watch"] = {
            "now": 1_700_000_000,
            "files": files,
            "last_run": 1_699_999_900,
            "heals": 0,
            "interval": built.watch_interval,
            "textfile": f"{built.watch_textfile_dir}/ksm_guard.prom",
        }
    return case, cast(HostState, state), Mode(path.parent.name), built


def _shell(commands: list[str], options: Options) -> list[str]:
    files = watch_files(watch_config(options))
    return [
        re.sub(
            r"<WATCH:([^>]+)>",
            lambda match: shlex.quote(files[match.group(1)]),
            text.replace("<UNMERGE_SCRIPT>", shlex.quote(UNMERGE_SCRIPT)),
        )
        for text in commands
    ]


def _planned_commands(host_plan: HostPlan) -> list[str]:
    return [str(command) for step in host_plan.steps for command in step.commands]


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_plan(path: Path) -> None:
    """The plan's status, and its refusal or its from → to lines and commands."""
    case, state, mode, options = _case(path)
    host_plan = plan(state, mode, options)
    assert host_plan.status == case["status"]
    if "refusal" in case:
        assert host_plan.refusal is not None
        assert host_plan.refusal.code == case["refusal"]["code"]
        assert host_plan.refusal.reason == case["refusal"]["reason"]
    else:
        assert host_plan.refusal is None
        assert host_plan.changes == case["changes"]
        assert list(host_plan.skipped) == case.get("skipped", [])
        assert _planned_commands(host_plan) == _shell(case["commands"], options)


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_operations_carry_out_the_plan(path: Path) -> None:
    """
    Each operation of the mode, in order, on the same state: together they yield the plan's
    commands; for a refused plan the first thing yielded is the refusal (the preflight), so a run
    that reaches the operations at all still changes nothing.
    """
    case, state, mode, options = _case(path)
    fake_state = FakeState()
    host = create_host(fake_state, facts={"facts.KsmHost": state})
    yielded: list[Any] = []
    with ctx_state.use(fake_state), ctx_host.use(host):
        for call in OPERATIONS[mode]:
            yielded += parse_commands(list(call.operation._inner(**call.arguments(options))))
    if "refusal" in case:
        assert yielded[0] == ["refuse", [case["refusal"]["reason"]], {}]
    else:
        assert yielded == _shell(case["commands"], options)
