"""
The VM parsers against the formats upstream writes: Proxmox VE configs and its run directory
(proxmox/qemu-server e6352be67f70 = 9.2.6, pve-guest-common 4a8f6cbf78e1), QEMU's options
(qemu/qemu: qapi/qapi-util.c 54e91d1523b4, util/keyval.c, system/vl.c 58deb358c661,
util/cutils.c 342e3a4f2065), ksm_stat across kernels (fs/proc/base.c), versions, garbage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

import pytest
from pyinfra.api.exceptions import FactProcessError

from ksm_guard.operations.facts import KSM_HOST_COMMAND
from ksm_guard.operations.report import allow_ksm_supported
from ksm_guard.operations.vms import (
    VmFileError,
    keyval,
    parse_cmdline,
    parse_ksm_stat,
    parse_pve_config,
    parse_qemu_server,
    parse_vm_rss,
    parse_vms,
    pending_deletes,
    qemu_bool,
    qemu_size,
)

MIB = 1024 * 1024


def _cfg(**changes: Any) -> dict[str, Any]:
    """A parsed config: qemu-server's defaults, with ``changes``."""
    return {
        "name": None, "allow_ksm": True, "lock": None, "template": False,
        "configured_bytes": 512 * MIB, "error": None, **changes,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["name: web1"], _cfg(name="web1")),
        (["allow-ksm: 0", "name: db"], _cfg(name="db", allow_ksm=False)),
        # a snapshot's allow-ksm and name belong to the snapshot, not the VM
        (["name: a", "[pre-upgrade]", "allow-ksm: 0", "name: b"], _cfg(name="a")),
        # set while running: qemu-server keeps it in [PENDING] until the next start
        (["name: a", "[PENDING]", "allow-ksm: 0"], _cfg(name="a", allow_ksm=False)),
        (["allow-ksm: 1", "[special:cloudinit]", "allow-ksm: 0"], _cfg()),
        (["allow-ksm: 1", "[special:fleecing]", "allow-ksm: 0"], _cfg()),
        # parse_vm_config matches [PENDING] in any case
        (["allow-ksm: 1", "[pending]", "allow-ksm: 0"], _cfg(allow_ksm=False)),
        # an unknown section is skipped, with what follows it
        (["allow-ksm: 1", "[not a snapshot]", "allow-ksm: 0"], _cfg()),
        # PVE booleans: 1/0 and on/off, yes/no, true/false in any case
        (["allow-ksm: OFF"], _cfg(allow_ksm=False)),
        (["allow-ksm: No"], _cfg(allow_ksm=False)),
        (["allow-ksm: false"], _cfg(allow_ksm=False)),
        (["allow-ksm: Yes"], _cfg()),
    ],
)  # fmt: skip
def test_pve_config(lines: list[str], expected: dict[str, object]) -> None:
    """Only the main section and [PENDING] decide; snapshots and special sections do not."""
    assert parse_pve_config(lines) == expected


@pytest.mark.parametrize(
    ("delete", "allow_ksm"),
    [
        ("allow-ksm,net1", True),
        ("!allow-ksm", True),  # a forced delete deletes it too
        ("net1,!allow-ksm", True),
        ("net1; allow-ksm", True),
        ("net1 !allow-ksm", True),
        ("net1,!memory", False),
        ("allow-ksmx", False),
    ],
)
def test_pending_delete_of_allow_ksm(delete: str, allow_ksm: bool) -> None:
    """
    ``delete:`` as pve-guest-common's parse_pending_delete reads it: split at ``,``, ``;`` and
    blanks, ``!`` marking a forced delete. Deleting allow-ksm: 0 means KSM allowed at next start.
    """
    config = parse_pve_config(["allow-ksm: 0", "[PENDING]", f"delete: {delete}"])
    assert config["allow_ksm"] is allow_ksm


def test_pending_value_wins_over_pending_delete() -> None:
    """vmconfig_apply_pending applies the deletes first, then the pending values."""
    config = parse_pve_config(["allow-ksm: 1", "[PENDING]", "allow-ksm: 0", "delete: !allow-ksm"])
    assert config["allow_ksm"] is False


def test_pending_deletes_split_like_pve_guest_common() -> None:
    """Commas, semicolons, runs of blanks; the force marker is not part of the key."""
    assert pending_deletes(" !net0;scsi1,, ide2  !allow-ksm") == {
        "net0", "scsi1", "ide2", "allow-ksm",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("lines", "allow_ksm"),
    [
        # the old way: qemu-server appends args after its own -machine, so this wins
        (["args: -machine mem-merge=off"], False),
        (["args: -machine q35,mem-merge=off"], False),
        (["args: -M type=q35,mem-merge=n -smbios 'type=0,vendor=FOO'"], False),
        (["args: --machine mem-merge=no"], False),
        # both ways at once
        (["allow-ksm: 0", "args: -machine mem-merge=off"], False),
        # args re-enables what allow-ksm: 0 switched off: QEMU keeps the last mem-merge
        (["allow-ksm: 0", "args: -machine mem-merge=on"], True),
        (["allow-ksm: 0", "args: -machine mem-merge=off -machine mem-merge=y"], True),
        # args without mem-merge leave allow-ksm in charge
        (["allow-ksm: 0", "args: -no-reboot"], False),
        (["args: -no-reboot"], True),
        # args set or deleted while running apply at the next start
        (["args: -machine mem-merge=off", "[PENDING]", "delete: args"], True),
        (["[PENDING]", "args: -machine mem-merge=off"], False),
        # -m is memory, not -M
        (["args: -m mem-merge=off"], True),
    ],
)
def test_args_mem_merge_decides_what_the_vm_starts_with(lines: list[str], allow_ksm: bool) -> None:
    """config_to_command: -machine ...,mem-merge=off for allow-ksm 0, then ``args`` after it."""
    config = parse_pve_config(lines)
    assert config["allow_ksm"] is allow_ksm
    assert config["error"] is None


@pytest.mark.parametrize(
    ("lines", "error", "expected"),
    [
        # qemu-server drops a line check_type refuses (and warns): the default applies
        (["allow-ksm: maybe"], "allow-ksm: 'maybe' is not a boolean", _cfg()),
        (["allow-ksm: 0", "[PENDING]", "allow-ksm: nah"], "allow-ksm: 'nah'",
         _cfg(allow_ksm=False)),
        (["memory: lots"], "memory: 'lots'", _cfg(configured_bytes=None)),
        (["memory: 8"], "of 16 or more", _cfg(configured_bytes=None)),
        (["memory: max=4096"], "memory: 'max=4096'", _cfg(configured_bytes=None)),
        # a pending line qemu-server drops leaves the main section's value in force
        (["memory: 1024", "[PENDING]", "memory: 1"], "memory: '1'",
         _cfg(configured_bytes=1024 * MIB)),
        (["lock: frozen"], "'frozen' is not a qemu-server lock", _cfg()),
        (["template: maybe"], "template: 'maybe'", _cfg()),
        (["garbage", "name: x"], "line 'garbage'", _cfg(name="x")),
        (["[broken", "name: x"], "line '[broken'", _cfg(name="x")),
        (["delete: net0"], "delete: outside [PENDING]", _cfg()),
        (["[PENDING]", "[PENDING]"], "a second [PENDING] section", _cfg()),
        (["args: -machine mem-merge=maybe"], "args: -machine mem-merge=maybe", _cfg()),
        (["allow-ksm: 0", "args: -machine 'q35"], "cannot be split", _cfg(allow_ksm=False)),
    ],
)  # fmt: skip
def test_unreadable_config_lines_become_the_error(
    lines: list[str], error: str, expected: dict[str, Any]
) -> None:
    """What cannot be read is named in ``error``; the rest of the config is read."""
    config = parse_pve_config(lines)
    assert config["error"] is not None and error in config["error"]
    assert {**config, "error": None} == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["memory: 2048"], _cfg(configured_bytes=2048 * MIB)),
        (["memory: current=4096"], _cfg(configured_bytes=4096 * MIB)),
        (["memory: 16"], _cfg(configured_bytes=16 * MIB)),
        # a pending memory change counts after the next start, not now
        (["memory: 2048", "[PENDING]", "memory: 8192"], _cfg(configured_bytes=2048 * MIB)),
        (["lock: backup"], _cfg(lock="backup")),
        (["lock: suspended", "[snap]", "lock: snapshot"], _cfg(lock="suspended")),
        (["template: 1"], _cfg(template=True)),
        (["template: 0"], _cfg()),
    ],
)
def test_memory_lock_and_template(lines: list[str], expected: dict[str, Any]) -> None:
    """memory is [current=]MiB (default 512); lock and template from the main section."""
    assert parse_pve_config(lines) == expected


@pytest.mark.parametrize(
    ("spelling", "value"),
    [("on", True), ("yes", True), ("true", True), ("y", True),
     ("off", False), ("no", False), ("false", False), ("n", False)],
)  # fmt: skip
def test_qemu_bool_spellings(spelling: str, value: bool) -> None:
    """qapi_bool_parse takes exactly these (in lower case)."""
    assert qemu_bool(spelling) is value
    found = parse_cmdline(["/usr/bin/kvm", "-machine", f"type=pc,mem-merge={spelling}"])
    assert (found["mem_merge"], found["errors"]) == (value, [])


@pytest.mark.parametrize("spelling", ["OFF", "0", "1", "maybe", "", "On"])
def test_other_qemu_bool_spellings_are_an_error(spelling: str) -> None:
    """Anything else: mem_merge unknown (None) and the error names the option."""
    found = parse_cmdline(["/usr/bin/kvm", "-machine", f"pc,mem-merge={spelling}"])
    assert found["mem_merge"] is None
    assert found["errors"] == [f"-machine mem-merge={spelling}: {spelling!r} is not a QEMU boolean"]


def test_machine_options_merge_last_value_wins() -> None:
    """QEMU merges every -machine/-M; a later mem-merge overrides an earlier one."""
    args = ["kvm", "-machine", "type=pc-i440fx-9.2+pve1,mem-merge=off", "-M", "mem-merge=on"]
    assert parse_cmdline(args)["mem_merge"] is True
    assert parse_cmdline(args[:3])["mem_merge"] is False
    assert parse_cmdline(["kvm", "-machine", "q35"])["mem_merge"] is True  # QEMU's default


def test_machine_mem_merge_without_a_value_is_an_error() -> None:
    """keyval refuses a later key without '=': QEMU would not start with it."""
    found = parse_cmdline(["kvm", "-machine", "q35,mem-merge"])
    assert found["mem_merge"] is None
    assert found["errors"] == ["-machine mem-merge without a value"]


def test_keyval_escapes_and_implied_key() -> None:
    """',,' is a comma; a first item without '=' is the implied key's value."""
    assert keyval("a,,b,debug-threads=on", "guest") == [("guest", "a,b"), ("debug-threads", "on")]
    assert keyval("type=q35,x", "type") == [("type", "q35"), ("x", None)]


def test_machine_mem_merge_off_and_name_escapes() -> None:
    """-machine ...,mem-merge=off turns merging off; ',,' in -name is a comma."""
    found = parse_cmdline(
        ["/usr/bin/kvm", "-name", "a,,b,debug-threads=on", "-M", "q35,mem-merge=off"]
    )
    assert (found["name"], found["uuid"], found["mem_merge"]) == ("a,b", None, False)


@pytest.mark.parametrize(
    ("args", "memory"),
    [
        (["-m", "2048"], 2048 * MIB),  # qemu-server without memory hotplug
        (["-m", "4G"], 4096 * MIB),
        (["-m", "1.5g"], 1536 * MIB),
        (["-m", "size=512M"], 512 * MIB),
        # qemu-server with memory hotplug: the most is maxmem
        (["-m", "size=1024,slots=255,maxmem=4194304M"], 4 * 1024**4),
        (["-m", "size=4G,slots=4,maxmem=8G"], 8 * 1024**3),
        (["-m", "1024", "-m", "maxmem=2G"], 2 * 1024**3),  # -m options merge
        ([], None),
    ],
)
def test_qemu_memory(args: list[str], memory: int | None) -> None:
    """-m as system/vl.c parse_memory_options reads it: a bare size is MiB, maxmem bytes."""
    found = parse_cmdline(["/usr/bin/qemu-system-x86_64", *args])
    assert (found["memory_bytes"], found["errors"]) == (memory, [])


def test_qemu_size_suffixes_and_refusals() -> None:
    """do_strtosz: one suffix B/K/M/G/T/P/E in any case; no fraction of a byte."""
    assert qemu_size("2k", "B") == 2048
    assert qemu_size("1E", "B") == 1024**6
    for bad in ("1.5", "lots", "4GiB", "-1M"):
        with pytest.raises(VmFileError):
            qemu_size(bad, "B")
    assert parse_cmdline(["kvm", "-m", "lots"])["errors"] == ["-m: 'lots' is not a QEMU size"]


@pytest.mark.parametrize(
    ("lines", "merging"),
    [
        (["ksm_rmap_items 310"], None),  # 6.1 (cb4df4cae4f2) to 6.3
        (["ksm_rmap_items 310", "ksm_merging_pages 300",
          "ksm_process_profit 1200000"], 300),  # 6.4 (d21077fbc2fc), 6.5
        (["ksm_rmap_items 310", "ksm_zero_pages 4", "ksm_merging_pages 300",
          "ksm_process_profit 1200000"], 300),  # 6.6 to 6.14
        (["ksm_rmap_items 310", "ksm_zero_pages 4", "ksm_merging_pages 300",
          "ksm_process_profit -8192", "ksm_merge_any: no", "ksm_mergeable: yes"],
         300),  # 6.15+ (3ab76c767bc7)
    ],
)  # fmt: skip
def test_ksm_stat_of_several_kernels(lines: list[str], merging: int | None) -> None:
    """Each kernel's ksm_stat parses; only 6.4 and later carry ksm_merging_pages."""
    stat = parse_ksm_stat(lines)
    assert stat.get("ksm_merging_pages") == merging
    assert stat["ksm_rmap_items"] == 310


def test_vm_rss_in_bytes() -> None:
    """VmRSS is printed in kB; absent (no line) is None, garbage an error."""
    assert parse_vm_rss(["VmRSS:\t  580216 kB"]) == 580216 * 1024
    assert parse_vm_rss([]) is None
    with pytest.raises(VmFileError, match="VmRSS"):
        parse_vm_rss(["VmRSS: lots"])


@pytest.mark.parametrize(
    ("version", "supported"),
    [("9.0.26", False), ("9.0.27", True), ("9.1.0+pve1", True), ("1:10.0", True),
     ("8.4.14", False), (None, False)],
)  # fmt: skip
def test_allow_ksm_needs_qemu_server_9_0_27(version: str | None, supported: bool) -> None:
    """allow-ksm exists from qemu-server 9.0.27 on."""
    assert allow_ksm_supported(version) is supported


@pytest.mark.parametrize(
    ("value", "version"),
    [("", None), ("ii |9.0.27", "9.0.27"), ("rc |8.0.1", None), ("un |", None),
     ("iiR|9.0.30", "9.0.30")],
)  # fmt: skip
def test_qemu_server_package_state(value: str, version: str | None) -> None:
    """Only an installed qemu-server has a version."""
    assert parse_qemu_server(value, f"qemu_server={value}") == version


KVM_100 = "/usr/bin/kvm\t-id\t100\t-pidfile\t/var/run/qemu-server/100.pid\t-m\t2048\t"


def test_vm_gone_between_listing_and_reading_is_dropped() -> None:
    """A listed process with an empty cmdline and no counters (it exited) is not a VM."""
    vms, _ = parse_vms(
        ["/var/run/qemu-server/100.pid:77", "/proc/77/comm:kvm", "/proc/77/cmdline:"], 4096
    )
    assert vms == []


def test_other_run_directory_files_are_not_vms() -> None:
    """
    Helpers.pm names a VM's pid file <vmid>.pid; swtpm's (<vmid>.swtpm.pid, get_tpm_paths) and
    qemu-storage-daemon's (qsd-<id>.pid) share the directory and the *.pid glob.
    """
    vms, _ = parse_vms(
        [
            "/var/run/qemu-server/100.pid:77",
            "/var/run/qemu-server/100.swtpm.pid:78",
            "/var/run/qemu-server/qsd-100.pid:79",
            "/var/run/qemu-server/odd name.pid:not a pid",
            "/proc/77/comm:kvm",
            f"/proc/77/cmdline:{KVM_100}",
        ],
        4096,
    )
    assert [(vm["pid"], vm["vmid"], vm["error"]) for vm in vms] == [(77, "100", None)]


def test_pid_file_of_another_process_is_not_the_vm() -> None:
    """check_running: the pid file's process must name that pid file in -pidfile."""
    vms, _ = parse_vms(
        ["/var/run/qemu-server/100.pid:77", "/proc/77/comm:kvm", "/proc/77/cmdline:kvm\t-m\t1G"],
        4096,
    )
    assert vms[0]["vmid"] is None


def test_one_vm_odd_files_give_that_vm_an_error() -> None:
    """Garbage in a VM's pid file, counters, status or config: the VM says so; others read on."""
    lines = [
        "/var/run/qemu-server/100.pid:abc",
        "/var/run/qemu-server/101.pid:88",
        "/etc/pve/qemu-server/100.conf:allow-ksm: maybe",
        "/etc/pve/qemu-server/101.conf:allow-ksm: 0",
        "/proc/77/comm:kvm",
        f"/proc/77/cmdline:{KVM_100}",
        "/proc/77/ksm_merging_pages:many",
        "/proc/77/ksm_stat:Ksm Stuff",
        "/proc/77/status:VmRSS: lots",
        "/proc/88/comm:kvm",
        f"/proc/88/cmdline:{KVM_100.replace('100', '101')}-machine\tmem-merge=off\t",
        "/proc/88/ksm_merging_pages:0",
        "/proc/88/status:VmRSS:\t 1024 kB",
    ]
    vms, configs = parse_vms(lines, 4096)
    odd, fine = vms
    assert odd["vmid"] == "100"  # named by its -pidfile, since the pid file holds no pid
    assert odd["error"] == (
        "/proc/77/ksm_stat: ksm_stat line 'Ksm Stuff'; "
        "/proc/77/ksm_merging_pages: 'many' is not a page count; "
        "/proc/77/status: VmRSS line 'VmRSS: lots'; "
        "/etc/pve/qemu-server/100.conf: allow-ksm: 'maybe' is not a boolean; "
        "/var/run/qemu-server/100.pid: 'abc' is not a pid"
    )
    assert (odd["merged_pages"], odd["rss_bytes"], odd["allow_ksm"]) == (None, None, True)
    assert configs["100"]["error"] == odd["error"].split("; ", 3)[3]
    assert fine["error"] is None and configs["101"]["error"] is None
    assert (fine["vmid"], fine["allow_ksm"], fine["mem_merge"], fine["restart_pending"]) == (
        "101", False, False, False,
    )  # fmt: skip
    assert (fine["rss_bytes"], fine["configured_bytes"]) == (1024 * 1024, 512 * MIB)


def test_unknown_mem_merge_spelling_leaves_restart_unknown() -> None:
    """An unreadable mem-merge: mem_merge None, no restart claimed, the error says why."""
    vms, _ = parse_vms(
        [
            "/var/run/qemu-server/100.pid:77",
            "/etc/pve/qemu-server/100.conf:allow-ksm: 0",
            "/proc/77/comm:kvm",
            f"/proc/77/cmdline:{KVM_100}-machine\tmem-merge=OFF\t",
        ],
        4096,
    )
    assert (vms[0]["mem_merge"], vms[0]["restart_pending"]) == (None, False)
    assert vms[0]["error"] == (
        "/proc/77/cmdline: -machine mem-merge=OFF: 'OFF' is not a QEMU boolean"
    )


def test_configured_bytes_from_config_else_cmdline() -> None:
    """A configured VM's memory comes from its config; an unconfigured one's from -m."""
    vms, _ = parse_vms(
        [
            "/var/run/qemu-server/100.pid:77",
            "/etc/pve/qemu-server/100.conf:memory: 4096",
            "/proc/77/comm:kvm",
            f"/proc/77/cmdline:{KVM_100}",
            "/proc/78/comm:qemu-system-x86",
            "/proc/78/cmdline:qemu-system-x86_64\t-m\tsize=1G,slots=2,maxmem=3G\t",
        ],
        4096,
    )
    assert [vm["configured_bytes"] for vm in vms] == [4096 * MIB, 3 * 1024**3]


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("/proc/12/environ:x", "environ"),
        ("/etc/hosts:127.0.0.1 localhost", "localhost"),
        ("/proc/13/ksm_stat:ksm_rmap_items 1", "before its comm.*ksm_rmap_items"),
        ("bash: line 1: grep: not found", "not found"),
    ],
)
def test_lines_the_command_cannot_print_still_fail_the_fact(line: str, named: str) -> None:
    """Output that is not what the VM section prints raises FactProcessError quoting it."""
    lines = ["/proc/12/comm:kvm", "/proc/12/cmdline:/usr/bin/kvm\t", line]
    with pytest.raises(FactProcessError, match=named):
        parse_vms(lines, 4096)


def test_bad_package_state_raises() -> None:
    """A qemu_server line that is not dpkg-query's format is garbage."""
    with pytest.raises(FactProcessError, match="installed"):
        parse_qemu_server("installed", "qemu_server=installed")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as nobody")
def test_command_succeeds_when_vm_counters_are_unreadable(tmp_path) -> None:
    """Run as nobody beside a root-owned kvm process: the fact command still exits 0."""
    kvm = tmp_path / "kvm"
    shutil.copy("/bin/sleep", kvm)
    proc = subprocess.Popen([str(kvm), "30"])
    try:
        time.sleep(0.2)
        result = subprocess.run(
            ["su", "nobody", "-s", "/bin/sh", "-c", KSM_HOST_COMMAND],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert f"/proc/{proc.pid}/comm:kvm" in out
    # /proc/PID/status is world-readable: VmRSS comes even without root
    assert any(line.startswith(f"/proc/{proc.pid}/status:VmRSS:") for line in out)
