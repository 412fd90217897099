"""ksm-guard verify over real SSH: a loopback fleet of live and dead hosts, JUnit per host."""

from __future__ import annotations

import re
import shutil
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from bench.netutil import free_port
from ksm_guard.cli.app import app
from ksm_guard.cli.verify import GRACE, SshTarget, unreachable
from tests.localssh import LocalSshd, inventory_source, silent_listener, ssh_data

runner = CliRunner()
DEAD = ["closed", "hung", "dropped"]
CHECKS_PER_HOST = 8


@pytest.fixture(scope="module")
def dropping_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: a connection gets no answer, as at a dead
    address (Linux drops the SYN while the queue is full)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = [socket.socket() for _ in range(2)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        yield int(listener.getsockname()[1])
        for filler in fillers:
            filler.close()


@pytest.fixture(scope="module")
def hung_port() -> Iterator[int]:
    """A loopback port that accepts connections and never says a word."""
    listener = silent_listener()
    yield int(listener.getsockname()[1])
    listener.close()


@dataclass
class Run:
    """One ``ksm-guard verify`` run: the CLI result, its wall-clock time and its JUnit report."""

    result: Result
    seconds: float
    junit: ET.Element

    def cases(self, host: str) -> list[ET.Element]:
        """The JUnit testcases of ``host``, found by their host property."""
        return [
            case
            for case in self.junit.iter("testcase")
            if any(
                p.get("name") == "host" and p.get("value") == host for p in case.iter("property")
            )
        ]


def _verify(tmp: Path, hosts: list[tuple[str, dict[str, object]]], *options: str) -> Run:
    inventory = tmp / "inventory.py"
    inventory.write_text(inventory_source(hosts))
    junit = tmp / "report" / "verify.xml"
    started = time.monotonic()
    result = runner.invoke(
        app, ["verify", "-i", str(inventory), "--junit-xml", str(junit), *options]
    )
    seconds = time.monotonic() - started
    return Run(result, seconds, ET.parse(junit).getroot())


@pytest.fixture(scope="module")
def fleet_run(local_sshd: LocalSshd, hung_port: int, dropping_port: int, tmp_path_factory) -> Run:
    """verify over a live host among three dead ones (refused, silent, dropped), timeout 2 s."""
    hosts = [
        ("closed", ssh_data(free_port(), local_sshd.key)),
        local_sshd.host("live"),
        ("hung", ssh_data(hung_port, local_sshd.key)),
        ("dropped", ssh_data(dropping_port, local_sshd.key)),
    ]
    return _verify(tmp_path_factory.mktemp("fleet"), hosts, "--connect-timeout", "2")


def test_a_dead_host_makes_exit_code_3(fleet_run: Run) -> None:
    """Unreachable hosts: exit 3, whatever the live hosts' checks found."""
    assert fleet_run.result.exit_code == 3, fleet_run.result.output


def test_each_dead_host_is_one_stderr_line(fleet_run: Run) -> None:
    """stderr holds one line per dead host, in inventory order, saying why; nothing else."""
    assert [re.sub(r":\d+\b", ":PORT", line) for line in fleet_run.result.stderr.splitlines()] == [
        "ksm-guard: closed: unreachable: connection refused by 127.0.0.1:PORT",
        "ksm-guard: hung: unreachable: 127.0.0.1:PORT took the connection but sent no SSH "
        "banner within 2 s",
        "ksm-guard: dropped: unreachable: no TCP connection to 127.0.0.1:PORT within 2 s",
    ]


def test_the_live_host_is_still_checked(fleet_run: Run) -> None:
    """The live host ran every check, none errored; the summary line counts all four hosts."""
    cases = fleet_run.cases("live")
    assert len(cases) == CHECKS_PER_HOST
    assert all(case.find("error") is None for case in cases)
    assert re.search(
        r"^4 host\(s\): 1 (passed|failed), 3 unreachable; exit 3$",
        fleet_run.result.stdout,
        re.MULTILINE,
    )


def test_junit_cases_name_the_inventory_host(fleet_run: Run) -> None:
    """Each check's testcase names the host as the inventory does (test_x[live]), and says so
    in a host property."""
    for case in fleet_run.cases("live"):
        assert re.fullmatch(r"test_\w+\[live(-[\w.]+)?\]", case.get("name", ""))
    text = ET.tostring(fleet_run.junit, encoding="unicode") + fleet_run.result.stdout
    assert "ksm-guard-" not in text and "ssh_config=" not in text


def test_dead_hosts_are_one_junit_error_each(fleet_run: Run) -> None:
    """Each dead host is one erroring testcase in the JUnit report, not one per check."""
    for host in DEAD:
        [case] = fleet_run.cases(host)
        error = case.find("error")
        assert error is not None and error.get("type") == "unreachable"
    suite = fleet_run.junit.find("testsuite")
    assert suite is not None
    assert int(suite.get("tests", "0")) == CHECKS_PER_HOST + len(DEAD)


def test_silent_hosts_are_given_up_together(
    hung_port: int, dropping_port: int, tmp_path: Path
) -> None:
    """Three hosts that never answer, --connect-timeout 2: about 2 s in all (6 one after the
    other), and each reported."""
    ports = {"hung1": hung_port, "dropped": dropping_port, "hung2": hung_port}
    hosts = [(name, ssh_data(port, Path("/dev/null"))) for name, port in ports.items()]
    run = _verify(tmp_path, hosts, "--connect-timeout", "2")
    assert run.result.exit_code == 3
    assert [line.split(":")[1].strip() for line in run.result.stderr.splitlines()] == list(ports)
    assert 2 <= run.seconds < 2 * 2 + 1


def test_probes_run_at_once_and_last_the_timeout(hung_port: int, dropping_port: int) -> None:
    """Eight hosts that never answer are all given up after one timeout, not eight in a row."""
    hosts = [
        SshTarget.from_data(
            f"dead{n}", f"dead{n}", ssh_data([hung_port, dropping_port][n % 2], Path("/dev/null"))
        )
        for n in range(8)
    ]
    started = time.monotonic()
    found = unreachable(hosts, timeout=1)
    seconds = time.monotonic() - started
    assert sorted(found) == sorted(host.name for host in hosts)
    assert 1 <= seconds < 1 + GRACE + 1


def test_connect_timeout_bounds_a_silent_server(hung_port: int, tmp_path: Path) -> None:
    """--connect-timeout 3: a server that never speaks is given up after about 3 s, not 15."""
    run = _verify(
        tmp_path, [("hung", ssh_data(hung_port, Path("/dev/null")))], "--connect-timeout", "3"
    )
    assert run.result.exit_code == 3
    assert run.result.stderr.rstrip().endswith("sent no SSH banner within 3 s")
    assert 3 <= run.seconds < 3 + GRACE + 2
    assert [case.get("name") for case in run.junit.iter("testcase")] == ["ssh_session[hung]"]


def test_connect_timeout_below_1_is_a_usage_error() -> None:
    """--connect-timeout 0 is refused by the option itself: exit 2."""
    result = runner.invoke(app, ["verify", "--connect-timeout", "0"])
    assert result.exit_code == 2


def test_a_refused_login_is_unreachable(local_sshd: LocalSshd, tmp_path: Path) -> None:
    """The login is part of the connection: a user sshd turns away (nobody) is unreachable."""
    run = _verify(tmp_path, [local_sshd.host("locked", ssh_user="nobody")])
    assert run.result.exit_code == 3
    assert re.fullmatch(
        r"ksm-guard: locked: unreachable: SSH login to 127\.0\.0\.1:\d+ failed: .+\n",
        run.result.stderr,
    )


def test_live_fleet_exit_code_follows_the_checks(local_sshd: LocalSshd, tmp_path: Path) -> None:
    """Live hosts only: exit 1 exactly when a check failed, else 0; nothing on stderr."""
    live = ["live1", "live2"]
    run = _verify(tmp_path, [local_sshd.host(host) for host in live])
    failed = any(case.find("failure") is not None for case in run.junit.iter("testcase"))
    assert run.result.exit_code == (1 if failed else 0), run.result.output
    assert run.result.stderr == ""
    assert all(len(run.cases(host)) == CHECKS_PER_HOST for host in live)


@pytest.mark.skipif(shutil.which("sudo") is not None, reason="needs a machine without sudo")
def test_a_host_that_cannot_run_commands_is_an_error(local_sshd: LocalSshd, tmp_path: Path) -> None:
    """Reached, but its commands fail (--sudo, no sudo there): exit 3, one line saying why."""
    run = _verify(tmp_path, [local_sshd.host("nosudo")], "--sudo")
    assert run.result.exit_code == 3
    assert run.result.stderr.startswith(
        "ksm-guard: nosudo: error: cannot run commands: 'sudo /bin/sh -c true' exited 127"
    )
    assert len(run.result.stderr.splitlines()) == 1


def test_help_documents_the_exit_codes() -> None:
    """verify --help states its own exit codes and the connect timeout."""
    result = runner.invoke(app, ["verify", "--help"])
    assert result.exit_code == 0
    for words in (
        "Exit codes",
        "1 a check failed",
        "3 a host was unreachable",
        "--connect-timeout",
    ):
        assert words in result.stdout


def test_an_unwritable_junit_path_is_a_usage_error(tmp_path: Path) -> None:
    """--junit-xml under a plain file: exit 2 and one line, before any host is tried."""
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["verify", "--junit-xml", str(tmp_path / "file" / "report.xml")])
    assert result.exit_code == 2
    assert result.stderr.startswith("ksm-guard: cannot write the JUnit report ")
    assert result.stdout == ""


def test_every_junit_case_names_its_control(tmp_path: Path) -> None:
    """Each check's case carries the control ID it proves (KSM-1..KSM-4), as the audit has them."""
    from ksm_guard.operations.controls import CONTROLS

    junit = tmp_path / "local.xml"
    result = runner.invoke(app, ["verify", "-i", "@local", "--junit-xml", str(junit)])
    assert result.exit_code in (0, 1), result.output
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    controls = {
        case.get("name"): {
            p.get("value") for p in case.iter("property") if p.get("name") == "control"
        }
        for case in cases
    }
    assert all(len(ids) == 1 for ids in controls.values()), controls
    assert {next(iter(ids)) for ids in controls.values()} == {"KSM-1", "KSM-2", "KSM-3", "KSM-4"}
    assert {c.id for c in CONTROLS} >= {next(iter(ids)) for ids in controls.values()}
