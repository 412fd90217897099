"""
A Proxmox VE cluster as an inventory: from one node (the seed), every member node of its cluster,
as pve-cluster lists them in ``/etc/pve/.members``. For inventory files (inventories/pve_cluster.py)
that ``ksm-guard -i`` and ``pyinfra`` load alike.

The membership is read with one command on the seed, connected through pyinfra with the host data
every member gets (group data of ``all`` and of the inventory file's group, then ``--data``) and
the run's sudo settings. Members are reached at the ``ip`` the file gives, named after their
node name; no name is looked up on this machine. A member pve-cluster lists offline, or knows no
address for, is in the inventory all the same, unreachable with the reason: ``ksm_unreachable``
in its data, and a connection that fails with that reason without being tried (pyinfra reports
it as a host that could not connect).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ksm_guard.operations.cluster import (
    MEMBERS_PATH,
    MembershipError,
    Target,
    members_command,
    parse_members,
    targets,
)

from .connect import UNREACHABLE_DATA

if TYPE_CHECKING:
    from pyinfra.api import Config, Inventory

SEED_DATA = "ksm_pve_seed"  # host data (``--data ksm_pve_seed=pve1``) naming the seed node
SEED_ENV = "KSM_GUARD_PVE_SEED"  # the same, from the environment (ksm-guard has no --data)
# Test-only: where the seed's membership file is, instead of /etc/pve/.members.
MEMBERS_FILE_DATA = "ksm_pve_members_file"

HostEntry = tuple[str, dict[str, Any]]


class ClusterError(Exception):
    """The cluster's membership could not be read from the seed: one line saying why."""


class NoConnection:
    """
    What paramiko takes as an already connected socket (``sock``), so that it neither looks up a
    name nor connects: its first use fails with ``reason``. pyinfra's SSH connector passes it on
    from host data ``ssh_paramiko_connect_kwargs`` and reports "Could not connect (reason)".
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def settimeout(self, timeout: float | None) -> None:  # paramiko's Transport calls it first
        raise ConnectionRefusedError(self.reason)

    def close(self) -> None:
        pass

    def to_json(self) -> str:  # pyinfra debug-inventory --json
        return f"no connection: {self.reason}"


@dataclass
class Loading:
    """How pyinfra is loading the inventory file that asks for the cluster."""

    override_data: dict[str, Any] = field(default_factory=dict)
    cwd: str | None = None
    inventory_file: str | None = None
    group_data_dirs: list[str] = field(default_factory=list)

    def folders(self) -> list[str]:
        """The group data folders pyinfra reads, in its order (make_inventory_from_files)."""
        found = [str(Path(self.cwd) / "group_data")] if self.cwd else []
        if self.inventory_file:
            beside = str(Path(self.inventory_file).parent.resolve())
            if beside != self.cwd:
                found.append(str(Path(beside) / "group_data"))
        return found + list(self.group_data_dirs)

    @property
    def file_group(self) -> str | None:
        """The group pyinfra puts every host of an inventory file in: the file's name."""
        return Path(self.inventory_file).name.rsplit(".", 1)[0] if self.inventory_file else None


def loading() -> Loading:
    """
    The arguments of the pyinfra_cli make_inventory_from_files() call running the inventory file
    this is called from: ``pyinfra INVENTORY ...`` and ``ksm-guard -i INVENTORY`` both load files
    through it, and it is where ``--data`` (override data) is at that point, nowhere else.
    """
    from pyinfra_cli.inventory import make_inventory_from_files

    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is make_inventory_from_files.__code__:
            found = frame.f_locals
            return Loading(
                override_data=dict(found.get("override_data") or {}),
                cwd=found.get("cwd"),
                inventory_file=found.get("inventory_filename"),
                group_data_dirs=list(found.get("group_data_directories") or []),
            )
        frame = frame.f_back
    return Loading(cwd=os.getcwd())


def _group_data(how: Loading, seed: str) -> dict[str, dict[str, Any]]:
    """Group data of every folder pyinfra reads, merged as it merges them."""
    from pyinfra.api import Inventory, State
    from pyinfra.context import ctx_inventory, ctx_state
    from pyinfra_cli.inventory import _get_group_data

    merged: dict[str, dict[str, Any]] = {}
    saved = ctx_state.get(), ctx_inventory.get()
    if saved[0] is None:
        ctx_state.set(State())  # group data files run with a state, as under pyinfra's CLI
    ctx_inventory.set(Inventory(([seed], {})))  # they may read the inventory
    try:
        for folder in how.folders():
            for group, data in _get_group_data(folder).items():
                merged.setdefault(group, {}).update(data)
    finally:
        ctx_state.set(saved[0])
        ctx_inventory.set(saved[1])
    return merged


def seed_inventory(seed: str | None, how: Loading) -> Inventory:
    """
    A pyinfra Inventory of the seed alone, with the data a member gets: group data of ``all``
    and of the inventory file's group, under the run's override data. The seed is ``seed``, else
    ``--data ksm_pve_seed``, else $KSM_GUARD_PVE_SEED, else group data ``ksm_pve_seed``.
    """
    from pyinfra.api import Inventory

    groups = _group_data(how, seed or "seed")
    all_data = groups.get("all", {})
    file_data = groups.get(how.file_group, {}) if how.file_group else {}
    chosen = (
        seed
        or how.override_data.get(SEED_DATA)
        or os.environ.get(SEED_ENV)
        or {**all_data, **file_data}.get(SEED_DATA)
    )
    if not chosen:
        raise ClusterError(
            f"which node? set {SEED_ENV}=<node>, or give --data {SEED_DATA}=<node> to pyinfra"
        )
    name = str(chosen)
    file_group = {how.file_group: ([name], file_data)} if how.file_group else {}
    return Inventory(([name], all_data), override_data=how.override_data, **file_group)


def _config() -> Config:
    """The run's config (sudo and its friends, connect timeout), as pyinfra's CLI has set it."""
    from pyinfra.api import Config
    from pyinfra.context import ctx_config

    config = ctx_config.get()
    return config.copy() if config is not None else Config()


def read_members(inventory: Inventory, config: Config) -> str:
    """The membership file's text, read on the inventory's one host with one command."""
    from pyinfra.api import State
    from pyinfra.api.connect import disconnect_all

    from .connect import connect_hosts, run_command
    from .engine import stderr_reason

    host = next(iter(inventory))
    path = str(host.data.get(MEMBERS_FILE_DATA) or MEMBERS_PATH)
    state = State()
    state.init(inventory, config)
    failed = connect_hosts(state, [host], float(config.CONNECT_TIMEOUT))
    if failed:
        reason = failed[host.name]
        raise ClusterError(f"cannot read the cluster membership from {host.name}: {reason}")
    try:
        ok, output = run_command(state, host, members_command(path))
    except OSError as error:
        raise ClusterError(f"cannot read {path} on {host.name}: {error}") from None
    finally:
        disconnect_all(state)
    if not ok:
        reason = stderr_reason(output.stderr_lines) or "the command failed"
        raise ClusterError(f"cannot read {path} on {host.name}: {reason}")
    if output.stdout_lines == ["absent"]:
        raise ClusterError(
            f"no {path} on {host.name}: not a Proxmox VE node, or pve-cluster is not running"
        )
    return "\n".join(output.stdout_lines)


def host_entry(target: Target, ip: str | None = None) -> HostEntry:
    """A member as an inventory entry: its address, or why it is unreachable."""
    if target.unreachable is None:
        return target.name, {"ssh_hostname": target.address}
    data: dict[str, Any] = {
        UNREACHABLE_DATA: target.unreachable,
        "ssh_paramiko_connect_kwargs": {"sock": NoConnection(target.unreachable)},
    }
    if ip:
        data["ssh_hostname"] = ip
    return target.name, data


def cluster_hosts(seed: str | None = None) -> list[HostEntry]:
    """
    Every member node of the cluster ``seed`` is a node of (default: from ``--data
    ksm_pve_seed``, $KSM_GUARD_PVE_SEED or group data), as inventory entries named after the
    nodes. A node in no cluster is a cluster of one. Raises ClusterError.
    """
    how = loading()
    inventory = seed_inventory(seed, how)
    host = next(iter(inventory))
    text = read_members(inventory, _config())
    path = str(host.data.get(MEMBERS_FILE_DATA) or MEMBERS_PATH)
    try:
        membership = parse_members(text)
    except MembershipError as error:
        raise ClusterError(f"{path} on {host.name}: {error}") from None
    address = str(host.data.get("ssh_hostname") or host.name)
    ips = {member.name: member.ip for member in membership.members}
    return [
        host_entry(target, ips.get(target.name))
        for target in targets(membership, address, f"{path} on {host.name}")
    ]
