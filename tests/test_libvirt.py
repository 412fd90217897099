"""
VMs under libvirt: QEMU processes named ``qemu:<name>``, and the domains' ``nosharepages`` opt-out,
read as libvirt writes them (libvirt/libvirt src/qemu/qemu_command.c at 4cf223962aa3:
qemuBuildNameCommandLine, qemuAppendDomainMemoryMachineParams; src/qemu/qemu_conf.c at
49f326edc0f9: the state and config folders; tests/qemustatusxml2xmldata/memory-backing-dir-in.xml
at 94bd5174d20f: the status file), and recognised as ksmtuned does (ksmtuned/ksmtuned 018d0ed5876a
src/ksmtuned.sh.in).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyinfra.api.exceptions import FactProcessError
from typer.testing import CliRunner

from ksm_guard.cli.app import app
from ksm_guard.operations.facts import KSM_HOST_COMMAND, Section, host_command, parse_ksm_host
from ksm_guard.operations.libvirt import (
    LIBVIRT_COMMAND,
    libvirt_command,
    link_domains,
    parse_libvirt,
)
from ksm_guard.operations.vms import QEMU_COMM

FACTS = Path(__file__).parent / "facts" / "facts.KsmHost"
RUN, CONF = "/run/libvirt/qemu", "/etc/libvirt/qemu"


def _domain(**changes: Any) -> dict[str, Any]:
    return {"pid": None, "persistent": True, "nosharepages": False, "error": None, **changes}


@pytest.mark.parametrize(
    ("comm", "matches"),
    [
        ("qemu:web1", True),
        ("qemu:averyveryv", True),  # -name process=qemu:averyveryverylongname, cut at 15
        ("qemu-system-x86", True),
        ("qemu-kvm", True),
        ("kvm", True),
        ("qemu:", False),  # ksmtuned's pattern wants a name after the colon
        ("qemu-ga", False),  # the guest agent, not a VM
        ("qemu-nbd", False),
    ],
)
def test_qemu_process_names_as_ksmtuned_counts_them(comm: str, matches: bool) -> None:
    """The names ksmtuned's committed_memory() counts as QEMU, and Proxmox VE's kvm."""
    assert bool(re.fullmatch(QEMU_COMM, comm)) is matches


def test_no_libvirt_folders_is_none() -> None:
    """No /run/libvirt/qemu nor /etc/libvirt/qemu: the host has no libvirt QEMU driver."""
    assert parse_libvirt(["absent"]) is None
    assert parse_libvirt([]) == {}  # the folders are there, no domain in them


@pytest.mark.parametrize(
    ("lines", "domains"),
    [
        # the persistent definition is what the next start uses, whatever the live one says
        (
            [f"{RUN}/a.pid:41", f"{RUN}/a.xml:0", f"{CONF}/a.xml:2"],
            {"a": _domain(pid=41, nosharepages=True)},
        ),
        # a transient domain has only its live definition: it is what runs, and then it is gone
        (
            [f"{RUN}/t.pid:7", f"{RUN}/t.xml:1"],
            {"t": _domain(pid=7, persistent=False, nosharepages=True)},
        ),
        # a pid file read while libvirt writes it
        ([f"{RUN}/w.pid:", f"{CONF}/w.xml:0"], {"w": _domain()}),
        # not root: libvirt's files are root's own
        (
            [f"{RUN}/r.pid:?", f"{RUN}/r.xml:?", f"{CONF}/r.xml:?"],
            {"r": _domain(nosharepages=None,
                          error="r.pid unread; r.xml (persistent definition) unread")},
        ),
        (
            [f"{RUN}/g.pid:12ab", f"{CONF}/g.xml:0"],
            {"g": _domain(error="g.pid: '12ab' is not a pid")},
        ),
        # a config folder that cannot be listed hides whether a domain is persistent
        (
            [f"{CONF}:?", f"{RUN}/h.pid:5", f"{RUN}/h.xml:0"],
            {"h": _domain(pid=5, persistent=None, nosharepages=None,
                          error=f"{CONF} cannot be listed")},
        ),
        (
            [f"{RUN}/p.pid:9"],
            {"p": _domain(pid=9, persistent=False, nosharepages=None,
                          error="no definition (p.xml) found")},
        ),
        # a name with a colon and dots: the value is after the last colon
        ([f"{CONF}/a:b.c.xml:1"], {"a:b.c": _domain(nosharepages=True)}),
    ],
)  # fmt: skip
def test_domain_files(lines: list[str], domains: dict[str, Any]) -> None:
    """Each domain from its pid file and definitions; what cannot be read is its error."""
    assert parse_libvirt(lines) == domains


@pytest.mark.parametrize(
    "line",
    [
        f"{CONF}/a.pid:1",  # libvirt keeps no pid file with the configs
        f"{RUN}/a.conf:1",
        f"{RUN}/sub/a.xml:1",
        "/tmp/a.xml:1",
        f"{RUN}/a.xml",
        "absent",  # only alone
    ],
)
def test_lines_the_section_cannot_print_fail_the_fact(line: str) -> None:
    """A line the command cannot print is garbage: the fact fails, as for every other section."""
    with pytest.raises(FactProcessError, match="libvirt domain line"):
        parse_libvirt([f"{RUN}/ok.xml:0", line])


def _vm(pid: int, **changes: Any) -> dict[str, Any]:
    return {
        "pid": pid, "vmid": None, "name": None, "mem_merge": True, "allow_ksm": None,
        "restart_pending": False, "error": None, **changes,
    }  # fmt: skip


def test_a_vm_is_the_domain_whose_pid_file_names_it() -> None:
    """Linked by the pid file; a pid no domain names, and a Proxmox VE VM, are left alone."""
    state: Any = {
        "vms": [
            _vm(10, name="web1"),
            _vm(11),
            _vm(12, vmid="100", allow_ksm=True, name="pve"),
            _vm(13, mem_merge=None),
            _vm(14),
        ],
        "libvirt_domains": {
            "web1": _domain(pid=10, nosharepages=True),
            "db": _domain(pid=11),
            "pve": _domain(pid=12, nosharepages=True),
            "odd": _domain(pid=13, nosharepages=True),
            "gone": _domain(pid=99),
        },
    }
    link_domains(state)
    assert state["vms"] == [
        _vm(10, name="web1", allow_ksm=False, restart_pending=True),
        _vm(11, name="db", allow_ksm=True),
        _vm(12, vmid="100", allow_ksm=True, name="pve"),
        _vm(13, name="odd", mem_merge=None, allow_ksm=False),  # runs how: unknown
        _vm(14),
    ]


def test_a_domain_error_is_its_vm_error() -> None:
    """What of the domain's files could not be read shows on its running VM."""
    state: Any = {
        "vms": [_vm(10, error="/proc/10/status: VmRSS line 'x'")],
        "libvirt_domains": {"a": _domain(pid=10, nosharepages=None, error="a.xml unread")},
    }
    link_domains(state)
    assert state["vms"][0]["allow_ksm"] is None
    assert state["vms"][0]["error"] == "/proc/10/status: VmRSS line 'x'; libvirt: a.xml unread"


def test_a_fixture_from_before_the_section_has_no_domains() -> None:
    """Output captured before the section existed parses as it did: no libvirt_domains key."""
    output = yaml.safe_load((FACTS / "qemu_no_pve_ksm_stat_versions.yaml").read_text())["output"]
    assert "libvirt_domains" not in parse_ksm_host(output)


def test_one_command_still() -> None:
    """The libvirt section is part of the one command, behind its marker."""
    assert f"; echo '## libvirt_domains'; {LIBVIRT_COMMAND}; " in f"{KSM_HOST_COMMAND}; "


def test_this_machine_without_libvirt_says_absent(tmp_path: Path) -> None:
    """Run for real where neither folder exists."""
    command = libvirt_command(str(tmp_path / "run"), str(tmp_path / "etc"))
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    assert result.stdout == "absent\n"


# -- real QEMU processes started with libvirt's argument shape ------------------------------------

QEMU = shutil.which("qemu-system-x86_64")
# The status file libvirt writes for a running domain, trimmed (tests/qemustatusxml2xmldata).
STATUS = """<domstatus state='running' reason='booted' pid='{pid}'>
  <taint flag='high-privileges'/>
  <domain type='qemu' id='1'>
    <name>{name}</name>
    <memory unit='KiB'>16384</memory>
{backing}    <vcpu placement='static'>1</vcpu>
  </domain>
</domstatus>
"""
DEFINITION = """<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh edit {name}
-->

<domain type='qemu'>
  <name>{name}</name>
  <memory unit='KiB'>16384</memory>
{backing}  <vcpu placement='static'>1</vcpu>
</domain>
"""
BACKING = "  <memoryBacking>\n    <nosharepages/>\n  </memoryBacking>\n"


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line for line in text.splitlines(keepends=True))


@pytest.fixture
def libvirt_host(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start halted QEMUs as libvirt would (pid file in the run folder); stop them afterwards."""
    if QEMU is None:
        pytest.skip("needs qemu-system-x86_64 (make test-deps)")
    run, conf = tmp_path / "run", tmp_path / "etc"
    run.mkdir()
    conf.mkdir()
    started: list[int] = []

    def start(
        name: str, *, process_name: bool, mem_merge: bool, live: bool, next_start: bool | None
    ) -> int:
        guest = (
            f"guest={name}"
            + (f",process=qemu:{name}" if process_name else "")
            + ",debug-threads=on"
        )
        machine = "pc,accel=tcg,usb=off,dump-guest-core=off" + (
            "" if mem_merge else ",mem-merge=off"
        )
        pidfile = run / f"{name}.pid"
        subprocess.run(
            [QEMU, "-name", guest, "-S", "-machine", machine, "-m", "16", "-display", "none",
             "-nodefaults", "-daemonize", "-pidfile", str(pidfile)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        pid = int(pidfile.read_text())
        started.append(pid)
        status = STATUS.format(pid=pid, name=name, backing=_indent(BACKING, 2) if live else "")
        (run / f"{name}.xml").write_text(status)
        if next_start is not None:
            backing = BACKING if next_start else ""
            (conf / f"{name}.xml").write_text(DEFINITION.format(name=name, backing=backing))
        return pid

    start.dirs = (str(run), str(conf))  # type: ignore[attr-defined]
    yield start
    for pid in started:
        subprocess.run(["kill", str(pid)], check=False)
    for pid in started:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, f"qemu {pid} did not stop"
            time.sleep(0.05)


def test_real_qemu_processes_in_libvirt_shape(libvirt_host: Callable[..., Any]) -> None:
    """
    Three halted QEMUs with libvirt's -name and -machine and libvirt's files beside them: each is
    found by the one command, named after guest=, its merged pages read, and its opt-out told.
    """
    web = libvirt_host("lv-web1", process_name=True, mem_merge=True, live=False, next_start=False)
    db = libvirt_host(
        "lv-db-primary-01", process_name=True, mem_merge=False, live=True, next_start=True
    )
    build = libvirt_host(
        "lv-build", process_name=False, mem_merge=True, live=False, next_start=True
    )
    run_dir, conf_dir = libvirt_host.dirs  # type: ignore[attr-defined]
    section = Section(
        "libvirt_domains",
        libvirt_command(run_dir, conf_dir),
        functools.partial(parse_libvirt, run_dir=run_dir, conf_dir=conf_dir),
        link_domains,
    )
    command = host_command((section,))
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"/proc/{db}/comm:qemu:lv-db-prim" in result.stdout.splitlines()  # cut at 15
    state = parse_ksm_host(result.stdout.splitlines(), (section,))
    found = {vm["pid"]: vm for vm in state["vms"]}
    seen = {
        pid: (found[pid]["name"], found[pid]["mem_merge"], found[pid]["allow_ksm"],
              found[pid]["restart_pending"])
        for pid in (web, db, build)
    }  # fmt: skip
    assert seen == {
        web: ("lv-web1", True, True, False),
        db: ("lv-db-primary-01", False, False, False),
        build: ("lv-build", True, False, True),
    }
    assert all(isinstance(found[pid]["merged_pages"], int) for pid in (web, db, build))
    assert state["libvirt_domains"] == {
        "lv-build": _domain(pid=build, nosharepages=True),
        "lv-db-primary-01": _domain(pid=db, nosharepages=True),
        "lv-web1": _domain(pid=web),
    }


def _fake(name: str, output: list[str]) -> tuple[str, dict[str, Any]]:
    return (f"@fake/{name}", {"fake_responses": {"echo '## meta'": output}, "fake_delay": 0})


def test_audit_reports_the_opt_out_as_allow_ksm(write_inventory: Callable[..., str]) -> None:
    """ksm-guard audit -o json: each libvirt VM's nosharepages, as allow_ksm and a restart."""
    output = yaml.safe_load((FACTS / "libvirt_set_process_name.yaml").read_text())["output"]
    inventory = write_inventory(f"hosts = {[_fake('kvm1', output)]!r}\n")
    result = CliRunner().invoke(app, ["audit", "-i", inventory, "-o", "json"])
    vms = json.loads(result.stdout)["hosts"][0]["audit"]["vms"]
    assert [(vm["name"], vm["allow_ksm"], vm["restart_pending"]) for vm in vms] == [
        ("web1", True, False),
        ("build", False, True),
        ("db-primary-01", False, False),
        ("scratch", True, False),
    ]
