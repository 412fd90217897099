"""``ksm-guard verify``: the shipped testinfra checks, run against a pyinfra inventory's hosts."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .engine import EXIT_NONCOMPLIANT, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, UsageError
from .inventory import InventoryError, make_inventory

CHECKS = Path(__file__).parent / "checks"


def _ssh_block(alias: str, data: Any) -> str:
    """An ssh_config ``Host`` block for one pyinfra host (paramiko reads it for testinfra)."""
    lines = [f"Host {alias}", f"  HostName {data.get('ssh_hostname') or alias}"]
    if data.get("ssh_port"):
        lines.append(f"  Port {int(data.get('ssh_port'))}")
    if data.get("ssh_user"):
        lines.append(f"  User {data.get('ssh_user')}")
    if data.get("ssh_key"):
        lines.append(f"  IdentityFile {Path(str(data.get('ssh_key'))).expanduser()}")
    if str(data.get("ssh_strict_host_key_checking", "")).lower() in ("no", "off", "false"):
        lines.append("  StrictHostKeyChecking no")
    return "\n".join(lines) + "\n"


def host_specs(spec: str, limit: list[str], sudo: bool, ssh_config: Path) -> list[str]:
    """testinfra host specs for the inventory's hosts; writes their SSH settings to ssh_config."""
    inventory, chosen = make_inventory(spec, {}, limit)
    specs: list[str] = []
    blocks: list[str] = []
    for name in chosen:
        host = inventory.get_host(name)
        if name.startswith("@local"):
            specs.append("local://")
            continue
        alias = f"ksm-guard-{len(blocks)}"
        blocks.append(_ssh_block(alias, host.data))
        query = f"ssh_config={ssh_config}"
        if sudo or host.data.get("_sudo"):
            query += "&sudo=true"
        specs.append(f"paramiko://{alias}?{query}")
    ssh_config.write_text("\n".join(blocks))
    return specs


def _outcome(junit: Path) -> int:
    root = ET.parse(junit).getroot()
    cases = list(root.iter("testcase"))
    if any(case.find("error") is not None for case in cases):
        return EXIT_UNREACHABLE
    if any(case.find("failure") is not None for case in cases):
        return EXIT_NONCOMPLIANT
    return EXIT_OK


def verify(spec: str, limit: list[str], sudo: bool, junit_xml: Path | None) -> int:
    """Run the checks with pytest; 0 when every host passes, 1 when a check fails, 3 on errors."""
    with tempfile.TemporaryDirectory(prefix="ksm-guard-verify-") as tmp:
        ssh_config = Path(tmp) / "ssh_config"
        try:
            specs = host_specs(spec, limit, sudo, ssh_config)
        except InventoryError as error:
            raise UsageError(str(error)) from None
        junit = junit_xml or Path(tmp) / "junit.xml"
        command = [
            sys.executable, "-m", "pytest", str(CHECKS), f"--hosts={','.join(specs)}",
            "-p", "no:cacheprovider", "-q", "--no-header", "-rfE", f"--junit-xml={junit}",
            "--rootdir", str(CHECKS), "-c", "/dev/null",
        ]  # fmt: skip
        result = subprocess.run(command, check=False)
        if result.returncode not in (0, 1) or not junit.exists():
            return EXIT_USAGE if result.returncode in (2, 4) else EXIT_UNREACHABLE
        return _outcome(junit)
