"""``ksm-guard verify``: the shipped testinfra checks, run against a pyinfra inventory's hosts."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import paramiko

from . import verify_plugin
from .connect import UNREACHABLE_DATA
from .engine import EXIT_NONCOMPLIANT, EXIT_OK, EXIT_UNREACHABLE, UsageError
from .inventory import InventoryError, make_inventory

CHECKS = Path(__file__).parent / "checks"
GRACE = 0.5  # seconds a probe may overrun the deadline to say what it was waiting for


@dataclass(frozen=True)
class SshTarget:
    """How testinfra's paramiko backend reaches one host: its ssh_config block, probed first."""

    name: str  # the inventory's name for the host
    alias: str  # its Host line in the ssh_config written for testinfra
    hostname: str
    port: int
    user: str | None
    key: str | None
    ignore_host_key: bool

    @classmethod
    def from_data(cls, name: str, alias: str, data: Any) -> SshTarget:
        key = data.get("ssh_key")
        strict = str(data.get("ssh_strict_host_key_checking", "")).lower()
        return cls(
            name=name,
            alias=alias,
            hostname=str(data.get("ssh_hostname") or name),
            port=int(data.get("ssh_port") or 22),
            user=str(data.get("ssh_user")) if data.get("ssh_user") else None,
            key=str(Path(str(key)).expanduser()) if key else None,
            ignore_host_key=strict in ("no", "off", "false"),
        )

    def config_block(self) -> str:
        lines = [f"Host {self.alias}", f"  HostName {self.hostname}", f"  Port {self.port}"]
        if self.user:
            lines.append(f"  User {self.user}")
        if self.key:
            lines.append(f"  IdentityFile {self.key}")
        if self.ignore_host_key:
            lines.append("  StrictHostKeyChecking no")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Target:
    """One inventory host: its name, its testinfra host spec, and its SSH settings if remote."""

    name: str
    spec: str
    ssh: SshTarget | None = None
    unreachable: str | None = None  # known before probing (its ksm_unreachable data)


def targets(
    inventory: str, limit: list[str], sudo: bool, timeout: int, ssh_config: Path
) -> list[Target]:
    """The inventory's chosen hosts for testinfra; writes their SSH settings to ``ssh_config``."""
    loaded, chosen = make_inventory(inventory, {}, limit, sudo=sudo, connect_timeout=timeout)
    found: list[Target] = []
    for name in chosen:
        if name.startswith("@local"):
            found.append(Target(name, "local://"))
            continue
        data = loaded.get_host(name).data
        ssh = SshTarget.from_data(name, f"ksm-guard-{len(found)}", data)
        query = {"ssh_config": str(ssh_config), "timeout": str(timeout)}
        if sudo or data.get("_sudo"):
            query["sudo"] = "true"
        spec = f"paramiko://{ssh.alias}?{urlencode(query)}"
        reason = data.get(UNREACHABLE_DATA)
        found.append(Target(name, spec, ssh, str(reason) if reason else None))
    ssh_config.write_text("".join(t.ssh.config_block() for t in found if t.ssh))
    return found


# Reachability ---------------------------------------------------------------------------------


PROBE_LOG = "ksm_guard.verify.ssh"  # paramiko's log channel for the probes: kept quiet
logging.getLogger(PROBE_LOG).addHandler(logging.NullHandler())
logging.getLogger(PROBE_LOG).propagate = False  # a failed handshake logs a traceback


def _why(error: Exception, where: str, timeout: float, late: bool, banner: bool) -> str:
    """Why a probe failed, in a few words."""
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused by {where}"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve {where}: {error.strerror}"
    if isinstance(error, TimeoutError):
        return f"no TCP connection to {where} within {timeout:g} s"
    if isinstance(error, paramiko.AuthenticationException):
        return f"SSH login to {where} failed: {error}"
    if late and not banner:
        return f"{where} took the connection but sent no SSH banner within {timeout:g} s"
    if late:
        return f"no SSH session with {where} within {timeout:g} s"
    if isinstance(error, OSError) and error.strerror:
        return f"{where}: {error.strerror}" + (f": {error.filename}" if error.filename else "")
    return f"{where}: {error or type(error).__name__}"


class _Probe:
    """One SSH login to one host in a thread of its own, every step bounded by one deadline."""

    def __init__(self, target: SshTarget, timeout: float, deadline: float) -> None:
        self.target = target
        self.timeout = timeout
        self.deadline = deadline
        self.reason: str | None = None
        self.aborted = threading.Event()
        self.client = paramiko.SSHClient()
        self.client.set_log_channel(PROBE_LOG)
        # testinfra's paramiko backend checks no host key either (it warns, then goes on).
        self.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        self.thread = threading.Thread(target=self._run, name=f"probe {target.name}", daemon=True)

    def _left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.01)

    def _run(self) -> None:
        target = self.target
        where = f"{target.hostname}:{target.port}"
        try:
            sock = socket.create_connection((target.hostname, target.port), timeout=self._left())
            with sock:
                if self.aborted.is_set():  # a slow name lookup: the deadline has passed
                    return
                self.client.connect(
                    target.hostname, target.port, username=target.user,
                    key_filename=target.key, sock=sock, timeout=self._left(),
                    banner_timeout=self._left(), auth_timeout=self._left(),
                )  # fmt: skip
        except Exception as error:
            transport = self.client.get_transport()
            banner = bool(transport and transport.remote_version)
            late = time.monotonic() >= self.deadline
            self.reason = _why(error, where, self.timeout, late, banner)
        finally:
            self.client.close()

    def abort(self) -> None:
        self.reason = f"no SSH session within {self.timeout:g} s"
        self.aborted.set()
        self.client.close()


def unreachable(hosts: list[SshTarget], timeout: float) -> dict[str, str]:
    """
    Log in to every host once, all at once, within ``timeout`` seconds in all (TCP connect, SSH
    banner, key exchange and login); why each host that could not be reached was not, by name.
    """
    deadline = time.monotonic() + timeout
    probes = [_Probe(host, timeout, deadline) for host in hosts]
    for probe in probes:
        probe.thread.start()
    for probe in probes:
        probe.thread.join(max(deadline - time.monotonic(), 0) + GRACE)
    for probe in probes:
        if probe.thread.is_alive():  # a stuck name lookup, say: its thread is a daemon
            probe.abort()
    return {probe.target.name: probe.reason for probe in probes if probe.reason is not None}


# The checks -----------------------------------------------------------------------------------


def _stream(command: list[str], env: dict[str, str], show: Callable[[str], None]) -> int:
    """Run ``command``, passing its output to ``show`` line by line; its exit status."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
    assert process.stdout is not None
    with process.stdout as output:
        for line in iter(output.readline, b""):
            show(line.decode(errors="replace"))
    return process.wait()


def _run_checks(hosts: list[Target], junit: Path, work: Path, show: Callable[[str], None]) -> int:
    """pytest on the shipped checks for ``hosts``, in a process of its own; its exit status."""
    hosts_file = work / "hosts.json"
    hosts_file.write_text(json.dumps([[host.name, host.spec] for host in hosts]))
    command = [
        sys.executable, "-m", "pytest", str(CHECKS),
        "-p", verify_plugin.__name__, f"{verify_plugin.HOSTS_OPTION}={hosts_file}",
        "-p", "no:cacheprovider", "-q", "--no-header", "-rfE",
        f"--color={'yes' if sys.stdout.isatty() else 'no'}",
        f"--junit-xml={junit}", "-o", "junit_suite_name=ksm-guard",
        "--rootdir", str(CHECKS), "-c", os.devnull,
    ]  # fmt: skip
    # Only the plugins asked for: not whatever else the environment has installed.
    package_root = str(Path(__file__).parent.parent)
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": path}
    return _stream(command, env, show)


VERDICTS = ("passed", "failed", "error", "unreachable")


@dataclass
class HostOutcome:
    """What the checks found on one host."""

    name: str
    verdict: str  # one of VERDICTS
    detail: str | None = None


def _outcomes(root: ET.Element) -> dict[str, HostOutcome]:
    """Per host named in the JUnit report: error if a check errored, else failed if one failed."""
    found: dict[str, HostOutcome] = {}
    for case in root.iter("testcase"):
        name = next(
            (p.get("value") for p in case.iter("property") if p.get("name") == "host"), None
        )
        if name is None:
            continue
        outcome = found.setdefault(name, HostOutcome(name, "passed"))
        error, failure = case.find("error"), case.find("failure")
        if error is not None and outcome.verdict != "error":
            message = error.get("message", "")
            found_in = re.fullmatch(r'failed on \w+ with "(?:Failed: )?(.*)"', message, re.S)
            outcome.verdict, outcome.detail = "error", found_in[1] if found_in else message
        elif failure is not None and outcome.verdict == "passed":
            outcome.verdict = "failed"
    return found


def _with_unreachable(root: ET.Element | None, dead: dict[str, str], timeout: int) -> ET.Element:
    """The JUnit report with one erroring testcase per unreachable host."""
    if root is None:
        root = ET.Element("testsuites", name="ksm-guard verify")
    suite = root.find("testsuite")
    if suite is None:
        suite = ET.SubElement(root, "testsuite", name="ksm-guard")
        for counter in ("errors", "failures", "skipped", "tests"):
            suite.set(counter, "0")
    for name, reason in dead.items():
        case = ET.SubElement(
            suite, "testcase", classname="ksm_guard.verify", name=f"ssh_session[{name}]"
        )
        case.set("time", str(timeout))
        properties = ET.SubElement(case, "properties")
        ET.SubElement(properties, "property", name=verify_plugin.HOST_PROPERTY, value=name)
        error = ET.SubElement(case, "error", type="unreachable", message=f"unreachable: {reason}")
        error.text = f"ksm-guard: {name}: unreachable: {reason}"
    for counter in ("tests", "errors"):
        suite.set(counter, str(int(suite.get(counter, "0")) + len(dead)))
    return root


def _writable(junit: Path) -> None:
    """Fail early, as a usage error, on a JUnit path that cannot be written."""
    try:
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.touch()
        junit.unlink()  # a report left by an earlier run must not count either
    except OSError as error:
        raise UsageError(f"cannot write the JUnit report {junit}: {error.strerror}") from None


def _read_junit(junit: Path) -> ET.Element | None:
    try:
        return ET.parse(junit).getroot()
    except (OSError, ET.ParseError):  # pytest never got to write it, or not all of it
        return None


def verify(
    *,
    inventory: str,
    limit: list[str],
    sudo: bool,
    junit_xml: Path | None,
    connect_timeout: int,
    show: Callable[[str], None],
    warn: Callable[[str], None],
) -> int:
    """
    Probe every host's SSH at once, run the checks on those that answered, report per host.
    ``show`` gets pytest's output and the summary, ``warn`` one line per host in trouble.
    """
    with tempfile.TemporaryDirectory(prefix="ksm-guard-verify-") as tmp:
        work = Path(tmp)
        try:
            hosts = targets(inventory, limit, sudo, connect_timeout, work / "ssh_config")
        except InventoryError as error:
            raise UsageError(str(error)) from None
        junit = junit_xml or work / "junit.xml"
        _writable(junit)
        dead = {host.name: host.unreachable for host in hosts if host.unreachable}
        probed = [host.ssh for host in hosts if host.ssh and host.name not in dead]
        dead |= unreachable(probed, connect_timeout)
        for name, reason in dead.items():
            warn(f"ksm-guard: {name}: unreachable: {reason}")

        live = [host for host in hosts if host.name not in dead]
        status = _run_checks(live, junit, work, show) if live else 0
        root = _read_junit(junit) if live else None
        outcomes = _outcomes(root) if root is not None else {}
        if status not in (0, 1) or any(host.name not in outcomes for host in live):
            warn(f"ksm-guard: the checks did not run to the end (pytest exit status {status})")
        if junit_xml is not None:
            ET.ElementTree(_with_unreachable(root, dead, connect_timeout)).write(
                junit, encoding="utf-8", xml_declaration=True
            )

    results = [
        HostOutcome(host.name, "unreachable", dead[host.name])
        if host.name in dead
        else outcomes.get(host.name, HostOutcome(host.name, "error", "not checked"))
        for host in hosts
    ]
    return _conclude(results, show, warn)


def _conclude(
    results: list[HostOutcome], show: Callable[[str], None], warn: Callable[[str], None]
) -> int:
    """Say which hosts errored and sum the run up in one line; the exit code."""
    for result in results:
        if result.verdict == "error":
            warn(f"ksm-guard: {result.name}: error: {result.detail}")
    code = exit_code(results)
    verdicts = [result.verdict for result in results]
    tally = ", ".join(f"{verdicts.count(v)} {v}" for v in VERDICTS if v in verdicts)
    show(f"{len(results)} host(s): {tally}; exit {code}\n")
    return code


def exit_code(results: list[HostOutcome]) -> int:
    """3 when a host was unreachable or errored, else 1 when a check failed, else 0."""
    verdicts = {result.verdict for result in results}
    if verdicts & {"unreachable", "error"}:
        return EXIT_UNREACHABLE
    return EXIT_NONCOMPLIANT if "failed" in verdicts else EXIT_OK
