"""--connect-timeout bounds each whole connection, a name lookup that never ends included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.netutil import free_port
from tests.dnsjail import ROOT, run_jailed, unavailable
from tests.localssh import LocalSshd, silent_listener, ssh_data

BIN = Path(sys.executable).parent
DEAD = ["never-answers.test", "also-never.test"]
TIMED_OUT = "timed out after 2 s (connect, name resolution included)"

NO_JAIL = unavailable()
jailed = pytest.mark.skipif(NO_JAIL is not None, reason=NO_JAIL or "")


def _probe_command(hosts: list[tuple[str, dict[str, Any]]], parallel: int = 0) -> list[str]:
    spec = {"hosts": hosts, "timeout": 2, "parallel": parallel}
    return [sys.executable, "-m", "tests.connect_probe", json.dumps(spec)]


def _probe_result(stdout: str, stderr: str) -> dict[str, Any]:
    assert stdout.strip(), stderr
    result: dict[str, Any] = json.loads(stdout)
    return result


@jailed
def test_a_silent_resolver_times_out_within_the_connect_timeout() -> None:
    """Two names nobody answers for: both fail after 2 s, not after resolv.conf's 90."""
    done = run_jailed(_probe_command([(name, {}) for name in DEAD]), timeout=60)
    result = _probe_result(done.stdout, done.stderr)
    assert result["failed"] == dict.fromkeys(DEAD, TIMED_OUT)
    assert result["active"] == []
    assert result["seconds"] < 10
    assert set(DEAD) <= set(done.queries), "the resolver was never asked"


@jailed
def test_stuck_lookups_do_not_starve_the_next_hosts() -> None:
    """
    Twelve dead names hold their lookup threads past the timeout; a thirteenth host, listed in
    /etc/hosts, still gets its lookup: its connection is refused at once, it does not time out.
    """
    dead = [f"dead{number}.test" for number in range(12)]
    listed = ("listed.test", {"ssh_port": 1})  # nothing listens on port 1 in the namespace
    hosts: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in dead] + [listed]
    done = run_jailed(
        _probe_command(hosts, parallel=len(hosts)), hosts="127.0.0.1 listed.test\n", timeout=60
    )
    result = _probe_result(done.stdout, done.stderr)
    assert {name: result["failed"][name] for name in dead} == dict.fromkeys(dead, TIMED_OUT)
    assert result["failed"]["listed.test"].startswith("Could not connect"), result["failed"]
    assert "127.0.0.1" in result["failed"]["listed.test"]  # the address /etc/hosts gave
    assert set(dead) <= set(done.queries)
    assert "listed.test" not in done.queries


def test_connected_hosts_are_activated_and_the_others_say_why(local_sshd: LocalSshd) -> None:
    """Numeric addresses, no lookup: the live host is active; hung and refused ones are not."""
    hung = silent_listener()
    try:
        hosts = [
            local_sshd.host("alive"),
            ("hung", ssh_data(hung.getsockname()[1], local_sshd.key)),
            ("refused", ssh_data(free_port(), local_sshd.key)),
        ]
        done = subprocess.run(
            _probe_command(hosts), cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    finally:
        hung.close()
    result = _probe_result(done.stdout, done.stderr)
    assert result["active"] == result["connected"] == ["alive"]
    assert result["failed"]["hung"] == TIMED_OUT
    assert result["failed"]["refused"].startswith("Could not connect")
    assert "\x1b[" not in "".join(result["failed"].values())
    assert result["seconds"] < 10


@jailed
def test_audit_of_names_nobody_resolves_is_unreachable_within_the_timeout() -> None:
    """ksm-guard audit: both hosts unreachable, exit 3, in seconds rather than minutes."""
    command = [str(BIN / "ksm-guard"), "audit", "-i", ",".join(DEAD)]
    command += ["--connect-timeout", "2", "-o", "json"]
    # Unwired, the lookups take resolv.conf's 90 s: give up long before that.
    done = run_jailed(command, timeout=12)
    assert set(DEAD) <= set(done.queries), "the resolver was never asked"
    assert done.returncode == 3, done.stderr
    hosts = {host["host"]: host for host in json.loads(done.stdout)["hosts"]}
    assert {name: hosts[name]["verdict"] for name in DEAD} == dict.fromkeys(DEAD, "unreachable")
    assert done.seconds < 10
