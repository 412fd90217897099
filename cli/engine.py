"""Run one ksm-guard mode over an inventory through ``pyinfra.api`` and collect per-host results."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TextIO

from operations.report import DEFAULT_MAX_FRACTION, FAILED_VERDICTS, OK_VERDICTS, audit_record

from .inventory import InventoryError, make_inventory

# Exit codes, documented in the README and in ``ksm-guard --help``.
EXIT_OK = 0
EXIT_NONCOMPLIANT = 1  # audit: a host is exposed; change modes: a change failed or was refused
EXIT_USAGE = 2  # Click's own usage errors, and a missing or unloadable inventory
EXIT_UNREACHABLE = 3  # a host was unreachable or its state could not be read

SCHEMA_VERSION = 1
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class UsageError(Exception):
    """Bad input that changes nothing: reported on one line, exit code 2."""


class SudoPasswordRequired(OSError):
    """sudo wants a password and there is no terminal to ask on: the host fails, others go on."""


def _no_sudo_prompt(prompt: str = "", stream: TextIO | None = None) -> str:
    raise SudoPasswordRequired(
        "permission denied: sudo needs a password and there is no terminal to ask on "
        "(give the user NOPASSWD sudo, or connect as root)"
    )


@dataclass
class Request:
    """What the user asked for."""

    mode: str
    inventory: str = "@local"
    limit: list[str] = field(default_factory=list)
    dry_run: bool = False
    parallel: int = 0
    batch: int | None = None  # hosts changed at once; None: one for unmerge, all otherwise
    continue_on_error: bool = False
    progress: bool = False
    mask: bool = False
    force: bool = False
    sudo: bool = False
    max_fraction: float | None = None
    connect_timeout: int = 10
    vmids: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        """Hosts per rollout batch; 0 means all at once."""
        if self.batch is not None:
            return self.batch
        return 1 if self.mode == "unmerge" else 0


@dataclass
class HostResult:
    """One host's outcome: its status, the changes (from → to) and its audit afterwards."""

    host: str
    status: str  # ok, changed, would-change, refused, failed, not-reached, unreachable, error
    detail: str | None = None
    changes: list[str] = field(default_factory=list)
    audit: dict[str, Any] | None = None
    unmerge: dict[str, Any] | None = None  # pages, bytes, seconds, memory_used_bytes

    @property
    def verdict(self) -> str:
        if self.status in ("unreachable", "error"):
            return self.status
        return self.audit["verdict"] if self.audit else "error"


@dataclass
class RunResult:
    """The whole run."""

    mode: str
    dry_run: bool
    hosts: list[HostResult]

    @property
    def exit_code(self) -> int:
        if any(h.verdict in FAILED_VERDICTS for h in self.hosts):
            return EXIT_UNREACHABLE
        if self.mode == "audit":
            bad = any(h.verdict not in OK_VERDICTS for h in self.hosts)
        else:
            bad = any(h.status in ("refused", "failed") for h in self.hosts)
        return EXIT_NONCOMPLIANT if bad else EXIT_OK

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.hosts:
            counts[result.verdict] = counts.get(result.verdict, 0) + 1
        return counts


class _Capture(logging.Handler):
    """Collects pyinfra's per-host log lines: our diffs and refusals, and error output."""

    def __init__(self, echo: Callable[[str], None] | None) -> None:
        super().__init__(logging.DEBUG)
        self.changes: dict[tuple[str, bool], list[str]] = {}  # (host, executing): diff lines
        self.refusals: dict[str, str] = {}
        self.errors: dict[str, list[str]] = {}
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        host = getattr(record, "ksm_guard_host", None)
        change = getattr(record, "ksm_guard_change", None)
        refusal = getattr(record, "ksm_guard_refusal", None)
        text = _ANSI.sub("", record.getMessage())
        if host and change:
            executing = bool(getattr(record, "ksm_guard_executing", False))
            seen = self.changes.setdefault((host, executing), [])
            if change not in seen:
                seen.append(change)
        elif host and refusal:
            self.refusals.setdefault(host, refusal)
        elif record.levelno >= logging.ERROR:
            match = re.match(r"\s*\[([^\]]+)\]\s*(.*)", text)
            if match:
                self.errors.setdefault(match.group(1), []).append(match.group(2).strip())
        if self.echo and record.levelno >= logging.INFO:
            self.echo(text)


def _error_detail(lines: list[str]) -> str:
    """The most telling line of a host's error output."""
    useful = [line for line in lines if line and not line.startswith("Error")]
    for line in useful:
        found = re.search(r"permission denied: [^'\"]*", line)
        if found:
            return found.group(0).strip()
        if re.search(r"permission denied|not permitted|password is required", line, re.I):
            return f"permission denied: {line}"
    return (useful or lines or ["unknown error"])[0]


def _override_data(request: Request) -> dict[str, Any]:
    data: dict[str, Any] = {"ksm_mode": request.mode}
    if request.mask:
        data["ksm_mask"] = True
    if request.force:
        data["ksm_force"] = True
    if request.max_fraction is not None:
        data["ksm_max_fraction"] = request.max_fraction
    if request.vmids:
        data["ksm_vmids"] = list(request.vmids)
    return data


def _gather(state: Any, hosts: list[Any]) -> dict[Any, dict[str, Any] | None]:
    """Read the KsmHost fact on every host at once: one remote command each."""
    import gevent
    from pyinfra.api.facts import get_fact
    from pyinfra.context import ctx_host, ctx_state

    from operations.facts import KsmHost

    def read(host: Any) -> dict[str, Any] | None:
        with ctx_state.use(state), ctx_host.use(host):
            try:
                return get_fact(state, host, KsmHost, apply_failed_hosts=False)
            except Exception as error:  # a dropped connection must not end the fleet run
                logging.getLogger("pyinfra").error(f"[{host.name}] {error}")
                return None

    greenlets = {host: state.pool.spawn(read, host) for host in hosts}
    gevent.joinall(list(greenlets.values()))
    return {host: greenlet.value for host, greenlet in greenlets.items()}


def run(
    request: Request,
    confirm: Callable[[RunResult], bool] | None = None,
    echo: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """
    Run ``request`` and report per host. ``confirm`` sees the plan of a change before it runs,
    ``echo`` gets pyinfra's log lines and ``progress`` the pages still shared during an unmerge.
    """
    from pyinfra.api import BaseStateCallback, Config, State
    from pyinfra.api.connect import connect_all, disconnect_all
    from pyinfra.api.deploy import add_deploy
    from pyinfra.api.exceptions import PyinfraError

    from operations import modes

    try:
        inventory, chosen = make_inventory(
            request.inventory, _override_data(request), request.limit
        )
    except InventoryError as error:
        raise UsageError(str(error)) from None

    config = Config(
        PARALLEL=request.parallel,
        CONNECT_TIMEOUT=request.connect_timeout,
        SUDO=request.sudo,
    )
    for name in chosen:  # bound the whole handshake, not just the TCP connect
        data = inventory.get_host(name).data
        connect_kwargs = dict(data.get("ssh_paramiko_connect_kwargs") or {})
        for key in ("banner_timeout", "auth_timeout"):
            connect_kwargs.setdefault(key, request.connect_timeout)
        data.ssh_paramiko_connect_kwargs = connect_kwargs
    state = State(check_for_changes=True)
    state.init(inventory, config, initial_limit=[inventory.get_host(name) for name in chosen])

    capture = _Capture(echo)
    pyinfra_logger = logging.getLogger("pyinfra")
    saved = (pyinfra_logger.level, pyinfra_logger.propagate)
    pyinfra_logger.addHandler(capture)
    pyinfra_logger.setLevel(logging.INFO)
    pyinfra_logger.propagate = False
    # paramiko logs a failed handshake with a traceback on stderr: the host's row says it already.
    quiet = logging.NullHandler()
    paramiko_logger = logging.getLogger("paramiko")
    paramiko_logger.addHandler(quiet)

    unreachable: dict[str, str] = {}

    class ConnectErrors(BaseStateCallback):
        @staticmethod
        def host_connect_error(state: Any, host: Any, error: Any) -> None:
            text = str(error.args[0] if getattr(error, "args", None) else error)
            unreachable[host.name] = _ANSI.sub("", text)

    state.add_callback_handler(ConnectErrors())

    results: dict[str, HostResult] = {}
    previewed = request.dry_run
    # Off a terminal pyinfra would block on getpass() for a sudo password: fail the host instead.
    import pyinfra.connectors.util as connector_util

    asking = connector_util.getpass
    prompt_blocked = not sys.stdin.isatty()
    if prompt_blocked:
        connector_util.getpass = _no_sudo_prompt
    try:
        with suppress(PyinfraError):  # every host failed to connect: reported below
            connect_all(state)
        for name in chosen:
            if name in unreachable or not inventory.get_host(name).connected:
                unreachable.setdefault(name, "could not connect")
                results[name] = HostResult(name, "unreachable", detail=unreachable[name])
        live = [inventory.get_host(name) for name in chosen if name not in results]

        if request.mode != "audit" and live:
            with suppress(PyinfraError):  # hosts whose facts failed are reported below
                add_deploy(state, modes.run_from_host_data, host=live)
            planned = _collect(state, live, capture, executed=False)
            pending = any(r.status != "ok" for r in planned)
            if request.dry_run or (
                pending
                and confirm is not None
                and not confirm(RunResult(request.mode, True, planned))
            ):
                previewed = True  # a dry run, or the user said no: nothing was changed
                results.update({r.host: r for r in planned})
            else:
                rolled = _roll_out(state, live, request, capture, progress)
                results.update({r.host: r for r in rolled})

        max_fraction = request.max_fraction or DEFAULT_MAX_FRACTION
        readable = [inventory.get_host(name) for name in chosen if name not in unreachable]
        for host, fact in _gather(state, readable).items():
            result = results.setdefault(host.name, HostResult(host.name, "ok"))
            if fact is not None:
                result.audit = audit_record(fact, max_fraction)
                if result.unmerge is not None:
                    result.unmerge["memory_used_bytes"] = fact["mem_total"] - fact["mem_available"]
            elif result.status not in ("refused", "failed"):
                result.status = "error"
                result.detail = result.detail or _error_detail(capture.errors.get(host.name, []))
    finally:
        connector_util.getpass = asking
        try:
            disconnect_all(state)
        finally:
            pyinfra_logger.removeHandler(capture)
            paramiko_logger.removeHandler(quiet)
            pyinfra_logger.setLevel(saved[0])
            pyinfra_logger.propagate = saved[1]

    return RunResult(request.mode, previewed, [results[name] for name in chosen])


def _collect(state: Any, hosts: list[Any], capture: _Capture, executed: bool) -> list[HostResult]:
    """Per-host status of a prepared (or executed) change."""
    out = []
    for host in hosts:
        # Executed, a host reports what its operations found when they ran, not the plan.
        changes = capture.changes.get((host.name, executed), [])
        refusal = capture.refusals.get(host.name)
        failed = host in state.failed_hosts
        if refusal:
            status, detail = "refused", refusal
        elif failed:
            status, detail = "failed", _error_detail(capture.errors.get(host.name, []))
        elif executed and _did_change(state, host):
            status, detail = "changed", None
        elif not executed and state.get_meta_for_host(host).ops_change:
            status, detail = "would-change", None
        else:
            status, detail = "ok", None
        out.append(HostResult(host.name, status, detail, list(changes)))
    return out


def _roll_out(
    state: Any,
    hosts: list[Any],
    request: Request,
    capture: _Capture,
    progress: Callable[[str], None] | None,
) -> list[HostResult]:
    """
    Execute the prepared change in batches, in inventory order. Unless told to go on, stop
    after the first batch in which a host failed or was refused: the rest are not reached.
    """
    from pyinfra.api.exceptions import PyinfraError
    from pyinfra.api.operations import run_ops

    size = request.batch_size or len(hosts)
    batches = [hosts[start : start + size] for start in range(0, len(hosts), size)]
    out: list[HostResult] = []
    for number, batch in enumerate(batches):
        state.active_hosts = {host for host in batch if host not in state.failed_hosts}
        if state.active_hosts:
            watch = progress if request.mode == "unmerge" else None
            with _watching(batch, watch), suppress(PyinfraError):  # failures are collected below
                run_ops(state)
        done = _collect(state, batch, capture, executed=True)
        for result, host in zip(done, batch, strict=True):
            result.unmerge = _unmerge_figures(state, host)
        out.extend(done)
        stopped = [r.host for r in done if r.status in ("refused", "failed")]
        if stopped and not request.continue_on_error:
            rest = [host.name for later in batches[number + 1 :] for host in later]
            out.extend(
                HostResult(name, "not-reached", f"rollout stopped at {stopped[0]}") for name in rest
            )
            break
    return out


def _did_change(state: Any, host: Any) -> bool:
    """Whether any operation ran a command on ``host`` when executed."""
    return any(
        data.operation_meta.is_complete() and data.operation_meta.did_change()
        for data in state.ops.get(host, {}).values()
    )


def _unmerge_figures(state: Any, host: Any) -> dict[str, Any] | None:
    """What the unmerge script reported on this host: pages unmerged and seconds taken."""
    from operations.ksm import UNMERGE_MARK

    for op_data in state.ops.get(host, {}).values():
        meta = op_data.operation_meta
        if not meta.is_complete() or not meta.did_succeed():
            continue
        for line in meta.stdout_lines:
            words = line.split()
            if words[:1] == [UNMERGE_MARK]:
                fields = dict(word.split("=", 1) for word in words[1:] if "=" in word)
                return {
                    "pages": int(fields["pages"]),
                    "bytes": int(fields["pages"]) * int(fields["page_size"]),
                    "seconds": int(fields["ms"]) / 1000,
                    "memory_used_bytes": None,  # filled from the closing audit
                }
    return None


@contextmanager
def _watching(hosts: list[Any], progress: Callable[[str], None] | None) -> Iterator[None]:
    """While the block runs, report each host's pages still shared, read from sysfs each second."""
    if progress is None:
        yield
        return
    import gevent
    from gevent.event import Event
    from pyinfra.api import QuoteString, StringCommand

    from operations.facts import KSM_DIR

    command = StringCommand("cat", QuoteString(f"{KSM_DIR}/pages_sharing"))
    stop = Event()

    def poll() -> None:
        seen: dict[str, str] = {}
        while not stop.is_set():
            for host in hosts:
                ok, output = host.run_shell_command(command)
                value = output.stdout_lines[0].strip() if ok and output.stdout_lines else "?"
                if seen.get(host.name) != value:
                    seen[host.name] = value
                    progress(f"[{host.name}] unmerge: {value} pages still shared")
            stop.wait(1.0)

    watcher = gevent.spawn(poll)
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=10)
        watcher.kill()
