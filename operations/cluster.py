"""A Proxmox VE cluster's membership as pve-cluster writes it (``/etc/pve/.members``)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from pyinfra.api import QuoteString, StringCommand

from .model import ClusterInfo

# pmxcfs serves the file (proxmox/pve-cluster 7091d92e5949 = 9.1.6, src/pmxcfs/pmxcfs.c
# create_symlinks: ``.members``, mode 0440, root:www-data: root reads it), written by
# src/pmxcfs/status.c cfs_create_memberlist_msg: ``nodename`` and ``version`` always; in a
# cluster also ``cluster`` (name, version, nodes, quorate) and ``nodelist``, each node by name
# with its corosync ``id``, ``online`` (1 while in the process group, dfsm_confchg) and, once
# the node has announced it, its ``ip`` (the "nodeip" status: the address its own name resolves
# to there, lookup_node_ip). PVE::Cluster::remote_node_ip connects to that ``ip``.
MEMBERS_PATH = "/etc/pve/.members"


class MembershipError(ValueError):
    """The membership file is missing or is not what pmxcfs writes: one line saying why."""


@dataclass(frozen=True)
class Member:
    """One node of the cluster as the membership file lists it."""

    name: str
    nodeid: int | None  # corosync's node id; None: not in a cluster
    online: bool
    ip: str | None  # None: pve-cluster knows no address for it


@dataclass(frozen=True)
class Membership:
    """Who is in the cluster, as the node ``nodename`` sees it."""

    nodename: str
    cluster: str | None  # None: not in a cluster (a cluster of one)
    quorate: bool | None
    members: tuple[Member, ...]  # by name


@dataclass(frozen=True)
class Target:
    """Where ksm-guard reaches a member: its address, or why it is not reached."""

    name: str
    address: str | None
    unreachable: str | None


def members_command(path: str = MEMBERS_PATH) -> StringCommand:
    """Print the membership file, or ``absent`` (cat fails, with its reason, when unreadable)."""
    return StringCommand(
        "if test -e", QuoteString(path), "; then cat", QuoteString(path), "; else echo absent; fi"
    )


def cluster_command(path: str = MEMBERS_PATH) -> str:
    """
    The ``cluster`` section of the KsmHost fact: the file, ``?`` when it exists but this user
    cannot read it (root:www-data 0440), ``absent`` on a host without pmxcfs running.
    """
    return (
        f"if test -r {path}; then cat {path}; "
        f"elif test -e {path}; then echo '?'; else echo absent; fi"
    )


CLUSTER_COMMAND = cluster_command()


def parse_cluster(lines: list[str]) -> ClusterInfo | None:
    """
    The ``cluster`` section: the cluster's and the node's name; None without the file. A file
    that cannot be read or parsed never fails the fact: its ``error`` says why.
    """
    if lines == ["absent"]:
        return None
    if lines == ["?"]:
        return ClusterInfo(name=None, node=None, error=f"{MEMBERS_PATH}: not readable")
    try:
        membership = parse_members("\n".join(lines))
    except MembershipError as error:
        return ClusterInfo(name=None, node=None, error=f"{MEMBERS_PATH}: {error}")
    return ClusterInfo(name=membership.cluster, node=membership.nodename, error=None)


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MembershipError(f"{what} is not a JSON object")
    return value


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MembershipError(f"{what} is not an integer: {value!r}")
    return value


def _flag(value: object, what: str) -> bool:
    if value not in (0, 1) or isinstance(value, bool):
        raise MembershipError(f"{what} is not 0 or 1: {value!r}")
    return value == 1


def _member(name: str, node: object) -> Member:
    node = _object(node, f"node {name!r}")
    ip = node.get("ip")
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise MembershipError(f"node {name!r} has no IP address: {ip!r}") from None
    return Member(
        name=name,
        nodeid=_int(node.get("id"), f"node {name!r} id"),
        online=_flag(node.get("online"), f"node {name!r} online"),
        ip=ip,
    )


def parse_members(text: str) -> Membership:
    """
    The membership file's JSON. A node that is in no cluster (no ``nodelist``), or that its
    cluster's nodelist does not name, is a cluster of one: itself, as PVE::Cluster::get_nodelist
    has it (src/PVE/Cluster.pm). Raises MembershipError.
    """
    try:
        top = _object(json.loads(text), "the membership")
    except json.JSONDecodeError as error:
        raise MembershipError(f"not JSON: {error.msg} at line {error.lineno}") from None
    nodename = top.get("nodename")
    if not isinstance(nodename, str) or not nodename:
        raise MembershipError("no nodename")
    _int(top.get("version"), "version")
    if "nodelist" not in top and "cluster" not in top:
        return Membership(nodename, None, None, (Member(nodename, None, True, None),))
    cluster = _object(top.get("cluster"), "cluster")
    nodelist = _object(top.get("nodelist"), "nodelist")
    name = cluster.get("name")
    if not isinstance(name, str) or not name:
        raise MembershipError("the cluster has no name")
    count = _int(cluster.get("nodes"), "cluster nodes")
    if count != len(nodelist):
        raise MembershipError(f"the cluster counts {count} nodes, its nodelist {len(nodelist)}")
    members = tuple(_member(node, nodelist[node]) for node in sorted(nodelist))
    quorate = _flag(cluster.get("quorate"), "cluster quorate")
    if nodename not in nodelist:
        return Membership(nodename, None, None, (Member(nodename, None, True, None),))
    return Membership(nodename, name, quorate, members)


def targets(membership: Membership, seed_address: str, source: str) -> list[Target]:
    """
    Each member and where to reach it: the node the membership was read on at ``seed_address``
    (it just answered), the others at their ``ip``. A member pve-cluster lists offline, or knows
    no address for, is not reached, with the reason (``source`` says where it was read).
    """
    where = f"cluster {membership.cluster!r}, {source}"
    found = []
    for member in membership.members:
        if member.name == membership.nodename:
            found.append(Target(member.name, seed_address, None))
        elif not member.online:
            found.append(Target(member.name, None, f"pve-cluster lists it offline ({where})"))
        elif member.ip is None:
            why = f"pve-cluster knows no address for it ({where})"
            found.append(Target(member.name, None, why))
        else:
            found.append(Target(member.name, member.ip, None))
    return found
