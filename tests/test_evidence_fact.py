"""The fact command's ``evidence`` section: parsed strictly, and tolerant of hosts without keys."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pyinfra.api.exceptions import FactProcessError

from ksm_guard.operations.evidence import EVIDENCE_COMMAND, parse_evidence
from ksm_guard.operations.facts import KSM_HOST_COMMAND, parse_ksm_host

GOOD = [
    "time=2025-03-01T08:15:00Z",
    "hostname=pve-a1",
    "kernel=6.8.12-8-pve",
    "machine_id=3d1219c7c4c5404aaa1f6d2a48adfda4",
    "boot_id=6512b46b-38c5-4118-9f4a-2bfd29bca9cf",
    "hostkey=/etc/ssh/ssh_host_ed25519_key.pub\t256 SHA256:tTkRBJ0HVj7Och+ig root@pve-a1 (ED25519)",
]
CORE = yaml.safe_load(
    (Path(__file__).parent / "facts/facts.KsmHost/masked_and_persisted.yaml").read_text()
)["output"]


def test_a_host_key_reads_as_ssh_keygen_reports_it() -> None:
    """Bits, fingerprint, comment and type, with the file it came from."""
    assert parse_evidence(GOOD)["host_keys"] == [
        {
            "path": "/etc/ssh/ssh_host_ed25519_key.pub",
            "bits": 256,
            "fingerprint": "SHA256:tTkRBJ0HVj7Och+ig",
            "comment": "root@pve-a1",
            "type": "ED25519",
        }
    ]


@pytest.mark.parametrize(
    ("report", "comment"),
    [
        ("3072 SHA256:w00F root@old (retired) (RSA)", "root@old (retired)"),
        ("256 SHA256:abc no comment (ECDSA)", "no comment"),
        ("256 SHA256:abc (ED25519)", None),
    ],
)
def test_comments_with_brackets_or_none(report: str, comment: str | None) -> None:
    """The type is the last bracketed word; between fingerprint and type is the comment."""
    key = parse_evidence([*GOOD[:5], f"hostkey=/etc/ssh/k.pub\t{report}"])["host_keys"][0]
    assert key["comment"] == comment


def test_a_key_ssh_keygen_could_not_read_is_listed_without_a_fingerprint() -> None:
    """ssh-keygen printed nothing (its complaint went to stderr): the file, no figures."""
    key = parse_evidence([*GOOD[:5], "hostkey=/etc/ssh/ssh_host_dsa_key.pub"])["host_keys"][0]
    assert key == {
        "path": "/etc/ssh/ssh_host_dsa_key.pub",
        "bits": None,
        "fingerprint": None,
        "comment": None,
        "type": None,
    }


@pytest.mark.parametrize(
    ("lines", "named"),
    [
        ([*GOOD, "uptime=12"], "uptime=12"),
        ([*GOOD, "hostname=again"], "hostname=again"),
        ([*GOOD[:5], "hostkey=relative.pub\t256 SHA256:x (RSA)"], "relative.pub"),
        ([*GOOD[:5], "hostkey=/k.pub\tnot a fingerprint"], "not a fingerprint"),
        (["time=yesterday", *GOOD[1:]], "time=yesterday"),
        (GOOD[1:], "lacks time"),
        ([*GOOD[:5], "hostkey=/k.pub\t256 SHA256:x (RSA)", "ssh_keygen=absent"], "absent"),
    ],
)
def test_garbage_raises_naming_the_line(lines: list[str], named: str) -> None:
    """Unknown, repeated or malformed lines raise FactProcessError quoting the host's line."""
    with pytest.raises(FactProcessError, match=named):
        parse_evidence(lines)


def test_the_section_rides_in_the_one_fact_command() -> None:
    """The evidence is part of KSM_HOST_COMMAND, after the core sections, behind its marker."""
    assert f"echo '## evidence'; {EVIDENCE_COMMAND}" in KSM_HOST_COMMAND
    state = parse_ksm_host([*CORE, "## evidence", *GOOD])
    assert state["evidence"]["hostname"] == "pve-a1"
    assert "evidence" not in parse_ksm_host(CORE)


def _run(command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, timeout=30, check=False, env=env
    )


def test_on_this_machine_the_evidence_is_this_machine() -> None:
    """Run for real: the ids are the files' contents, the kernel is uname's."""
    result = _run(KSM_HOST_COMMAND)
    assert result.returncode == 0, result.stderr
    evidence = parse_ksm_host(result.stdout.splitlines())["evidence"]
    assert evidence["kernel"] == os.uname().release
    assert evidence["hostname"] == os.uname().nodename
    assert evidence["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    machine_id = Path("/etc/machine-id")
    if machine_id.exists():
        assert evidence["machine_id"] == (machine_id.read_text().strip() or None)
    keys = sorted(str(path) for path in Path("/etc/ssh").glob("ssh_host_*_key.pub"))
    assert [key["path"] for key in evidence["host_keys"]] == keys
    if shutil.which("ssh-keygen") and keys:
        listed = _run(f"ssh-keygen -lf {keys[0]}").stdout.split()
        assert evidence["host_keys"][0]["fingerprint"] == listed[1]


def test_without_ssh_keygen_the_command_still_succeeds(tmp_path: Path) -> None:
    """A PATH that has every tool the command uses but ssh-keygen: ssh_keygen=absent, exit 0."""
    for tool in ("date", "uname", "head", "cat", "printf", "sh"):
        found = shutil.which(tool)
        if found:
            (tmp_path / tool).symlink_to(found)
    result = _run(EVIDENCE_COMMAND, env={"PATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    evidence = parse_evidence(result.stdout.splitlines())
    assert (evidence["ssh_keygen"], evidence["host_keys"]) == (False, [])


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)
def test_without_host_keys_the_command_still_succeeds() -> None:
    """/etc/ssh empty (a tmpfs over it, in a mount namespace of its own): no keys, exit 0."""
    script = f"mount -t tmpfs none /etc/ssh && {KSM_HOST_COMMAND}"
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0 and "mount" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    evidence = parse_ksm_host(result.stdout.splitlines())["evidence"]
    assert evidence["host_keys"] == []
