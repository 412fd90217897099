"""
A Proxmox VE cluster as the inventory: its membership as pve-cluster writes it (fixtures in
tests/cluster/, each citing proxmox/pve-cluster), then over real SSH: this machine's loopback
sshd under the members' names, with a fake ``/etc/pve/.members`` in a temporary folder that the
inventory reads through the test-only host data ``ksm_pve_members_file``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from ksm_guard.cli.app import app
from ksm_guard.cli.cluster import NoConnection, host_entry
from ksm_guard.operations.cluster import (
    MembershipError,
    Target,
    cluster_command,
    members_command,
    parse_cluster,
    parse_members,
    targets,
)
from ksm_guard.operations.facts import KSM_HOST_COMMAND, parse_ksm_host
from ksm_guard.operations.report import audit_record
from tests.conftest import BIN
from tests.localssh import LocalSshd, ssh_data

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "cluster"
runner = CliRunner()


def _fixture(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((FIXTURES / name).read_text()))


@pytest.mark.parametrize("name", sorted(path.name for path in FIXTURES.glob("*.yaml")))
def test_membership_fixtures(name: str) -> None:
    """Each member, where it is reached or why not, from the file as pmxcfs writes it."""
    case = _fixture(name)
    membership = parse_members(case["text"])
    assert membership.cluster == case["cluster"]
    found = targets(membership, case["seed"], f"/etc/pve/.members on {case['seed']}")
    assert found == [Target(*target) for target in case["targets"]]


def test_online_quorate_and_ids_are_read() -> None:
    """The three-node fixture: its quorum, each node's corosync id, by node name."""
    membership = parse_members(_fixture("three_nodes_one_offline.yaml")["text"])
    assert (membership.nodename, membership.cluster, membership.quorate) == ("pve-a1", "prod", True)
    assert [(m.name, m.nodeid, m.online, m.ip) for m in membership.members] == [
        ("pve-a1", 1, True, "10.0.0.11"),
        ("pve-a2", 2, True, "10.0.0.12"),
        ("pve-a3", 3, False, "10.0.0.13"),
    ]


CLUSTER = '"cluster": { "name": "c", "version": 1, "nodes": 1, "quorate": 1 }'
NODE = '"n1": { "id": 1, "online": 1, "ip": "10.0.0.1"}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not JSON"),
        ("absent", "not JSON"),
        ("[]", "the membership is not a JSON object"),
        ('{"version": 1}', "no nodename"),
        ('{"nodename": "n1"}', "version is not an integer"),
        ('{"nodename": "n1", "version": 1, ' + CLUSTER + "}", "nodelist is not a JSON object"),
        (
            '{"nodename": "n1", "version": 1, "cluster": { "name": "c", "version": 1, "nodes": 2,'
            ' "quorate": 1 }, "nodelist": {' + NODE + "}}",
            "the cluster counts 2 nodes, its nodelist 1",
        ),
        (
            '{"nodename": "n1", "version": 1, ' + CLUSTER
            + ', "nodelist": {"n1": { "id": 1, "online": 1, "ip": "n1.example.net"}}}',
            "node 'n1' has no IP address: 'n1.example.net'",
        ),
        (
            '{"nodename": "n1", "version": 1, ' + CLUSTER
            + ', "nodelist": {"n1": { "id": 1, "online": true}}}',
            "node 'n1' online is not 0 or 1: True",
        ),
    ],
)  # fmt: skip
def test_a_file_pmxcfs_cannot_write_is_an_error(text: str, message: str) -> None:
    """One line saying what is wrong: no guessing at who is in the cluster."""
    with pytest.raises(MembershipError, match=message):
        parse_members(text)


def test_the_read_is_one_quoted_command() -> None:
    """The file is printed, or ``absent``; a path is quoted as every value is."""
    assert str(members_command("/tmp/a b")) == (
        "if test -e '/tmp/a b' ; then cat '/tmp/a b' ; else echo absent; fi"
    )


@pytest.fixture
def contacts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Name lookups and connections attempted (each refused)."""
    made: list[str] = []

    def lookup(host: str, *args: Any, **kwargs: Any) -> Any:
        made.append(f"lookup {host}")
        raise socket.gaierror(socket.EAI_NONAME, "no lookups in this test")

    def connect(self: socket.socket, address: Any) -> None:
        made.append(f"connect {address}")
        raise OSError("no connections in this test")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return made


def test_an_offline_member_fails_to_connect_with_its_reason(contacts: list[str]) -> None:
    """pyinfra's own SSH connector, on the entry's data: the reason, no lookup, no connection."""
    from pyinfra.api import Inventory, State
    from pyinfra.api.exceptions import ConnectError

    name, data = host_entry(Target("pve-a3", None, "pve-cluster lists it offline (x)"), "10.0.0.13")
    assert data["ksm_unreachable"] == "pve-cluster lists it offline (x)"
    assert data["ssh_hostname"] == "10.0.0.13"
    inventory = Inventory(([(name, data)], {}))
    state = State(inventory)
    with pytest.raises(ConnectError, match=r"Could not connect \(pve-cluster lists it offline"):
        inventory.get_host(name).connect(raise_exceptions=True)
    assert contacts == []
    assert state.inventory is inventory


def test_the_stand_in_socket_shows_in_debug_inventory() -> None:
    """pyinfra's debug-inventory --json encodes host data: the reason, not an error."""
    from pyinfra_cli.util import json_encode

    assert json_encode(NoConnection("offline")) == "no connection: offline"


# -- over real SSH -------------------------------------------------------------------------------

# The fake /etc/pve/.members, as pmxcfs formats it (tests/cluster/three_nodes_one_offline.yaml):
# pve-a1 and pve-a2 are this machine, pve-a3 is offline, pve-a4 is online at an address where
# nothing listens (the sshd listens on 127.0.0.1 only).
MEMBERS = """{
"nodename": "pve-a1",
"version": 21,
"cluster": { "name": "loop", "version": 4, "nodes": 4, "quorate": 1 },
"nodelist": {
  "pve-a4": { "id": 4, "online": 1, "ip": "127.0.0.9"},
  "pve-a2": { "id": 2, "online": 1, "ip": "127.0.0.1"},
  "pve-a1": { "id": 1, "online": 1, "ip": "127.0.0.1"},
  "pve-a3": { "id": 3, "online": 0, "ip": "192.0.2.13"}
  }
}
"""
STANDALONE = '{\n"nodename": "pve-solo",\n"version": 1\n}\n'
OFFLINE = "pve-cluster lists it offline (cluster 'loop', {members} on 127.0.0.1)"


def _site(
    root: Path, members: str | None, group_data: dict[str, Any], name: str = "pve_cluster"
) -> Path:
    """A working folder: the shipped cluster inventory, its group data, the membership file."""
    (root / "inventories" / "group_data").mkdir(parents=True)
    shutil.copy(ROOT / "inventories" / "pve_cluster.py", root / "inventories" / f"{name}.py")
    path = root / "members"
    if members is not None:
        path.write_text(members)
    # Test-only: the inventory reads this file instead of /etc/pve/.members.
    data = {"ksm_pve_members_file": str(path), **group_data}
    source = "".join(f"{key} = {value!r}\n" for key, value in data.items())
    (root / "inventories" / "group_data" / "all.py").write_text(source)
    return root


def _ssh(sshd: LocalSshd) -> dict[str, Any]:
    """The loopback sshd's settings, for every member: the address comes from the membership."""
    data = ssh_data(sshd.port, sshd.key)
    del data["ssh_hostname"]
    return data


def _run(
    monkeypatch: pytest.MonkeyPatch,
    site: Path,
    *args: str,
    seed: str | None = "127.0.0.1",
    inventory: str = "inventories/pve_cluster.py",
) -> Any:
    """``ksm-guard ARGS -i INVENTORY`` in ``site``, the seed named by $KSM_GUARD_PVE_SEED."""
    monkeypatch.chdir(site)
    monkeypatch.delenv("KSM_GUARD_PVE_SEED", raising=False)
    if seed:
        monkeypatch.setenv("KSM_GUARD_PVE_SEED", seed)
    return runner.invoke(app, [*args, "-i", inventory])


@pytest.fixture
def numeric_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names looked up on this machine (addresses pass): there must be none."""
    asked: list[str] = []
    original = socket.getaddrinfo

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            ipaddress.ip_address(str(host))
        except ValueError:
            asked.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, "no name lookups in this test") from None
        return original(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    yield asked
    assert asked == [], f"names looked up: {asked}"


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every command sent over SSH, with the inventory name of the host it went to."""
    from pyinfra.connectors.ssh import SSHConnector

    sent: list[tuple[str, str]] = []
    original = SSHConnector.run_shell_command

    def recording(self: SSHConnector, command: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append((self.host.name, str(command)))
        return original(self, command, *args, **kwargs)

    monkeypatch.setattr(SSHConnector, "run_shell_command", recording)
    return sent


def test_audit_finds_every_member(
    local_sshd: LocalSshd,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    numeric_only: list[str],
    wire: list[tuple[str, str]],
) -> None:
    """
    ksm-guard audit -i inventories/pve_cluster.py: one command reads the membership on the seed,
    then each member is audited at its own address under its node name; the offline one is
    unreachable with the reason, the one at a dead address unreachable too. No name is looked up.
    """
    site = _site(tmp_path, MEMBERS, _ssh(local_sshd))
    result = _run(monkeypatch, site, "audit", "-o", "json")
    assert result.exit_code == 3, result.output
    hosts = {host["host"]: host for host in json.loads(result.stdout)["hosts"]}
    assert list(hosts) == ["pve-a1", "pve-a2", "pve-a3", "pve-a4"]
    assert [hosts[name]["status"] for name in hosts] == ["ok", "ok", "unreachable", "unreachable"]
    assert hosts["pve-a3"]["detail"] == OFFLINE.format(members=site / "members")
    assert "127.0.0.9" in hosts["pve-a4"]["detail"]  # tried at its address, refused
    membership = str(members_command(str(site / "members")))
    assert wire[0] == ("127.0.0.1", membership)  # the seed, under the name it was given
    assert sorted(wire[1:]) == [("pve-a1", KSM_HOST_COMMAND), ("pve-a2", KSM_HOST_COMMAND)]


def test_limit_picks_members_by_node_name(
    local_sshd: LocalSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--limit takes node names; the membership is read all the same."""
    result = _run(
        monkeypatch, _site(tmp_path, MEMBERS, _ssh(local_sshd)), "audit", "--limit", "pve-a2"
    )
    assert result.exit_code in (0, 1), result.output  # 1: this machine's KSM runs (others' tests)
    assert [line.split()[0] for line in result.stdout.splitlines()[1:2]] == ["pve-a2"]


def test_a_node_in_no_cluster_is_a_cluster_of_one(
    local_sshd: LocalSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standalone node, under its node name, reached where the seed was."""
    result = _run(monkeypatch, _site(tmp_path, STANDALONE, _ssh(local_sshd)), "audit", "-o", "json")
    assert result.exit_code in (0, 1), result.output  # 1: this machine's KSM runs (others' tests)
    assert [(h["host"], h["status"]) for h in json.loads(result.stdout)["hosts"]] == [
        ("pve-solo", "ok")
    ]


def test_the_seed_from_group_data(
    local_sshd: LocalSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ksm_pve_seed in group data of the inventory's own group (its file name) names the seed."""
    site = _site(tmp_path, STANDALONE, _ssh(local_sshd), name="dc1")
    (site / "inventories" / "group_data" / "dc1.py").write_text("ksm_pve_seed = '127.0.0.1'\n")
    result = _run(monkeypatch, site, "audit", seed=None, inventory="inventories/dc1.py")
    assert result.exit_code in (0, 1), result.output  # 1: this machine's KSM runs (others' tests)
    assert result.stdout.splitlines()[1].split()[0] == "pve-solo"


@pytest.mark.parametrize(
    ("members", "seed", "message"),
    [
        (None, "127.0.0.1", "no {members} on 127.0.0.1: not a Proxmox VE node, or pve-cluster "
                            "is not running"),
        ("{}", "127.0.0.1", "{members} on 127.0.0.1: no nodename"),
        (MEMBERS, None, "which node? set KSM_GUARD_PVE_SEED=<node>, or give "
                        "--data ksm_pve_seed=<node> to pyinfra"),
    ],
)  # fmt: skip
def test_no_membership_is_a_usage_error(
    members: str | None,
    seed: str | None,
    message: str,
    local_sshd: LocalSshd,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Exit 2 and one line naming the file or the setting: no host is guessed at."""
    site = _site(tmp_path, members, _ssh(local_sshd))
    result = _run(monkeypatch, site, "audit", seed=seed)
    assert result.exit_code == 2, result.output
    assert message.format(members=site / "members") in result.stderr
    assert result.stderr.startswith("ksm-guard: cannot load inventories/pve_cluster.py: ")


def test_an_unreachable_seed_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed does not answer: exit 2, the seed named, within the connect timeout."""
    from bench.netutil import free_port

    site = _site(tmp_path, MEMBERS, {"ssh_port": free_port(), "ssh_user": "root"})
    result = _run(monkeypatch, site, "audit")
    assert result.exit_code == 2, result.output
    assert "cannot read the cluster membership from 127.0.0.1: " in result.stderr


def test_verify_reports_the_offline_member_without_probing_it(
    local_sshd: LocalSshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ksm-guard verify: the offline member is unreachable for the reason pve-cluster gives."""
    site = _site(tmp_path, MEMBERS, _ssh(local_sshd))
    result = _run(monkeypatch, site, "verify", "--limit", "pve-a3")
    assert result.exit_code == 3, result.output
    assert f"pve-a3: unreachable: {OFFLINE.format(members=site / 'members')}" in result.stderr


def test_pyinfra_finds_every_member(local_sshd: LocalSshd, tmp_path: Path) -> None:
    """
    ``pyinfra inventories/pve_cluster.py deploy.py --dry`` with the seed and the SSH settings on
    its own command line (--data, --user, --key, --port): the seed is read with them, every
    member is there, the offline one fails to connect with the reason (pyinfra asks whether to
    go on: yes).
    """
    site = _site(tmp_path, MEMBERS, {})
    command = [
        str(BIN / "pyinfra"), "inventories/pve_cluster.py", str(ROOT / "deploy.py"), "--dry",
        "--data", "ksm_pve_seed=127.0.0.1", "--user", "root", "--key", str(local_sshd.key),
        "--port", str(local_sshd.port), "--data", "ssh_known_hosts_file=/dev/null",
        "--data", "ssh_strict_host_key_checking=no",
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "KSM_GUARD_PVE_SEED"}
    run = subprocess.run(
        command, cwd=site, env=env, input="\n", capture_output=True, text=True, timeout=120
    )
    out = run.stdout + run.stderr
    assert "[pve-a1] Ready" in out and "[pve-a2] Ready" in out, out
    assert f"[pve-a3] Could not connect ({OFFLINE.format(members=site / 'members')})" in out
    assert "[pve-a4] Could not connect" in out and "127.0.0.9" in out
    assert run.returncode == 1  # pyinfra's own status for hosts that could not connect


def test_pyinfra_debug_inventory_lists_the_members(local_sshd: LocalSshd, tmp_path: Path) -> None:
    """``pyinfra INV debug-inventory --json``: each member, its address, its group."""
    site = _site(tmp_path, MEMBERS, _ssh(local_sshd))
    env = {**os.environ, "KSM_GUARD_PVE_SEED": "127.0.0.1"}
    run = subprocess.run(
        [str(BIN / "pyinfra"), "inventories/pve_cluster.py", "debug-inventory", "--json"],
        cwd=site, env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    hosts = json.loads(run.stdout)
    assert [(h["name"], h["groups"], h["data"].get("ssh_hostname")) for h in hosts] == [
        ("pve-a1", ["pve_cluster"], "127.0.0.1"),
        ("pve-a2", ["pve_cluster"], "127.0.0.1"),
        ("pve-a3", ["pve_cluster"], "192.0.2.13"),
        ("pve-a4", ["pve_cluster"], "127.0.0.9"),
    ]
    assert hosts[0]["data"]["ssh_port"] == local_sshd.port  # group data applies to every member


@pytest.mark.parametrize("name", sorted(path.name for path in FIXTURES.glob("*.yaml")))
def test_the_fact_reads_the_cluster_and_node_names(name: str, tmp_path: Path) -> None:
    """The fact's ``cluster`` section, run for real on the fixture's file: both names."""
    case = _fixture(name)
    members = tmp_path / ".members"
    members.write_text(case["text"])
    lines = _section(cluster_command(str(members)))
    membership = parse_members(case["text"])
    assert parse_cluster(lines) == {
        "name": case["cluster"],
        "node": membership.nodename,
        "error": None,
    }


def _section(command: str) -> list[str]:
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def test_no_membership_file_is_no_cluster(tmp_path: Path) -> None:
    """Not Proxmox VE (or pmxcfs down): ``absent``, and the audit's ``cluster`` is null."""
    assert _section(cluster_command(str(tmp_path / ".members"))) == ["absent"]
    assert parse_cluster(["absent"]) is None


@pytest.mark.parametrize(
    ("lines", "error"),
    [(["?"], "not readable"), (["{"], "not JSON"), (['{"version": 1}'], "no nodename")],
)
def test_an_unreadable_membership_never_fails_the_fact(lines: list[str], error: str) -> None:
    """A file that cannot be read or parsed leaves the pool unknown and says why."""
    found = parse_cluster(lines)
    assert found is not None and found["name"] is None and found["node"] is None
    assert found["error"] is not None and error in found["error"]


def test_the_cluster_is_in_the_audit_record() -> None:
    """The fact's value reaches ``audit.cluster`` unchanged: the plan's pools come from there."""
    captured = yaml.safe_load(
        (ROOT / "tests/facts/facts.KsmHost/debian_vm_captured.yaml").read_text()
    )
    lines = [*captured["output"], "## cluster", '{"nodename": "pve-solo", "version": 1}']
    state = parse_ksm_host(lines)
    assert audit_record(state)["cluster"] == {"name": None, "node": "pve-solo", "error": None}
