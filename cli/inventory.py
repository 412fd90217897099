"""Load a pyinfra inventory as ``pyinfra INVENTORY deploy.py`` does, through pyinfra_cli's code."""

from __future__ import annotations

import fnmatch
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyinfra.api import Config, Inventory


class InventoryError(Exception):
    """The inventory is missing, broken, empty, or a --limit matches nothing."""


def _host_names(spec: str) -> list[str] | None:
    """
    The host names ``spec`` lists, each once, or None when it names an inventory file.

    A word that is no file is a host name: never a module to import, never resolved.
    """
    if os.path.exists(spec):  # unlike pyinfra's Path.exists(): False, not OSError, when too long
        if os.path.isdir(spec):
            raise InventoryError(f"inventory is a directory, not a file: {spec}")
        return None
    if "," not in spec and "@" not in spec:  # what pyinfra would import or resolve
        meant = _meant(spec.strip())
        if meant or "/" in spec or spec.endswith(".py"):
            hint = f" (did you mean {meant}?)" if meant else ""
            raise InventoryError(f"inventory not found: {spec}{hint}")
    return list(dict.fromkeys(name.strip() for name in spec.split(",") if name.strip()))


def _meant(word: str) -> str | None:
    """The inventory file a word that is no file most likely means: NAME.py, inventories/NAME.py."""
    file = word if word.endswith(".py") else f"{word}.py"
    for candidate in (file, os.path.join("inventories", file)):
        if candidate != word and os.path.isfile(candidate):
            return candidate
    return None


def _hosts_inventory(names: list[str], override_data: dict[str, Any], cwd: str) -> Inventory:
    """
    pyinfra's make_inventory_from_files() for a host list, minus its ``Path(spec)`` calls: they
    crash on a long list, and for ``@ssh/x`` read group data from ``./@ssh/group_data``.
    """
    from pyinfra.api import Inventory
    from pyinfra.context import ctx_inventory
    from pyinfra_cli.inventory import _get_group_data

    # Group data files may read the inventory: pyinfra gives them one without their data.
    ctx_inventory.set(Inventory((names, {}), all=(names, {})))
    group_data = _get_group_data(os.path.join(cwd, "group_data"))
    all_data = group_data.pop("all", {})
    # Groups only group data names: hosts join them through @connectors.
    groups: dict[str, Any] = {name: ([], data) for name, data in group_data.items()}
    return Inventory((names, all_data), override_data=override_data, **groups)


def _load(
    spec: str, names: list[str] | None, override_data: dict[str, Any], config: Config
) -> Inventory:
    """Run pyinfra's loading code as its CLI sets it up, and put back what it leaves behind."""
    from pyinfra.api import State
    from pyinfra.context import ctx_config, ctx_inventory, ctx_state
    from pyinfra_cli.inventory import make_inventory_from_files
    from pyinfra_cli.util import PYTHON_CODES

    cwd = os.getcwd()
    state = State()
    state.cwd = cwd  # group data files may read it, as under pyinfra's CLI
    saved = ctx_state.get(), ctx_inventory.get(), ctx_config.get()
    added = cwd not in sys.path  # pyinfra's CLI imports the inventory's imports from here
    if added:
        sys.path.append(cwd)
    PYTHON_CODES.clear()  # compiled code cached by file name: read each file as it is now
    ctx_state.set(state)
    ctx_config.set(config)  # the run's sudo and timeout, for an inventory that connects
    try:
        if names is None:
            return make_inventory_from_files(spec, override_data, cwd=cwd)
        return _hosts_inventory(names, override_data, cwd)
    except (Exception, SystemExit) as error:  # SystemExit: an inventory calling sys.exit()
        raise _load_error(spec, error) from None
    finally:
        # pyinfra's ctx.use() does not restore the context when the body raises.
        ctx_state.set(saved[0])
        ctx_inventory.set(saved[1])
        ctx_config.set(saved[2])
        if added:
            sys.path.remove(cwd)


def _load_error(spec: str, error: BaseException) -> InventoryError:
    """One line saying what failed, naming the inventory or group data file and line."""
    from pyinfra.api.exceptions import PyinfraError
    from pyinfra_cli.exceptions import UnexpectedExternalError
    from pyinfra_cli.util import exec_file

    if isinstance(error, UnexpectedExternalError):  # pyinfra wraps errors raised by the file
        error = error.exception
    file, line = None, None  # the file pyinfra was running, and its line that failed
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if frame.f_code is exec_file.__code__:
            file, line = frame.f_locals.get("filename"), None
        elif file is not None and frame.f_code.co_filename == file:
            line = lineno
    detail = " ".join(str(error).split())
    if isinstance(error, SyntaxError):
        where = error.filename or file or spec
        return InventoryError(f"cannot load {where}: syntax error at line {error.lineno}")
    if isinstance(error, OSError) and error.filename and error.filename in (file, None):
        return InventoryError(f"cannot read {error.filename}: {error.strerror}")
    if file is None:  # pyinfra's own checks, a connector's: no file of the user's ran
        if not isinstance(error, PyinfraError):
            detail = f"{type(error).__name__}: {detail}"
        return InventoryError(f"invalid inventory {spec}: {detail}")
    at = f" at line {line}" if line else ""
    if isinstance(error, SystemExit):
        code = "" if error.code is None else repr(error.code)
        return InventoryError(f"cannot load {file}: sys.exit({code}){at}")
    said = f": {detail}" if detail else ""
    return InventoryError(f"cannot load {file}: {type(error).__name__}{at}{said}")


def select_hosts(inventory: Inventory, limit: list[str]) -> list[str]:
    """
    Names of the hosts ``--limit`` values match, in inventory order: each value is a group
    name (``all`` for every host) or a glob over host names, and must match something.
    """
    names = [host.name for host in inventory]
    if not limit:
        return names
    chosen: set[str] = set()
    for pattern in limit:
        group = inventory.groups.get(pattern, [])  # a defaultdict: get() adds nothing
        matched = (
            names
            if pattern == "all"
            else [host.name for host in group] or fnmatch.filter(names, pattern)
        )
        if not matched:
            raise InventoryError(f"--limit {pattern!r} matches no host or group")
        chosen.update(matched)
    return [name for name in names if name in chosen]


def make_inventory(
    spec: str,
    override_data: dict[str, Any],
    limit: list[str],
    *,
    sudo: bool = False,
    connect_timeout: int = 10,
) -> tuple[Inventory, list[str]]:
    """
    A pyinfra ``Inventory`` for ``spec`` and the names of the hosts to act on (``--limit``).

    ``spec`` is what ``pyinfra SPEC deploy.py`` takes: an inventory file, an ``@connector`` or
    ``@connector/arg``, or host names separated by commas. Nothing is connected to, unless the
    inventory file itself does (a Proxmox VE cluster read from one node: cli/cluster.py), with
    ``sudo`` and ``connect_timeout`` as pyinfra's ``--sudo`` and config give them to it.
    """
    from pyinfra.api import Config

    names = _host_names(spec)
    if names == []:
        raise InventoryError(f"no host names in {spec!r}")
    config = Config(SUDO=sudo, CONNECT_TIMEOUT=connect_timeout)
    inventory = _load(spec, names, override_data, config)
    if not len(inventory):
        raise InventoryError(f"inventory {spec} defines no hosts")
    return inventory, select_hosts(inventory, limit)
