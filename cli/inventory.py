"""Load a pyinfra inventory as ``pyinfra INVENTORY deploy.py`` reads it, without pyinfra_cli."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyinfra.api import Inventory

HostEntry = str | tuple[str, dict[str, Any]]


class InventoryError(Exception):
    """The inventory is missing, broken, empty, or a --limit matches nothing."""


def _exec(path: Path) -> dict[str, Any]:
    try:
        code = compile(path.read_text(encoding="utf-8"), str(path), "exec")
        namespace: dict[str, Any] = {"__file__": str(path)}
        exec(code, namespace)
    except OSError as error:
        raise InventoryError(f"cannot read {path}: {error.strerror}") from None
    except SyntaxError as error:
        raise InventoryError(f"cannot load {path}: syntax error at line {error.lineno}") from None
    except Exception as error:
        raise InventoryError(f"cannot load {path}: {type(error).__name__}: {error}") from None
    return namespace


def _group_hosts(value: Any) -> tuple[list[HostEntry], dict[str, Any]] | None:
    """A module-level list (or ``(list, data)`` tuple) of hosts is a group; else None."""
    data: dict[str, Any] = {}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        value, data = value
    if not isinstance(value, list):
        return None
    for item in value:
        ok = isinstance(item, str) or (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], dict)
        )
        if not ok:
            return None
    return value, data


def _groups_from_file(path: Path) -> dict[str, tuple[list[HostEntry], dict[str, Any]]]:
    groups = {}
    for key, value in _exec(path).items():
        if key.startswith("_"):
            continue
        group = _group_hosts(value)
        if group is not None:
            groups[key] = group
    return groups


def _group_data(folder: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if not folder.is_dir():
        return found
    for file in sorted(folder.glob("*.py")):
        values = _exec(file)
        found[file.stem] = {
            key: value
            for key, value in values.items()
            if not key.startswith("__") and not callable(value) and type(value).__name__ != "module"
        }
    return found


def _host_name(entry: HostEntry) -> str:
    return entry[0] if isinstance(entry, tuple) else entry


def load_groups(spec: str) -> dict[str, tuple[list[HostEntry], dict[str, Any]]]:
    """Groups of ``spec``: an inventory file, ``@local``, or comma-separated host names."""
    path = Path(spec)
    if not path.exists():
        if spec.endswith(".py") or "/" in spec:
            raise InventoryError(f"inventory not found: {spec}")
        names = [name.strip() for name in spec.split(",") if name.strip()]
        return {"all": (list(names), {})}

    if path.is_dir():
        raise InventoryError(f"inventory is a directory, not a file: {spec}")
    groups = _groups_from_file(path)
    hosts: list[HostEntry] = []
    for members, _ in groups.values():
        for entry in members:
            if _host_name(entry) not in [_host_name(h) for h in hosts]:
                hosts.append(entry)
    all_data = groups.pop("all", ([], {}))[1]
    groups.setdefault(path.stem, ([_host_name(h) for h in hosts], {}))
    # Group data files: group_data/<group>.py beside the inventory (all.py for every host).
    for name, data in _group_data(path.resolve().parent / "group_data").items():
        if name == "all":
            all_data = {**data, **all_data}
        else:
            members, own = groups.get(name, ([], {}))
            groups[name] = (members, {**data, **own})
    groups["all"] = (hosts, all_data)
    return groups


def select_hosts(
    groups: dict[str, tuple[list[HostEntry], dict[str, Any]]], limit: list[str]
) -> list[str]:
    """Host names matched by ``--limit`` values (group names or host-name globs)."""
    names = [_host_name(h) for h in groups["all"][0]]
    if not limit:
        return names
    chosen: list[str] = []
    for pattern in limit:
        matched = (
            [_host_name(h) for h in groups[pattern][0]]
            if pattern in groups
            else [name for name in names if fnmatch.fnmatch(name, pattern)]
        )
        if not matched:
            raise InventoryError(f"--limit {pattern!r} matches no host or group")
        chosen.extend(name for name in matched if name not in chosen)
    return chosen


def make_inventory(
    spec: str, override_data: dict[str, Any], limit: list[str]
) -> tuple[Inventory, list[str]]:
    """A pyinfra ``Inventory`` for ``spec`` and the names of the hosts to act on."""
    from pyinfra.api import Inventory

    groups = load_groups(spec)
    if not groups["all"][0]:
        raise InventoryError(f"inventory {spec} defines no hosts")
    chosen = select_hosts(groups, limit)
    all_group = groups.pop("all")
    try:
        inventory = Inventory(all_group, override_data=override_data, **groups)
    except Exception as error:  # pyinfra raises its own types for bad connectors
        raise InventoryError(f"invalid inventory {spec}: {error}") from None
    return inventory, chosen
