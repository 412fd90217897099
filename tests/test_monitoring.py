"""
The shipped alert rules and Grafana dashboard (monitoring/): checked and unit-tested by Debian's
promtool, and every dashboard query run by a real Prometheus (no data: a syntax or function
error still fails). tests/integration/test_watch.py runs them again over a real host's metrics.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.promserver import (
    DASHBOARD,
    MONITORING,
    PROMETHEUS,
    RULES,
    dashboard_queries,
    prometheus,
    short_rules,
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: scripts/bootstrap.sh --test installs Debian's prometheus")
    return subprocess.run(
        ["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )


def test_promtool_checks_the_rules() -> None:
    """``promtool check rules`` passes and counts the five alerts."""
    done = _promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_promtool_unit_tests_the_rules() -> None:
    """``promtool test rules``: each alert fires after its shipped ``for:``, not before."""
    done = _promtool("test", "rules", "ksm-guard.rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_short_copy_still_checks(tmp_path: Path) -> None:
    """The copy the VM test loads (``for: 0s``) is valid rules too."""
    copy = short_rules(tmp_path / "rules.yml")
    done = _promtool("check", "rules", str(copy))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_dashboard_panel_has_a_query() -> None:
    """Each panel has at least one target, each target a Prometheus expression."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert panels
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def test_every_dashboard_query_runs(tmp_path: Path) -> None:
    """A real Prometheus answers every dashboard query (and every rule's) without an error."""
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is missing: scripts/bootstrap.sh --test installs it")
    with prometheus(tmp_path, [], [RULES]) as server:
        for expr in dashboard_queries():
            server.query(expr)  # raises with Prometheus' error
        groups = server.api("rules")["groups"]
        assert [rule["name"] for rule in groups[0]["rules"]] == [
            "KsmMerging",
            "KsmMergedPagesRemain",
            "KsmUnitEnabled",
            "KsmGuardWatchStale",
            "KsmGuardWatchMissing",
        ]
        assert all(rule["health"] != "err" for rule in groups[0]["rules"])
