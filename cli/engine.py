"""
Run one ksm-guard mode over an inventory through ``pyinfra.api``, in named steps:
connect, read, plan, confirm, roll out, closing audit.

The plan is ``operations.plan``'s, from one read per host: a dry run and the prompt show it, and
the real run carries it out batch by batch, each batch planned again on a fresh read right before
its turn (``operations.modes``). Results come from the planner's own data and pyinfra's public
objects (``OperationMeta``, ``BaseStateCallback``, ``State.failed_hosts``), never from log text.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from ksm_guard.operations.model import HostState, Mode, Options, Status, Verdict
from ksm_guard.operations.plan import HostPlan, Part, Refusal, RefusalCode
from ksm_guard.operations.report import AuditRecord, audit_record, waiver_line

from .inventory import InventoryError, make_inventory

if TYPE_CHECKING:
    from pyinfra.api import Host, Inventory, State

# Exit codes, documented in the README and in ``ksm-guard --help``.
EXIT_OK = 0
EXIT_NONCOMPLIANT = 1  # audit: a host is exposed; change modes: a change failed or was refused
EXIT_USAGE = 2  # Click's own usage errors, and a missing or unloadable inventory
EXIT_UNREACHABLE = 3  # a host was unreachable or its state could not be read

SCHEMA_VERSION = 1
# The rollout's order (unmerge --order): the inventory's, or the capacity plan's.
ORDER_INVENTORY = "inventory"
ORDER_PLAN = "plan"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# stderr lines a login shell or sudo prints that say nothing about what failed.
_NOISE = re.compile(r"could not chdir to home directory|^sudo: unable to resolve host", re.I)


class UsageError(Exception):
    """Bad input that changes nothing: reported on one line, exit code 2."""


@dataclass
class Request:
    """What the user asked for."""

    mode: Mode
    inventory: str = "@local"
    limit: list[str] = field(default_factory=list)
    dry_run: bool = False
    parallel: int = 0
    batch: int | None = None  # hosts changed at once; None: one for unmerge, all otherwise
    continue_on_error: bool = False
    mask: bool = False
    force: bool = False
    sudo: bool = False
    max_fraction: float | None = None
    connect_timeout: int = 10
    vmids: list[int] = field(default_factory=list)
    policy: str | None = None  # host or strict; None: each host's ksm_policy (default host)
    ignore_waivers: bool = False
    watch: bool = False  # install the drift watch (disable, unmerge)
    heal: bool = False  # the watch heals drift
    watch_interval: int | None = None  # seconds; None: each host's ksm_watch_interval (300)
    order: str = ORDER_INVENTORY  # ORDER_PLAN: hosts the capacity plan calls safe first
    sharing: bool = False  # audit: also the cross-VM sharing map (one more command per host)

    @property
    def batch_size(self) -> int:
        """Hosts per rollout batch; 0 means all at once."""
        if self.batch is not None:
            return self.batch
        return 1 if self.mode is Mode.UNMERGE else 0

    def override_data(self) -> dict[str, Any]:
        """Host data the options set: the same keys a deploy reads (``--data ksm_mode=...``)."""
        data: dict[str, Any] = {"ksm_mode": self.mode.value}
        if self.mask:
            data["ksm_mask"] = True
        if self.force:
            data["ksm_force"] = True
        if self.max_fraction is not None:
            data["ksm_max_fraction"] = self.max_fraction
        if self.vmids:
            data["ksm_vmids"] = list(self.vmids)
        if self.policy is not None:
            data["ksm_policy"] = self.policy
        if self.ignore_waivers:
            data["ksm_ignore_waivers"] = True
        if self.watch or self.heal:
            data["ksm_watch"] = True
        if self.heal:
            data["ksm_watch_heal"] = True
        if self.watch_interval is not None:
            data["ksm_watch_interval"] = self.watch_interval
        return data


@dataclass
class HostResult:
    """One host's outcome: its status, the changes (from → to) and its audit."""

    host: str
    status: Status
    detail: str | None = None
    changes: list[str] = field(default_factory=list)
    audit: AuditRecord | None = None
    refusal: Refusal | None = None
    skipped: list[str] = field(default_factory=list)  # left as is (a locked VM): counts as refused
    unmerge: dict[str, Any] | None = None  # pages, bytes, seconds, memory_used_bytes

    @property
    def sharing_error(self) -> str | None:
        """Why ``--sharing`` could not map this host (the rest of its audit stands)."""
        sharing = self.audit.get("sharing") if self.audit else None
        return sharing["error"] if sharing else None

    @property
    def verdict(self) -> Verdict:
        if self.status is Status.UNREACHABLE:
            return Verdict.UNREACHABLE
        if self.audit is None:
            return Verdict.ERROR
        return Verdict(self.audit["verdict"])


@dataclass
class RunResult:
    """The whole run. ``dry_run``: nothing was changed because none was asked for."""

    mode: Mode
    dry_run: bool
    hosts: list[HostResult]
    declined: bool = False  # the operator said no at the prompt: nothing changed
    # Each reached host's first read, the one the plan was made from (an audit's only read).
    readings: dict[str, Reading] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.declined:
            return EXIT_OK
        if any(h.verdict.unread or h.sharing_error for h in self.hosts):
            return EXIT_UNREACHABLE
        if any(h.status in (Status.REFUSED, Status.FAILED) or h.skipped for h in self.hosts):
            return EXIT_NONCOMPLIANT
        if self.mode is Mode.AUDIT and any(h.verdict.exposed for h in self.hosts):
            return EXIT_NONCOMPLIANT
        return EXIT_OK

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for result in self.hosts:
            counts[result.verdict.value] = counts.get(result.verdict.value, 0) + 1
        return counts

    @property
    def pending(self) -> list[HostResult]:
        """Hosts the plan would change."""
        return [h for h in self.hosts if h.status is Status.WOULD_CHANGE]


@dataclass
class Reading:
    """One host's KSM state as read by the one fact command, or why it could not be."""

    state: HostState | None
    error: str | None = None
    output: list[str] = field(default_factory=list)
    sharing_output: list[str] = field(default_factory=list)  # audit --sharing's scan, as received


# -- step helpers ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(_ANSI.sub("", text).split())


def stderr_reason(lines: list[str]) -> str | None:
    """The line of a command's stderr that says what went wrong (sudo's message, ...)."""
    useful = [line.strip() for line in lines if line.strip() and not _NOISE.search(line)]
    for line in useful:
        if re.search(r"password is required|interactive authentication is required", line):
            return f"permission denied: {line}"
    return useful[-1] if useful else None


class SudoPasswordRequired(OSError):
    """sudo wants a password and there is no terminal to ask on: the host fails, others go on."""


def _no_sudo_prompt(prompt: str = "", stream: TextIO | None = None) -> str:
    raise SudoPasswordRequired(
        "permission denied: sudo needs a password and there is no terminal to ask on "
        "(give the user NOPASSWD sudo, or connect as root)"
    )


@contextmanager
def no_password_prompt() -> Iterator[None]:
    """
    Off a terminal, make pyinfra fail a host instead of blocking on ``getpass`` for its sudo
    password. pyinfra offers no setting for this: it calls ``getpass`` from
    ``pyinfra.connectors.util.execute_command_with_sudo_retry`` (tests/test_engine.py fails when
    that changes). This is the only place ksm-guard reaches into pyinfra.
    """
    import pyinfra.connectors.util as connector_util

    if sys.stdin.isatty():
        yield
        return
    asking = connector_util.getpass
    connector_util.getpass = _no_sudo_prompt
    try:
        yield
    finally:
        connector_util.getpass = asking


class _Echo(logging.Handler):
    def __init__(self, echo: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        self.echo(_ANSI.sub("", record.getMessage()))


@contextmanager
def _logs(echo: Callable[[str], None] | None) -> Iterator[None]:
    """pyinfra's log goes to ``echo`` (or nowhere); paramiko's handshake tracebacks nowhere."""
    pyinfra_logger = logging.getLogger("pyinfra")
    paramiko_logger = logging.getLogger("paramiko")
    handler: logging.Handler = _Echo(echo) if echo else logging.NullHandler()
    quiet = logging.NullHandler()
    saved = (pyinfra_logger.level, pyinfra_logger.propagate, paramiko_logger.propagate)
    pyinfra_logger.addHandler(handler)
    paramiko_logger.addHandler(quiet)
    pyinfra_logger.setLevel(logging.INFO)
    pyinfra_logger.propagate = paramiko_logger.propagate = False
    try:
        yield
    finally:
        pyinfra_logger.removeHandler(handler)
        paramiko_logger.removeHandler(quiet)
        pyinfra_logger.setLevel(saved[0])
        pyinfra_logger.propagate, paramiko_logger.propagate = saved[1], saved[2]


def _new_state(inventory: Inventory, request: Request, hosts: list[str]) -> State:
    from pyinfra.api import Config, State

    config = Config(PARALLEL=request.parallel, CONNECT_TIMEOUT=request.connect_timeout)
    config.SUDO = request.sudo
    state = State(check_for_changes=True)
    state.init(inventory, config, initial_limit=[inventory.get_host(name) for name in hosts])
    return state


def _bound_handshake(inventory: Inventory, names: list[str], timeout: int) -> None:
    """paramiko's banner and auth waits are bounded by the connect timeout too."""
    for name in names:
        data = inventory.get_host(name).data
        connect_kwargs = dict(data.get("ssh_paramiko_connect_kwargs") or {})
        for key in ("banner_timeout", "auth_timeout"):
            connect_kwargs.setdefault(key, timeout)
        data.ssh_paramiko_connect_kwargs = connect_kwargs


# -- the steps ------------------------------------------------------------------------------


def connect(state: State, hosts: list[Host], timeout: int) -> dict[str, str]:
    """Connect to ``hosts`` at once; the reason for each one that could not be reached."""
    from .connect import connect_hosts

    return connect_hosts(state, hosts, float(timeout))


def read(state: State, hosts: list[Host]) -> dict[str, Reading]:
    """Run the one KSM state command on every host at once and parse each answer."""
    import gevent

    greenlets = {host.name: state.pool.spawn(read_host, state, host) for host in hosts}
    gevent.joinall(list(greenlets.values()))
    return {name: greenlet.value for name, greenlet in greenlets.items()}


def read_host(state: State, host: Host) -> Reading:
    """The KSM state of one connected host, with its sudo settings, from one remote command."""
    from paramiko import SSHException
    from pyinfra.api import StringCommand
    from pyinfra.api.exceptions import FactProcessError

    from ksm_guard.operations.facts import KSM_HOST_COMMAND, parse_ksm_host

    from .connect import run_command

    try:
        ok, output = run_command(state, host, StringCommand(KSM_HOST_COMMAND))
    except (OSError, TimeoutError, SSHException) as error:
        return Reading(None, _one_line(str(error) or type(error).__name__))
    if not ok:
        reason = stderr_reason(output.stderr_lines) or "the KSM state command failed"
        return Reading(None, reason, output.stdout_lines)
    try:
        return Reading(parse_ksm_host(output.stdout_lines), None, output.stdout_lines)
    except FactProcessError as error:
        return Reading(None, str(error), output.stdout_lines)


def read_sharing(state: State, hosts: list[Host], readings: dict[str, Reading]) -> None:
    """The sharing map of every host read, at once: one more command per host with VMs."""
    import gevent

    greenlets = [
        state.pool.spawn(read_sharing_host, state, host, readings[host.name])
        for host in hosts
        if readings[host.name].state is not None
    ]
    gevent.joinall(greenlets)


def read_sharing_host(state: State, host: Host, reading: Reading) -> None:
    """
    Scan the host's QEMU processes (operations/sharing.py) into its read state. Without root, or
    when the scan fails, the map says why; the rest of the audit is left as read.
    """
    from paramiko import SSHException
    from pyinfra.api.exceptions import FactProcessError

    from ksm_guard.operations import sharing

    from .connect import run_command

    host_state = reading.state
    assert host_state is not None
    if host_state["uid"] != 0:
        uid = host_state["uid"]
        sharing.unreadable(host_state, f"needs root (uid {uid}; try --sudo): pagemap hides PFNs")
        return
    pids = sorted(vm["pid"] for vm in host_state["vms"])  # pairs come back lower pid first
    if not pids:
        sharing.apply_scan(host_state, sharing.empty_scan())  # no VM: no command
        return
    command = sharing.sharing_command(host_state["page_size"], pids)
    try:
        ok, output = run_command(state, host, command)
    except (OSError, TimeoutError, SSHException) as error:
        sharing.unreadable(host_state, _one_line(str(error) or type(error).__name__))
        return
    if not ok:
        why = stderr_reason(output.stderr_lines) or "the sharing scan failed"
        sharing.unreadable(host_state, why)
        return
    reading.sharing_output = output.stdout_lines
    try:
        sharing.apply_scan(host_state, sharing.parse_scan(output.stdout_lines))
    except FactProcessError as error:
        sharing.unreadable(host_state, str(error))


def plan_host(host: Host, reading: Reading) -> HostPlan | None:
    """The host's plan for the mode and options its data names (None: state unreadable)."""
    from ksm_guard.operations.model import Options, SettingsError, settings_from_data
    from ksm_guard.operations.plan import plan, refused

    try:
        mode, options = settings_from_data(host.data, host.name)
    except SettingsError as error:
        raw = str(host.data.get("ksm_mode"))
        mode = Mode(raw) if raw in {known.value for known in Mode} else Mode.AUDIT
        return refused(mode, Options(), RefusalCode.BAD_SETTINGS, str(error))
    if reading.state is None:
        return None
    return plan(reading.state, mode, options)


def _options(host_plan: HostPlan | None) -> Options:
    """The options the host was planned with (its data and the command line), or the defaults."""
    return host_plan.options if host_plan else Options()


def _batches(request: Request, result: RunResult) -> list[list[str]]:
    """
    The rollout's batches: the hosts the plan changes or refuses, in inventory order; with
    ``order`` plan, those the capacity plan calls safe as they are (no VM to move) first
    (``cli.capacity.plan_order``, judged from each host's audit in ``result``).
    """
    targets = [h.host for h in result.hosts if h.status in (Status.WOULD_CHANGE, Status.REFUSED)]
    if request.order == ORDER_PLAN:
        from .capacity import plan_order

        targets = plan_order(result, targets)
    size = request.batch_size or len(targets) or 1
    return [targets[start : start + size] for start in range(0, len(targets), size)]


def _stopped_at(batch: list[str], results: dict[str, HostResult]) -> str | None:
    """The first host of the batch that stops a rollout: refused, failed or unreadable."""
    for name in batch:
        result = results[name]
        if result.status in (Status.REFUSED, Status.FAILED) or result.verdict.unread:
            return name
        if result.skipped:
            return name
    return None


def _not_reached(later: list[list[str]], results: dict[str, HostResult], stop: str) -> None:
    for batch in later:
        for name in batch:
            results[name] = HostResult(
                name,
                Status.NOT_REACHED,
                f"rollout stopped at {stop}",
                audit=results[name].audit,
            )


def preview(
    request: Request,
    names: list[str],
    unreachable: dict[str, str],
    readings: dict[str, Reading],
    plans: dict[str, HostPlan | None],
) -> RunResult:
    """Each host as the plan has it: what a dry run reports and the prompt shows."""
    hosts = []
    for name in names:
        if name in unreachable:
            hosts.append(HostResult(name, Status.UNREACHABLE, unreachable[name]))
            continue
        reading, host_plan = readings[name], plans[name]
        result = HostResult(name, Status.ERROR, reading.error)
        if reading.state is not None:
            result.audit = audit_record(reading.state, _options(host_plan))
            result.status = Status.OK
            if result.sharing_error and result.detail is None:
                result.detail = f"no sharing map: {result.sharing_error}"
        if host_plan is not None and host_plan.refusal is not None:
            result.status, result.refusal = Status.REFUSED, host_plan.refusal
            result.detail = host_plan.refusal.reason
        elif host_plan is not None and reading.state is not None:
            result.status, result.changes = host_plan.status, host_plan.changes
            result.skipped = list(host_plan.skipped)
            if host_plan.waived and host_plan.options.waiver is not None:
                result.detail = waiver_line(host_plan.options.waiver)
        hosts.append(result)
    planned = RunResult(request.mode, request.dry_run, hosts, readings=readings)
    if request.mode is not Mode.AUDIT and not request.continue_on_error:
        # A refused host stops the rollout after its batch: the plan says so as the run will.
        results = {h.host: h for h in hosts}
        batches = _batches(request, planned)
        for number, batch in enumerate(batches):
            stop = _stopped_at(batch, results)
            if stop is not None:
                _not_reached(batches[number + 1 :], results, stop)
                break
        planned.hosts = [results[name] for name in names]
    return planned


class _Timer:
    """Seconds each host spent in each operation, from pyinfra's state callbacks."""

    def __init__(self) -> None:
        from pyinfra.api import BaseStateCallback

        timer = self
        self.started: dict[tuple[str, str], float] = {}
        self.seconds: dict[tuple[str, str], float] = {}

        class Callback(BaseStateCallback):
            @staticmethod
            def operation_host_start(state: State, host: Host, op_hash: str) -> None:
                timer.started[(host.name, op_hash)] = time.monotonic()

            @staticmethod
            def operation_host_success(
                state: State, host: Host, op_hash: str, retry_count: int = 0
            ) -> None:
                start = timer.started.get((host.name, op_hash))
                if start is not None:
                    timer.seconds[(host.name, op_hash)] = time.monotonic() - start

        self.callback = Callback()


def _operations(state: State, host: Host) -> list[tuple[str, Any]]:
    """The host's operations in run order: (op hash, OperationMeta)."""
    found = []
    for op_hash in state.get_op_order():
        with suppress(KeyError):
            found.append((op_hash, state.get_op_data_for_host(host, op_hash).operation_meta))
    return found


def _outcome(state: State, host: Host, host_plan: HostPlan | None, timer: _Timer) -> HostResult:
    """What the batch did to one host, from its plan and its operations' results."""
    from ksm_guard.operations import ksm
    from ksm_guard.operations.modes import UNMERGE_OPERATION

    if host_plan is None:
        return HostResult(host.name, Status.ERROR, "KSM state could not be read at its turn")
    if host_plan.refusal is not None:
        refusal = host_plan.refusal
        return HostResult(host.name, Status.REFUSED, refusal.reason, refusal=refusal)
    if host_plan.waived and host_plan.options.waiver is not None:
        return HostResult(host.name, Status.WAIVED, waiver_line(host_plan.options.waiver))
    result = HostResult(
        host.name, Status.OK, changes=host_plan.changes, skipped=list(host_plan.skipped)
    )
    operations = _operations(state, host)
    complete = [(op_hash, meta) for op_hash, meta in operations if meta.is_complete()]
    refused = ksm.refusal_of(state, host)
    failed = next(((h, meta) for h, meta in complete if meta.did_error()), None)
    if refused is not None:
        result.status, result.detail = Status.REFUSED, refused
    elif failed is not None or host in state.failed_hosts:
        result.status = Status.FAILED
        if failed is not None:
            name = ", ".join(sorted(state.get_op_meta(failed[0]).names))
            reason = stderr_reason(failed[1].stderr_lines) or "a command failed"
            result.detail = f"{name}: {reason}"
        else:
            result.detail = "the operations did not complete"
    elif any(meta.did_change() for _, meta in complete):
        result.status = Status.CHANGED
    unmerge = host_plan.part(Part.UNMERGE)
    for op_hash, meta in complete:
        names = state.get_op_meta(op_hash).names
        if unmerge and unmerge.steps and UNMERGE_OPERATION in names and meta.did_change():
            figures = unmerge.steps[0].figures
            result.unmerge = {
                "pages": figures["pages"],
                "bytes": figures["bytes"],
                "seconds": round(timer.seconds.get((host.name, op_hash), 0.0), 3),
                "memory_used_bytes": None,  # from the closing audit
            }
    return result


def run_batch(
    state: State, hosts: list[Host], progress: Callable[[str], None] | None
) -> list[HostResult]:
    """Plan the batch again on a fresh read, run what passes, then audit it (closing audit)."""
    from pyinfra.api.deploy import add_deploy
    from pyinfra.api.exceptions import PyinfraError
    from pyinfra.api.operations import run_ops

    from ksm_guard.operations import modes

    timer = _Timer()
    state.add_callback_handler(timer.callback)
    with suppress(PyinfraError):  # the last host refused: "No hosts remaining!"
        add_deploy(state, modes.run_from_host_data, host=hosts)
    if any(host not in state.failed_hosts for host in hosts):
        with _watching(hosts, progress), suppress(PyinfraError):  # failures collected below
            run_ops(state)
    results = [_outcome(state, host, modes.planned(state, host), timer) for host in hosts]
    readings = read(state, hosts)
    for host, result in zip(hosts, results, strict=True):
        reading, host_plan = readings[host.name], modes.planned(state, host)
        if reading.state is not None:
            result.audit = audit_record(reading.state, _options(host_plan))
            if result.unmerge is not None:
                used = reading.state["mem_total"] - reading.state["mem_available"]
                result.unmerge["memory_used_bytes"] = used
        elif result.status not in (Status.REFUSED, Status.FAILED):
            result.status, result.detail = Status.ERROR, reading.error
    return results


def roll_out(
    request: Request,
    inventory: Inventory,
    first: State,
    planned: RunResult,
    progress: Callable[[str], None] | None,
) -> RunResult:
    """
    Carry out the plan in batches, in inventory order. Hosts the plan refused stay refused
    without being touched; the rest are planned again right before their turn. Unless told to go
    on, stop after the first batch with a refused or failed host: the rest are not reached.
    """
    from pyinfra.api import Inventory as PyinfraInventory
    from pyinfra.api.connect import disconnect_all

    results = {r.host: r for r in planned.hosts}
    batches = _batches(request, planned)
    states = [first]
    try:
        for number, batch in enumerate(batches):
            runnable = [name for name in batch if results[name].status is Status.WOULD_CHANGE]
            if runnable and number == 0:
                hosts = [first.inventory.get_host(name) for name in runnable]
                results.update({r.host: r for r in run_batch(first, hosts, progress)})
            elif runnable:
                # A State per batch, over an inventory of the batch's own Host objects.
                batch_inventory = PyinfraInventory(
                    ([(name, inventory.get_host(name).data.dict()) for name in runnable], {})
                )
                state = _new_state(batch_inventory, request, runnable)
                states.append(state)
                hosts = [batch_inventory.get_host(name) for name in runnable]
                lost = connect(state, hosts, request.connect_timeout)
                for name, reason in lost.items():
                    results[name] = HostResult(name, Status.UNREACHABLE, reason)
                live = [host for host in hosts if host.name not in lost]
                if live:
                    results.update({r.host: r for r in run_batch(state, live, progress)})
            stop = _stopped_at(batch, results)
            if stop is not None and not request.continue_on_error:
                _not_reached(batches[number + 1 :], results, stop)
                break
    finally:
        for state in states[1:]:
            disconnect_all(state)
    return RunResult(request.mode, False, [results[r.host] for r in planned.hosts])


def run(
    request: Request,
    confirm: Callable[[RunResult], bool] | None = None,
    echo: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """
    Run ``request`` and report per host. ``confirm`` sees the plan of a change before anything
    runs (False: declined, nothing changes), ``echo`` gets pyinfra's log lines and ``progress``
    the pages still shared during an unmerge.
    """
    from pyinfra.api.connect import disconnect_all

    with _logs(echo), no_password_prompt():  # an inventory may connect (cli/cluster.py)
        try:
            inventory, names = make_inventory(
                request.inventory,
                request.override_data(),
                request.limit,
                sudo=request.sudo,
                connect_timeout=request.connect_timeout,
            )
        except InventoryError as error:
            raise UsageError(str(error)) from None
        _bound_handshake(inventory, names, request.connect_timeout)
        state = _new_state(inventory, request, names)
        try:
            hosts = [inventory.get_host(name) for name in names]
            unreachable = connect(state, hosts, request.connect_timeout)
            live = [host for host in hosts if host.name not in unreachable]
            readings = read(state, live)
            if request.sharing and request.mode is Mode.AUDIT:
                read_sharing(state, live, readings)
            plans = {host.name: plan_host(host, readings[host.name]) for host in live}
            planned = preview(request, names, unreachable, readings, plans)
            if request.mode is Mode.AUDIT or request.dry_run or not planned.pending:
                return planned
            if confirm is not None and not confirm(planned):
                planned.declined = True
                return planned
            watch = progress if request.mode is Mode.UNMERGE else None
            return roll_out(request, inventory, state, planned, watch)
        finally:
            disconnect_all(state)


@contextmanager
def _watching(hosts: list[Host], progress: Callable[[str], None] | None) -> Iterator[None]:
    """While the block runs, report each host's pages still shared, read from sysfs each second."""
    if progress is None:
        yield
        return
    import gevent
    from gevent.event import Event
    from pyinfra.api import QuoteString, StringCommand

    from ksm_guard.operations.model import KSM_DIR

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
