"""``ksm-guard plan``: the fleet's audits in (a live read or a saved file), the plan out."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from ksm_guard.operations.capacity import (
    DEFAULT_MIN_HEADROOM,
    CapacityInputError,
    CapacityPlan,
    HostInput,
    Outcome,
    hosts_from_document,
    plan_capacity,
    safe_first,
)
from ksm_guard.operations.model import Mode
from ksm_guard.operations.plan import RefusalCode

from .capacity_render import plan_document
from .engine import EXIT_NONCOMPLIANT, EXIT_OK, EXIT_UNREACHABLE, Request, RunResult, UsageError


def exit_code(plan: CapacityPlan) -> int:
    """
    3 when a host could not be read, else 1 when no safe plan exists (RAM missing, settings
    blocking a host), else 0: a safe plan exists, with or without moves.
    """
    if plan.unread:
        return EXIT_UNREACHABLE
    return EXIT_NONCOMPLIANT if plan.outcome is Outcome.IMPOSSIBLE else EXIT_OK


def inputs_from_run(result: RunResult) -> list[HostInput]:
    """Each host of an audit run: its audit, or why it has none; bad settings block a host."""
    inputs = []
    for host in result.hosts:
        refusal = host.refusal
        blocked = refusal.reason if refusal and refusal.code is RefusalCode.BAD_SETTINGS else None
        detail = host.detail if host.audit is not None else f"{host.verdict}: {host.detail}"
        inputs.append(HostInput(host.host, host.audit, detail, blocked))
    return inputs


def plan_order(result: RunResult, names: Sequence[str]) -> list[str]:
    """
    ``names`` (hosts of ``result``) in the order ``unmerge --order plan`` rolls out: those the
    capacity plan calls safe as they are (``--min-headroom`` 0.10, each host's own fraction)
    first, then the rest; inventory order within each group.
    """
    inputs = {host.host: host for host in inputs_from_run(result)}
    return safe_first([inputs[name] for name in names])


def read_fleet(request: Request, echo: Callable[[str], None] | None) -> list[HostInput]:
    """Read every host once, as ``audit`` does (one remote command each); change nothing."""
    from .engine import run

    if request.mode is not Mode.AUDIT:
        raise ValueError(f"a capacity plan reads the fleet with an audit, not {request.mode}")
    return inputs_from_run(run(request, echo=echo))


def read_file(path: Path, limit: list[str]) -> list[HostInput]:
    """The hosts of a saved ``-o json`` result (``-``: stdin), those matching ``limit`` if any."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
        hosts = hosts_from_document(json.loads(text))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, CapacityInputError) as error:
        raise UsageError(f"cannot plan from {path}: {error}") from None
    if not limit:
        return hosts
    kept = [host for host in hosts if any(fnmatch(host.host, glob) for glob in limit)]
    if not kept:
        raise UsageError(f"--limit {' '.join(limit)} matches no host of {path}")
    return kept


def capacity_summary(
    document: object,
    min_headroom: float = DEFAULT_MIN_HEADROOM,
    max_fraction: float | None = None,
) -> dict[str, Any]:
    """
    The capacity plan of a saved result, as the dict ``plan --from FILE -o json`` prints: for
    the evidence report (``ksm-guard report``) and anything else holding a ``-o json`` document
    with ``hosts[].host`` and ``hosts[].audit`` (audit, or a change mode's closing audit).
    Hosts without an audit are listed unread and make ``exit_code`` 3, as in ``plan``. Raises
    ``CapacityInputError`` (one line naming the host and field) for a document it cannot read.
    """
    plan = plan_capacity(hosts_from_document(document), min_headroom, max_fraction)
    return plan_document(plan, exit_code(plan))
