"""A fleet over real SSH: sshd on a loopback port, this machine reached under several names."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from bench.netutil import free_port
from ksm_guard.cli.app import app
from ksm_guard.operations.facts import KSM_HOST_COMMAND
from tests.localssh import LocalSshd, inventory_source, silent_listener, ssh_data
from tests.results import hosts_of

runner = CliRunner()
NAMES = [f"node{number}" for number in range(1, 6)]


@pytest.fixture
def fleet(local_sshd: LocalSshd, write_inventory) -> str:
    """An inventory of five names for this machine, all through the loopback sshd."""
    return write_inventory(inventory_source([local_sshd.host(name) for name in NAMES]))


@pytest.fixture
def on_the_wire(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Every command paramiko sends over SSH, with the port it went to."""
    from paramiko import SSHClient

    sent: list[tuple[int, str]] = []
    original = SSHClient.exec_command

    def recording(self: SSHClient, command: str, *args: Any, **kwargs: Any) -> Any:
        transport = self.get_transport()
        port = transport.getpeername()[1] if transport else 0
        sent.append((port, command))
        return original(self, command, *args, **kwargs)

    monkeypatch.setattr(SSHClient, "exec_command", recording)
    return sent


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The highest number of SSH connections being opened at the same moment (slowed down)."""
    import gevent
    from pyinfra.connectors.ssh import SSHConnector

    open_now = [0]
    highest = [0]
    original = SSHConnector.connect

    def counting(self: SSHConnector, *args: Any, **kwargs: Any) -> Any:
        open_now[0] += 1
        highest[0] = max(highest[0], open_now[0])
        try:
            gevent.sleep(0.3)  # hold the slot, so that concurrent connects overlap
            return original(self, *args, **kwargs)
        finally:
            open_now[0] -= 1

    monkeypatch.setattr(SSHConnector, "connect", counting)
    yield highest


def test_audit_sends_exactly_one_command_per_host_over_ssh(
    fleet: str, on_the_wire: list[tuple[int, str]], local_sshd: LocalSshd
) -> None:
    """Counted at paramiko: five hosts, five commands, each the KsmHost read, nothing else."""
    result = runner.invoke(app, ["audit", "-i", fleet, "--output", "json"])
    assert result.exit_code in (0, 1), result.output
    assert sorted(hosts_of(result)) == sorted(NAMES)
    sent = [(port, shlex.split(command)) for port, command in on_the_wire]
    assert sent == [(local_sshd.port, ["sh", "-c", KSM_HOST_COMMAND])] * len(NAMES)


@pytest.mark.parametrize(("parallel", "expected"), [("2", 2), ("0", len(NAMES))])
def test_parallel_caps_the_connections_at_once(
    fleet: str, connections: list[int], parallel: str, expected: int
) -> None:
    """--parallel 2: never more than two hosts connecting at once; 0 (pyinfra's default): all."""
    result = runner.invoke(app, ["audit", "-i", fleet, "--parallel", parallel])
    assert result.exit_code in (0, 1), result.output
    assert connections[0] == expected


@pytest.fixture
def fleet_with_dead_hosts(local_sshd: LocalSshd, write_inventory) -> Iterator[str]:
    """Two live names, one closed port and one server that accepts but never speaks."""
    hung = silent_listener()
    hosts = [
        local_sshd.host("alive1"),
        ("closed", ssh_data(free_port(), local_sshd.key)),
        ("hung", ssh_data(hung.getsockname()[1], local_sshd.key)),
        local_sshd.host("alive2"),
    ]
    yield write_inventory(inventory_source(hosts))
    hung.close()


def test_dead_hosts_are_unreachable_and_the_others_finish(fleet_with_dead_hosts: str) -> None:
    """A refused and a hung connection are unreachable after the timeout; the rest are audited."""
    result = runner.invoke(
        app, ["audit", "-i", fleet_with_dead_hosts, "--connect-timeout", "2", "--output", "json"]
    )
    hosts = hosts_of(result)
    assert result.exit_code == 3
    assert (hosts["closed"]["verdict"], hosts["hung"]["verdict"]) == ("unreachable",) * 2
    assert hosts["alive1"]["audit"] is not None and hosts["alive2"]["audit"] is not None
    assert "ksm-guard: hung: unreachable:" in result.stderr


@pytest.mark.parametrize(
    ("options", "statuses"),
    [
        ([], ["refused", "refused", "refused", "ok"]),  # disable: all hosts in one batch
        (["--serial"], ["refused", "not-reached", "not-reached", "ok"]),
        (["--batch", "2"], ["refused", "refused", "not-reached", "ok"]),
        (["--serial", "--continue-on-error"], ["refused", "refused", "refused", "ok"]),
    ],
)
def test_a_refused_host_stops_the_rollout_after_its_batch(
    local_sshd: LocalSshd, write_inventory, options: list[str], statuses: list[str]
) -> None:
    """
    node1-3's settings are refused: the batches after the first refusal are not reached unless
    told to go on. node4 has nothing to change: it is ok and in no batch.
    """
    hosts = [
        *(local_sshd.host(name, ksm_mask="maybe") for name in ("node1", "node2", "node3")),
        local_sshd.host("node4"),
    ]
    inventory = write_inventory(inventory_source(hosts))
    result = runner.invoke(app, ["disable", "-y", "-i", inventory, "-o", "json", *options])
    assert result.exit_code == 1, result.output
    assert [h["status"] for h in hosts_of(result).values()] == statuses
