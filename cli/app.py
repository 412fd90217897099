"""The ``ksm-guard`` command line: thin typer commands over ``cli.engine``."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from . import __version__

if TYPE_CHECKING:
    from .engine import Request

EXIT_CODES = (
    "Exit codes: 0 all hosts compliant (audit) or all changes done; "
    "1 a host is non-compliant (audit) or a change failed or was refused; "
    "2 usage error (bad option, missing or broken inventory); "
    "3 a host was unreachable or its state could not be read, or --textfile-dir could not be "
    "written; 130 interrupted (Ctrl-C)."
)

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help=f"Find and shut off Kernel Samepage Merging (KSM) across a fleet.\n\n{EXIT_CODES}",
)


def _fraction(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"{value} is not in the range 0 < x <= 1")
    return value


class Output(StrEnum):
    table = "table"
    json = "json"
    prometheus = "prometheus"


InventoryOpt = Annotated[
    str,
    typer.Option(
        "--inventory",
        "-i",
        envvar="KSM_GUARD_INVENTORY",
        help="pyinfra inventory file, '@local' (this machine) or host1,host2.",
    ),
]
LimitOpt = Annotated[
    list[str] | None,
    typer.Option("--limit", help="Only these hosts or groups (globs allowed); repeatable."),
]
OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", envvar="KSM_GUARD_OUTPUT", help="Result format.")
]
ParallelOpt = Annotated[
    int, typer.Option("--parallel", min=0, help="Hosts at once (0: pyinfra's default).")
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch",
        min=0,
        help="Hosts changed at once, in inventory order (0: all) [default: 1 for unmerge, else 0].",
    ),
]
SerialOpt = Annotated[
    bool, typer.Option("--serial", help="Change one host after the other (as --batch 1).")
]
ContinueOpt = Annotated[
    bool,
    typer.Option(
        "--continue-on-error",
        help="Go on with the next batches after a host failed or was refused.",
    ),
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Show the pages still shared while unmerging [default: on a terminal].",
    ),
]
SudoOpt = Annotated[
    bool, typer.Option("--sudo", envvar="KSM_GUARD_SUDO", help="Run remote commands with sudo.")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show per host what would change; change nothing.")
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
MaskOpt = Annotated[
    bool, typer.Option("--mask", help="Also mask the units (survives package reinstalls).")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Unmerge even when the memory preflight refuses.")
]
MaxFractionOpt = Annotated[
    float | None,
    typer.Option(
        "--max-fraction",
        callback=lambda value: _fraction(value),
        envvar="KSM_GUARD_MAX_FRACTION",
        help="Refuse an unmerge needing more than this share of MemAvailable [default: 0.5].",
    ),
]
TimeoutOpt = Annotated[
    int, typer.Option("--connect-timeout", min=1, help="Seconds to wait for each host's SSH.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show pyinfra's log on stderr.")]


class PolicyChoice(StrEnum):
    host = "host"
    strict = "strict"


PolicyOpt = Annotated[
    PolicyChoice | None,
    typer.Option(
        "--policy",
        envvar="KSM_GUARD_POLICY",
        help="host: KSM off host-wide; strict: also every VM opted out where a per-VM opt-out "
        "exists [default: each host's ksm_policy, else host].",
    ),
]
IgnoreWaiversOpt = Annotated[
    bool,
    typer.Option("--ignore-waivers", help="Change hosts under a waiver too (ksm_waiver)."),
]
WatchOpt = Annotated[
    bool,
    typer.Option(
        "--watch",
        help="Also install the drift watch: a systemd timer writing the host's KSM metrics for "
        "node_exporter (ksm_watch).",
    ),
]
HealOpt = Annotated[
    bool,
    typer.Option(
        "--heal",
        help="The drift watch (implies --watch) switches KSM back off when it finds it on: "
        "run=0, units stopped and disabled (ksm_watch_heal).",
    ),
]
WatchIntervalOpt = Annotated[
    int | None,
    typer.Option(
        "--watch-interval",
        min=10,
        max=86400,
        help="Seconds between drift watch runs (ksm_watch_interval; default 300).",
    ),
]
VmsOpt = Annotated[
    bool, typer.Option("--vms", help="Also list each running VM's merged memory and allow-ksm.")
]
SharingOpt = Annotated[
    bool,
    typer.Option(
        "--sharing",
        help="With --vms: which VMs share physical KSM pages with which (root; reads each "
        "QEMU process's page tables in one more command per host).",
    ),
]
TextfileDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--textfile-dir",
        exists=True,
        file_okay=False,
        dir_okay=True,
        writable=True,
        help="Also write ksm_guard.prom here (atomically), for node_exporter's textfile collector.",
    ),
]
VmidOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--vmid", callback=lambda values: _vmids(values), help="Only this VMID; repeatable."
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ksm-guard {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Find and shut off Kernel Samepage Merging (KSM) across a fleet."""


def _interactive() -> bool:
    """Whether a person can answer a confirmation prompt."""
    return sys.stdin.isatty()


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _vmids(values: list[int] | None) -> list[int] | None:
    for vmid in values or []:
        if not 100 <= vmid <= 999_999_999:
            raise typer.BadParameter(f"{vmid} is not a Proxmox VE VMID (100 to 999999999)")
    return values


def _batch(serial: bool, batch: int | None) -> int | None:
    if serial and batch is not None:
        raise typer.BadParameter("--serial is --batch 1: give one of them", param_hint="--serial")
    return 1 if serial else batch


def _execute(
    mode: str,
    output: Output,
    yes: bool,
    verbose: bool,
    progress: bool | None = None,
    show_vms: bool = False,
    textfile_dir: Path | None = None,
    **options: object,
) -> None:
    from ksm_guard.operations.model import Mode

    from . import interrupt, prometheus, prompt, render
    from .engine import (
        EXIT_UNREACHABLE,
        EXIT_USAGE,
        Request,
        RunResult,
        UsageError,
        run,
    )

    request = Request(mode=Mode(mode), **options)  # type: ignore[arg-type]
    if mode != "audit" and not request.dry_run and not yes and not _interactive():
        _err(f"ksm-guard: refusing to {mode} without confirmation: pass --yes (no terminal)")
        raise typer.Exit(EXIT_USAGE)

    def confirm(plan: RunResult) -> bool:
        if yes:
            return True
        _err(render.plan_text(plan))
        question = f"Apply '{mode}' to {len(plan.pending)} host(s)?"
        with interrupt.saying("ksm-guard: interrupted at the prompt; nothing changed"):
            return prompt.confirm(question, say=_err)  # end of input (Ctrl-D) is no

    terminal = sys.stderr.isatty()
    echo = _err if verbose else None
    watch = _err if (terminal if progress is None else progress) else None
    try:
        result = run(request, confirm=confirm, echo=echo, progress=watch)
    except UsageError as error:
        _err(f"ksm-guard: {error}")
        raise typer.Exit(EXIT_USAGE) from None
    if output is Output.prometheus:
        typer.echo(prometheus.render(result), nl=False)
    else:
        typer.echo(
            render.as_json(result) if output is Output.json else render.table(result, show_vms)
        )
    for host in result.hosts:
        if host.detail:
            _err(f"ksm-guard: {host.host}: {host.status}: {host.detail}")
    if textfile_dir is not None:
        try:
            prometheus.write_textfile(textfile_dir, prometheus.render(result))
        except prometheus.TextfileError as error:
            _err(f"ksm-guard: {error}")
            raise typer.Exit(EXIT_UNREACHABLE) from None
    raise typer.Exit(result.exit_code)


@app.command(epilog=EXIT_CODES)
def audit(
    inventory: InventoryOpt = "@local",
    limit: LimitOpt = None,
    output: OutputOpt = Output.table,
    parallel: ParallelOpt = 0,
    sudo: SudoOpt = False,
    max_fraction: MaxFractionOpt = None,
    connect_timeout: TimeoutOpt = 10,
    verbose: VerboseOpt = False,
    vms: VmsOpt = False,
    sharing: SharingOpt = False,
    textfile_dir: TextfileDirOpt = None,
    policy: PolicyOpt = None,
) -> None:
    """Report each host's KSM state and verdict; change nothing."""
    if sharing and not vms:
        from .engine import EXIT_USAGE

        _err("ksm-guard: --sharing maps the VMs' memory: give it with --vms")
        raise typer.Exit(EXIT_USAGE)
    _execute(
        "audit", output, True, verbose, inventory=inventory, limit=limit or [],
        parallel=parallel, sudo=sudo, max_fraction=max_fraction, connect_timeout=connect_timeout,
        show_vms=vms, textfile_dir=textfile_dir, policy=policy, sharing=sharing,
    )  # fmt: skip


@app.command(epilog=EXIT_CODES)
def disable(
    inventory: InventoryOpt = "@local",
    limit: LimitOpt = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    output: OutputOpt = Output.table,
    parallel: ParallelOpt = 0,
    batch: BatchOpt = None,
    serial: SerialOpt = False,
    continue_on_error: ContinueOpt = False,
    mask: MaskOpt = False,
    sudo: SudoOpt = False,
    connect_timeout: TimeoutOpt = 10,
    verbose: VerboseOpt = False,
    policy: PolicyOpt = None,
    ignore_waivers: IgnoreWaiversOpt = False,
    watch: WatchOpt = False,
    heal: HealOpt = False,
    watch_interval: WatchIntervalOpt = None,
) -> None:
    """Stop and disable ksmtuned and ksm.service, write run=0, keep it off at boot."""
    _execute(
        "disable", output, yes, verbose, inventory=inventory, limit=limit or [],
        dry_run=dry_run, parallel=parallel, batch=_batch(serial, batch),
        continue_on_error=continue_on_error,
        mask=mask, sudo=sudo, connect_timeout=connect_timeout,
        policy=policy, ignore_waivers=ignore_waivers,
        watch=watch, heal=heal, watch_interval=watch_interval,
    )  # fmt: skip


class RolloutOrder(StrEnum):
    inventory = "inventory"
    plan = "plan"


@app.command(epilog=EXIT_CODES)
def unmerge(
    inventory: InventoryOpt = "@local",
    limit: LimitOpt = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    output: OutputOpt = Output.table,
    parallel: ParallelOpt = 0,
    batch: BatchOpt = None,
    serial: SerialOpt = False,
    continue_on_error: ContinueOpt = False,
    order: Annotated[
        RolloutOrder,
        typer.Option(
            "--order",
            help="Rollout order: the inventory's, or 'plan': first the hosts the capacity plan "
            "(ksm-guard plan) calls safe as they are, no VM to move; inventory order within each.",
        ),
    ] = RolloutOrder.inventory,
    progress: ProgressOpt = None,
    mask: MaskOpt = False,
    force: ForceOpt = False,
    max_fraction: MaxFractionOpt = None,
    sudo: SudoOpt = False,
    connect_timeout: TimeoutOpt = 10,
    verbose: VerboseOpt = False,
    policy: PolicyOpt = None,
    ignore_waivers: IgnoreWaiversOpt = False,
    watch: WatchOpt = False,
    heal: HealOpt = False,
    watch_interval: WatchIntervalOpt = None,
) -> None:
    """
    Everything disable does, then unmerge the merged pages (run=2) after a memory check,
    one host at a time; the rollout stops at the first host that fails or is refused.
    """
    _execute(
        "unmerge", output, yes, verbose, progress, inventory=inventory, limit=limit or [],
        dry_run=dry_run, parallel=parallel, batch=_batch(serial, batch),
        continue_on_error=continue_on_error, order=order.value,
        mask=mask, force=force, max_fraction=max_fraction, sudo=sudo,
        connect_timeout=connect_timeout,
        policy=policy, ignore_waivers=ignore_waivers,
        watch=watch, heal=heal, watch_interval=watch_interval,
    )  # fmt: skip


@app.command(epilog=EXIT_CODES)
def enable(
    inventory: InventoryOpt = "@local",
    limit: LimitOpt = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    output: OutputOpt = Output.table,
    parallel: ParallelOpt = 0,
    batch: BatchOpt = None,
    serial: SerialOpt = False,
    continue_on_error: ContinueOpt = False,
    sudo: SudoOpt = False,
    connect_timeout: TimeoutOpt = 10,
    verbose: VerboseOpt = False,
    policy: PolicyOpt = None,
    ignore_waivers: IgnoreWaiversOpt = False,
) -> None:
    """
    Roll back: unmask, enable and start ksmtuned where installed; drop the boot persistence
    and the drift watch.
    """
    _execute(
        "enable", output, yes, verbose, inventory=inventory, limit=limit or [],
        dry_run=dry_run, parallel=parallel, batch=_batch(serial, batch),
        continue_on_error=continue_on_error,
        sudo=sudo, connect_timeout=connect_timeout,
        policy=policy, ignore_waivers=ignore_waivers,
    )  # fmt: skip


@app.command("vm-optout", epilog=EXIT_CODES)
def vm_optout(
    inventory: InventoryOpt = "@local",
    limit: LimitOpt = None,
    vmid: VmidOpt = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    output: OutputOpt = Output.table,
    parallel: ParallelOpt = 0,
    batch: BatchOpt = None,
    serial: SerialOpt = False,
    continue_on_error: ContinueOpt = False,
    sudo: SudoOpt = False,
    connect_timeout: TimeoutOpt = 10,
    verbose: VerboseOpt = False,
    policy: PolicyOpt = None,
    ignore_waivers: IgnoreWaiversOpt = False,
) -> None:
    """Proxmox VE 9: allow-ksm 0 on the VMs (qm set); never restarts a VM, says which need it."""
    _execute(
        "vm-optout", output, yes, verbose, inventory=inventory, limit=limit or [],
        vmids=vmid or [], dry_run=dry_run, parallel=parallel, batch=_batch(serial, batch),
        continue_on_error=continue_on_error, sudo=sudo, connect_timeout=connect_timeout,
        policy=policy, ignore_waivers=ignore_waivers,
    )  # fmt: skip


VERIFY_EXIT_CODES = (
    "Exit codes: 0 every check passed on every host; 1 a check failed; "
    "2 usage error (bad option, missing or broken inventory); "
    "3 a host was unreachable (no SSH session within --connect-timeout), or its checks could "
    "not run. Unreachable hosts are reported on stderr, one line each; the others are checked."
)


@app.command(epilog=VERIFY_EXIT_CODES)
def verify(
    inventory: InventoryOpt = "@local",
    limit: LimitOpt = None,
    junit_xml: Annotated[
        Path | None,
        typer.Option(
            "--junit-xml",
            help="Also write a JUnit XML report here: a case per host and check.",
        ),
    ] = None,
    sudo: SudoOpt = False,
    connect_timeout: TimeoutOpt = 10,
) -> None:
    """
    Check each host with the shipped testinfra checks, independently of ksm-guard's facts.
    Every host's SSH is tried first, all at once; the checks run on those that answered.
    """
    from .engine import EXIT_USAGE, UsageError
    from .verify import verify as run_checks

    try:
        code = run_checks(
            inventory=inventory, limit=limit or [], sudo=sudo, junit_xml=junit_xml,
            connect_timeout=connect_timeout, show=lambda text: typer.echo(text, nl=False),
            warn=_err,
        )  # fmt: skip
    except UsageError as error:
        _err(f"ksm-guard: {error}")
        raise typer.Exit(EXIT_USAGE) from None
    raise typer.Exit(code)


PLAN_EXIT_CODES = (
    "Exit codes: 0 a safe plan exists: every host can switch KSM off and unmerge safely, as it "
    "is or after the proposed moves; 1 none exists (RAM missing, or a host's settings block "
    "its unmerge); 2 usage error (bad option, unreadable --from file, missing or broken "
    "inventory); 3 a host was unreachable or its state could not be read (the others are "
    "still planned)."
)


class PlanOutput(StrEnum):
    table = "table"
    json = "json"


def _headroom(value: float) -> float:
    if not 0 <= value < 1:
        raise typer.BadParameter(f"{value} is not in the range 0 <= x < 1")
    return value


@app.command(epilog=PLAN_EXIT_CODES)
def plan(
    ctx: typer.Context,
    inventory: InventoryOpt = "@local",
    limit: LimitOpt = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from",
            dir_okay=False,
            allow_dash=True,
            help="Plan from a saved 'ksm-guard audit -o json' (- for stdin); contact no host.",
        ),
    ] = None,
    min_headroom: Annotated[
        float,
        typer.Option(
            "--min-headroom",
            callback=lambda value: _headroom(value),
            help="Share of each host's RAM that must stay available after the unmerge.",
        ),
    ] = 0.10,
    max_fraction: MaxFractionOpt = None,
    output: Annotated[
        PlanOutput, typer.Option("--output", "-o", help="Result format.")
    ] = PlanOutput.table,
    parallel: ParallelOpt = 0,
    sudo: SudoOpt = False,
    connect_timeout: TimeoutOpt = 10,
    verbose: VerboseOpt = False,
) -> None:
    """
    What switching KSM off costs each host and the cluster, and which VMs to move first so that
    every host can unmerge safely. Reads each host once, as audit does; changes nothing.
    """
    from ksm_guard.operations.capacity import plan_capacity

    from . import capacity, capacity_render
    from .engine import EXIT_USAGE, UsageError

    try:
        if from_file is None:
            request = _read_only(inventory, limit, parallel, sudo, max_fraction, connect_timeout)
            hosts = capacity.read_fleet(request, echo=_err if verbose else None)
        elif getattr(ctx.get_parameter_source("inventory"), "name", None) == "COMMANDLINE":
            raise UsageError("--from and --inventory exclude each other: the file is the fleet")
        else:
            hosts = capacity.read_file(from_file, limit or [])
    except UsageError as error:
        _err(f"ksm-guard: {error}")
        raise typer.Exit(EXIT_USAGE) from None
    result = plan_capacity(hosts, min_headroom, max_fraction)
    code = capacity.exit_code(result)
    render = capacity_render.as_json if output is PlanOutput.json else capacity_render.table
    typer.echo(render(result, code))
    for host in result.unread:
        _err(f"ksm-guard: {host.host}: {host.detail}")
    raise typer.Exit(code)


def _read_only(
    inventory: str,
    limit: list[str] | None,
    parallel: int,
    sudo: bool,
    max_fraction: float | None,
    connect_timeout: int,
    policy: str | None = None,
    sharing: bool = False,
) -> Request:
    """The audit that ``plan`` and ``report`` read the fleet with: it changes nothing."""
    from ksm_guard.operations.model import Mode

    from .engine import Request

    return Request(
        mode=Mode.AUDIT, inventory=inventory, limit=limit or [], parallel=parallel, sudo=sudo,
        max_fraction=max_fraction, connect_timeout=connect_timeout, policy=policy, sharing=sharing,
    )  # fmt: skip


REPORT_EXIT_CODES = (
    "Exit codes, as for audit: 0 every host compliant or unsupported; 1 a host is exposed; "
    "2 usage error (bad option, missing or broken inventory, --out not new or empty, or not "
    "writable); 3 a host was unreachable or its state could not be read, or the bundle could "
    "not be written after the audit. The bundle is written whatever the verdicts."
)


@app.command(epilog=REPORT_EXIT_CODES)
def report(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            file_okay=False,
            help="Write the evidence bundle into this new (or empty) directory.",
        ),
    ],
    inventory: InventoryOpt = "@local",
    limit: LimitOpt = None,
    parallel: ParallelOpt = 0,
    sudo: SudoOpt = False,
    max_fraction: MaxFractionOpt = None,
    connect_timeout: TimeoutOpt = 10,
    verbose: VerboseOpt = False,
    policy: PolicyOpt = None,
    sharing: SharingOpt = False,
) -> None:
    """
    Audit (change nothing) and write an evidence bundle: report.html, report.json,
    report.junit.xml, each host's raw answer under raw/, and SHA256SUMS over them all.
    """
    from . import render
    from .engine import EXIT_UNREACHABLE, EXIT_USAGE, UsageError
    from .evidence import BundleError
    from .evidence import report as write_report

    try:
        request = _read_only(
            inventory, limit, parallel, sudo, max_fraction, connect_timeout, policy, sharing
        )
        written = write_report(request, out, echo=_err if verbose else None)
    except UsageError as error:
        _err(f"ksm-guard: {error}")
        raise typer.Exit(EXIT_USAGE) from None
    except BundleError as error:
        _err(f"ksm-guard: {error}")
        raise typer.Exit(EXIT_UNREACHABLE) from None
    result = written.result
    typer.echo(render.table(result))
    for host in result.hosts:
        if host.detail:
            _err(f"ksm-guard: {host.host}: {host.status}: {host.detail}")
    _err(f"ksm-guard: evidence bundle in {out}; check it with: cd {out} && sha256sum -c SHA256SUMS")
    raise typer.Exit(result.exit_code)
