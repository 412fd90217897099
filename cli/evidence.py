"""
``ksm-guard report``: an audit written out as an evidence bundle that proves itself.

The bundle is a directory: ``report.html`` (one self-contained page), ``report.json`` (the audit
JSON plus the evidence), ``report.junit.xml`` (a test case per host and control), ``raw/<host>.txt``
(each host's answer to the one fact command, as received) and ``SHA256SUMS`` over all of them.
It is written beside the target and renamed into place: a bundle is complete or absent.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ksm_guard.operations.capacity import CapacityPlan, plan_capacity
from ksm_guard.operations.controls import CONTROLS, Control, Outcome, evaluate
from ksm_guard.operations.model import HostState, Mode, Policy

from . import __version__
from .capacity import exit_code, inputs_from_run
from .capacity_render import plan_document

if TYPE_CHECKING:
    from .engine import HostResult, Request, RunResult

HTML_FILE = "report.html"
JSON_FILE = "report.json"
JUNIT_FILE = "report.junit.xml"
SUMS_FILE = "SHA256SUMS"
RAW_DIR = "raw"


class BundleError(Exception):
    """The bundle could not be written: one line naming the path."""


@dataclass(frozen=True)
class Meta:
    """Who made the report, how, and from which inventory."""

    started_at: str  # the controller's clock as the audit began, UTC, ISO 8601
    version: str
    command_line: str
    user: str
    controller: str  # this machine's hostname, as the kernel has it (never resolved)
    inventory: str
    inventory_sha256: str | None  # None: the inventory is no file (@local, host1,host2)

    @classmethod
    def now(cls, inventory: str) -> Meta:
        try:
            user = getpass.getuser()
        except OSError:  # no login name in the environment nor the password database
            user = str(os.getuid())
        digest = None
        with suppress(OSError):  # unreadable: the audit reports that as a usage error
            if os.path.isfile(inventory):
                digest = hashlib.sha256(Path(inventory).read_bytes()).hexdigest()
        return cls(
            started_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            version=__version__,
            command_line=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            user=user,
            controller=socket.gethostname(),
            inventory=inventory,
            inventory_sha256=digest,
        )


@dataclass(frozen=True)
class HostReport:
    """One host of the report: its audit result, its read, its raw file and its controls."""

    result: HostResult
    state: HostState | None
    output: list[str] | None  # the fact command's stdout lines; None: it never ran
    raw_path: str | None
    raw_sha256: str | None
    controls: list[tuple[Control, Outcome]]
    # report --sharing: the sharing scan's output as received, in raw/<name>.sharing.txt
    sharing_output: list[str] | None = None

    @property
    def sharing_path(self) -> str | None:
        if self.raw_path is None or not self.sharing_output:
            return None
        return self.raw_path.removesuffix(".txt") + ".sharing.txt"


@dataclass(frozen=True)
class Report:
    meta: Meta
    result: RunResult
    hosts: list[HostReport]
    capacity: CapacityPlan  # ``ksm-guard plan`` on the same reads (--min-headroom 0.10)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def raw_names(hosts: list[str]) -> dict[str, str]:
    """
    Each host's raw file, ``raw/<name>.txt``: every character but letters, digits, ``.``,
    ``_`` and ``-`` becomes ``_``, a leading ``.`` gets a ``_`` before it, names are cut at
    200 characters, and a name already taken (ignoring case) gets ``~2``, ``~3``, ... in
    inventory order.
    """
    taken: set[str] = set()
    names = {}
    for host in hosts:
        base = _UNSAFE.sub("_", host)[:200]
        if not base or base.startswith("."):
            base = f"_{base}"
        name, number = base, 1
        while name.lower() in taken:
            number += 1
            name = f"{base}~{number}"
        taken.add(name.lower())
        names[host] = f"{RAW_DIR}/{name}.txt"
    return names


def raw_text(lines: list[str]) -> str:
    """The command's stdout as received: pyinfra's lines, each ended by its newline."""
    return "".join(f"{line}\n" for line in lines)


def _outcomes(result: HostResult, state: HostState | None) -> list[tuple[Control, Outcome]]:
    if state is None:
        why = Outcome("error", f"{result.verdict}: {result.detail or 'no state read'}")
        return [(control, why) for control in CONTROLS]
    policy = Policy(result.audit["policy"]) if result.audit else Policy.HOST
    return evaluate(state, policy)


def build(result: RunResult, meta: Meta) -> Report:
    """The report of an audit: per host, its read, raw file name and digest, and controls."""
    names = raw_names([host.host for host in result.hosts])
    hosts = []
    for host in result.hosts:
        reading = result.readings.get(host.host)
        output = reading.output if reading is not None and reading.output else None
        state = reading.state if reading is not None else None
        digest = None
        if output is not None:
            digest = hashlib.sha256(raw_text(output).encode()).hexdigest()
        path = names[host.host] if output is not None else None
        scan = reading.sharing_output if reading is not None and reading.sharing_output else None
        hosts.append(HostReport(host, state, output, path, digest, _outcomes(host, state), scan))
    return Report(meta, result, hosts, plan_capacity(inputs_from_run(result)))


def as_document(report: Report) -> dict[str, Any]:
    """The audit JSON (schema_version 1) with the report's fields added."""
    from .render import document

    data = document(report.result)
    data["report"] = {
        "started_at": report.meta.started_at,
        "ksm_guard_version": report.meta.version,
        "command_line": report.meta.command_line,
        "controller": {"user": report.meta.user, "hostname": report.meta.controller},
        "inventory": {"spec": report.meta.inventory, "sha256": report.meta.inventory_sha256},
        "controls": [{"id": c.id, "title": c.title} for c in CONTROLS],
        "files": {"html": HTML_FILE, "junit": JUNIT_FILE, "sums": SUMS_FILE},
    }
    data["capacity"] = plan_document(report.capacity, exit_code(report.capacity))
    for entry, host in zip(data["hosts"], report.hosts, strict=True):
        entry["evidence"] = host.state.get("evidence") if host.state else None
        entry["raw_output"] = (
            {"path": host.raw_path, "sha256": host.raw_sha256} if host.raw_path else None
        )
        entry["controls"] = [
            {"id": c.id, "title": c.title, "result": o.result, "message": o.message}
            for c, o in host.controls
        ]
    return data


# Characters XML 1.0 cannot carry at all, escaped or not.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """``text`` with every character XML cannot hold replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", text)


def junit(report: Report) -> bytes:
    """JUnit XML: one testsuite, one testcase per host and control (classname: the host)."""
    cases = [
        (host, control, outcome) for host in report.hosts for control, outcome in host.controls
    ]
    counts = {
        kind: sum(1 for *_, outcome in cases if outcome.result == kind)
        for kind in ("fail", "error", "skip")
    }
    totals = {
        "tests": str(len(cases)),
        "failures": str(counts["fail"]),
        "errors": str(counts["error"]),
        "skipped": str(counts["skip"]),
    }
    root = ET.Element("testsuites", {"name": "ksm-guard report", **totals})
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": "ksm-guard report",
            "timestamp": report.meta.started_at,
            "hostname": report.meta.controller,
            **totals,
        },
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("ksm_guard_version", report.meta.version),
        ("command_line", report.meta.command_line),
        ("inventory", report.meta.inventory),
        ("inventory_sha256", report.meta.inventory_sha256 or ""),
    ):
        ET.SubElement(properties, "property", name=name, value=xml_text(value))
    for host, control, outcome in cases:
        name, message = xml_text(host.result.host), xml_text(outcome.message)
        case = ET.SubElement(
            suite,
            "testcase",
            classname=name,
            name=f"{control.id} {control.title}",
            time="0",
        )
        case_properties = ET.SubElement(case, "properties")
        ET.SubElement(case_properties, "property", name="host", value=name)
        ET.SubElement(case_properties, "property", name="control", value=control.id)
        ET.SubElement(case_properties, "property", name="verdict", value=host.result.verdict)
        if outcome.result == "fail":
            ET.SubElement(case, "failure", type=control.id, message=message)
        elif outcome.result == "error":
            ET.SubElement(case, "error", type=str(host.result.verdict), message=message)
        elif outcome.result == "skip":
            ET.SubElement(case, "skipped", message=message)
        else:
            ET.SubElement(case, "system-out").text = message
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def files(report: Report) -> dict[str, bytes]:
    """Every file of the bundle but SHA256SUMS, by path relative to the bundle."""
    from .html import page

    found = {
        host.raw_path: raw_text(host.output).encode()
        for host in report.hosts
        if host.raw_path and host.output is not None
    }
    for host in report.hosts:
        if host.sharing_path and host.sharing_output:
            found[host.sharing_path] = raw_text(host.sharing_output).encode()
    found[JSON_FILE] = (json.dumps(as_document(report), indent=2) + "\n").encode()
    found[JUNIT_FILE] = junit(report)
    found[HTML_FILE] = page(report).encode()
    return found


def sha256sums(contents: dict[str, bytes]) -> bytes:
    """``sha256sum`` text mode lines, sorted by path: ``sha256sum -c`` reads them back."""
    return "".join(
        f"{hashlib.sha256(data).hexdigest()}  {path}\n" for path, data in sorted(contents.items())
    ).encode()


def prepare(out: Path) -> None:
    """Fail early, before any host is contacted: ``out`` must be new or empty, its parent ours."""
    from .engine import UsageError

    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise UsageError(f"--out {out} exists and is not an empty directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)).rmdir()
    except OSError as error:
        raise UsageError(f"cannot write the report in {out.parent}: {error.strerror}") from None


def write(out: Path, contents: dict[str, bytes]) -> None:
    """Write the files and SHA256SUMS beside ``out``, then rename the whole into place."""
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        for relative, data in {**contents, SUMS_FILE: sha256sums(contents)}.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the bundle from other readers
        staging.replace(out)  # atomic; over an empty directory too
    except OSError as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        where = error.filename or out
        raise BundleError(f"cannot write the report {out}: {where}: {error.strerror}") from None


def report(request: Request, out: Path, echo: Callable[[str], None] | None) -> Report:
    """Audit (change nothing), then write the bundle to ``out`` (the map too with --sharing)."""
    from .engine import run

    if request.mode is not Mode.AUDIT:
        raise ValueError(f"an evidence report reads the fleet with an audit, not {request.mode}")
    prepare(out)
    meta = Meta.now(request.inventory)
    built = build(run(request, echo=echo), meta)
    write(out, files(built))
    return built
