"""
A Proxmox VE cluster as the inventory, on two test VMs.

The pve guest is dressed as a cluster node at test time: /etc/pve/.members is a STAND-IN written
over SSH (pve-cluster cannot run here), in the format pmxcfs writes it (proxmox/pve-cluster
7091d92e5949 = 9.1.6, src/pmxcfs/status.c cfs_create_memberlist_msg), root's and mode 0440 as
pmxcfs serves it (src/pmxcfs/pmxcfs.c). It lists itself, a member whose ip is a second guest (the
bare flavour), and a member that is offline. The ips are TEST-NET addresses that the operator's
ssh_config maps to the guests' forwarded ports: each member is reached at the address the file
gives. Every member, the seed included, is logged in to as ``admin`` with sudo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN
from tests.vm.guest import Guest
from tests.vm.session import VmSession

ROOT = Path(__file__).resolve().parent.parent.parent
SEED_IP, MEMBER_IP, OFFLINE_IP = "192.0.2.11", "192.0.2.12", "192.0.2.13"
MEMBERS = f"""{{
"nodename": "pve-a1",
"version": 9,
"cluster": {{ "name": "testlab", "version": 3, "nodes": 3, "quorate": 1 }},
"nodelist": {{
  "pve-a2": {{ "id": 2, "online": 1, "ip": "{MEMBER_IP}"}},
  "pve-a1": {{ "id": 1, "online": 1, "ip": "{SEED_IP}"}},
  "pve-a3": {{ "id": 3, "online": 0, "ip": "{OFFLINE_IP}"}}
  }}
}}
"""
OFFLINE = "pve-cluster lists it offline (cluster 'testlab', /etc/pve/.members on 192.0.2.11)"


@pytest.fixture(scope="module")
def site(
    vm_session: VmSession,
    release: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Path]:
    """The two guests, the membership stand-in on the pve one, and an operator's working folder."""
    guests = vm_session.start_many(
        ["pve", "bare"], names=["cluster-pve", "cluster-bare"], release=release
    )
    seed: Guest = guests["cluster-pve"]
    member: Guest = guests["cluster-bare"]
    try:
        seed.ssh(
            "mkdir -p /etc/pve && cat > /etc/pve/.members && chmod 0440 /etc/pve/.members",
            input=MEMBERS,
        )
        root = tmp_path_factory.mktemp("cluster-site")
        (root / "inventories" / "group_data").mkdir(parents=True)
        shutil.copy(ROOT / "inventories" / "pve_cluster.py", root / "inventories")
        ssh_config = root / "ssh_config"
        ssh_config.write_text(
            "".join(
                f"Host {ip}\n    HostName 127.0.0.1\n    Port {guest.port}\n"
                for ip, guest in ((SEED_IP, seed), (MEMBER_IP, member))
            )
        )
        settings = {
            "ssh_user": "admin",
            "ssh_key": str(seed.key),
            "ssh_config_file": str(ssh_config),
            "ssh_known_hosts_file": "/dev/null",
            "ssh_strict_host_key_checking": "no",
            "_sudo": True,
        }
        (root / "inventories" / "group_data" / "all.py").write_text(
            "".join(f"{key} = {value!r}\n" for key, value in settings.items())
        )
        yield root
    finally:
        if not request.config.getoption("--keep-vms", default=False):
            for guest in guests.values():
                vm_session.stop(guest)


def _run(site: Path, *command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KSM_GUARD_PVE_SEED": SEED_IP}
    return subprocess.run(
        command, cwd=site, env=env, input="\n", capture_output=True, text=True, timeout=300
    )


def test_ksm_guard_audits_every_member(site: Path) -> None:
    """
    ``ksm-guard audit -i inventories/pve_cluster.py``: the seed and the second guest audited as
    root through sudo, each the guest its ip leads to; the offline member unreachable, said why.
    """
    run = _run(
        site, str(BIN / "ksm-guard"), "audit", "-i", "inventories/pve_cluster.py", "-o", "json"
    )
    assert run.returncode == 3, run.stdout + run.stderr
    hosts = {host["host"]: host for host in json.loads(run.stdout)["hosts"]}
    assert list(hosts) == ["pve-a1", "pve-a2", "pve-a3"]
    audits = {name: hosts[name]["audit"] for name in ("pve-a1", "pve-a2")}
    assert {name: audit["uid"] for name, audit in audits.items()} == {"pve-a1": 0, "pve-a2": 0}
    # pve flavour: Proxmox's ksmtuned.service; bare flavour: no KSM service at all
    assert audits["pve-a1"]["units"]["ksmtuned.service"]["present"] is True
    assert audits["pve-a2"]["units"]["ksmtuned.service"]["present"] is False
    assert (hosts["pve-a3"]["status"], hosts["pve-a3"]["detail"]) == ("unreachable", OFFLINE)


def test_pyinfra_finds_every_member(site: Path) -> None:
    """``pyinfra inventories/pve_cluster.py deploy.py --dry``: the same three members."""
    run = _run(
        site, str(BIN / "pyinfra"), "inventories/pve_cluster.py", str(ROOT / "deploy.py"), "--dry"
    )
    out = run.stdout + run.stderr
    assert "[pve-a1] Ready" in out and "[pve-a2] Ready" in out, out
    assert f"[pve-a3] Could not connect ({OFFLINE})" in out, out
