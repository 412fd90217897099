"""The ``evidence`` fact section: who answered the one fact command, and when."""

from __future__ import annotations

import re

from pyinfra.api.exceptions import FactProcessError

from .model import Evidence, HostKey
from .vms import parse_error, parse_int

MACHINE_ID = "/etc/machine-id"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
HOST_KEYS = "/etc/ssh/ssh_host_*_key.pub"

# One ``key=value`` line each; ``hostkey=PATH<TAB>`` and what ``ssh-keygen -lf`` says of it
# (nothing when it cannot read the key), or ``ssh_keygen=absent``. Its last part exits 0 on
# every host, keys or none, so the whole fact command still succeeds.
EVIDENCE_COMMAND = "; ".join(
    (
        'echo "time=$(date -u +%Y-%m-%dT%H:%M:%SZ)"',
        'echo "hostname=$(uname -n)"',
        'echo "kernel=$(uname -r)"',
        f'echo "machine_id=$(! test -e {MACHINE_ID} || head -n 1 {MACHINE_ID})"',
        f'echo "boot_id=$(! test -e {BOOT_ID} || head -n 1 {BOOT_ID})"',
        "if command -v ssh-keygen >/dev/null; then"
        f' for k in {HOST_KEYS}; do ! test -e "$k" ||'
        ' printf \'hostkey=%s\\t%s\\n\' "$k" "$(ssh-keygen -lf "$k" | head -n 1)"; done;'
        " else echo ssh_keygen=absent; fi",
    )
)

_FIELDS = ("time", "hostname", "kernel", "machine_id", "boot_id")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
# ``256 SHA256:tTkR...+ig root@pve1 (ED25519)``; a key without a comment says ``no comment``.
_FINGERPRINT = re.compile(
    r"(?P<bits>\d+) (?P<fingerprint>\S+)(?: (?P<comment>.*?))? \((?P<type>[^()\s]+)\)"
)


def _host_key(value: str, line: str) -> HostKey:
    path, _, report = value.partition("\t")
    if not path.startswith("/"):
        raise parse_error(line, "an SSH host key line")
    report = report.strip()
    if not report:  # ssh-keygen could not read it (its message went to stderr)
        return {"path": path, "bits": None, "fingerprint": None, "comment": None, "type": None}
    found = _FINGERPRINT.fullmatch(report)
    if found is None:
        raise parse_error(line, "ssh-keygen -lf output")
    return {
        "path": path,
        "bits": parse_int(found["bits"], line, "key bits"),
        "fingerprint": found["fingerprint"],
        "comment": found["comment"] or None,
        "type": found["type"],
    }


def parse_evidence(lines: list[str]) -> Evidence:
    """The ``evidence`` section's lines as an ``Evidence`` record."""
    fields: dict[str, str] = {}
    host_keys: list[HostKey] = []
    ssh_keygen = True
    for line in lines:
        key, sep, value = line.partition("=")
        if key == "hostkey" and sep:
            host_keys.append(_host_key(value, line))
        elif line == "ssh_keygen=absent" and ssh_keygen and not host_keys:
            ssh_keygen = False
        elif key in _FIELDS and sep and key not in fields:
            fields[key] = value.strip()
        else:
            raise parse_error(line, "an evidence line")
    missing = [name for name in _FIELDS if name not in fields]
    if missing:
        raise FactProcessError(f"ksm-guard evidence lacks {', '.join(missing)}")
    if not _TIME.fullmatch(fields["time"]):
        raise parse_error(f"time={fields['time']}", "the host's UTC time")
    if not fields["hostname"] or not fields["kernel"]:
        raise FactProcessError("ksm-guard evidence lacks the hostname or kernel release")
    return {
        "time": fields["time"],
        "hostname": fields["hostname"],
        "kernel": fields["kernel"],
        "machine_id": fields["machine_id"] or None,
        "boot_id": fields["boot_id"] or None,
        "ssh_keygen": ssh_keygen,
        "host_keys": host_keys,
    }
