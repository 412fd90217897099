"""Inventories load as ``pyinfra INVENTORY deploy.py`` loads them, but where pyinfra errs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ksm_guard.cli.app import app
from ksm_guard.cli.inventory import InventoryError, make_inventory
from tests.conftest import BIN

runner = CliRunner()
HELPER = "ksm_guard_inventory_helper"  # a module an inventory imports from the working directory

# A working directory with group data of its own and an inventory folder with more. Host names
# end in .invalid (RFC 6761): nothing here may resolve them, and nothing connects.
TREE = {
    "group_data/all.py": "where = 'cwd'\ncwd_only = True\n",
    "group_data/web.py": "y = 'cwd'\nweb_cwd = 1\n",
    "group_data/@docker.py": "docker_group = True\n",
    "site/fleet.py": (
        "web = (['w1.invalid', ('w2.invalid', {'x': 'host'})],"
        " {'x': 'inline', 'y': 'inline', 'k': 'inline'})\n"
        "db = ['d1.invalid', 'w1.invalid']\n"
    ),
    "site/all_tuple.py": (
        "all = (['a1.invalid', 'a2.invalid'], {'where': 'inline', 'k': 'inline'})\n"
        "web = ['a2.invalid']\n"
    ),
    "site/group_data/all.py": "where = 'beside'\n",
    "site/group_data/web.py": "x = 'file'\ny = 'beside'\n",
    "site/group_data/fleet.py": (
        "from pyinfra import inventory\n\nfleet_size = len(inventory.get_group('fleet', []))\n"
    ),
    "here.py": "web = ['h1.invalid']\nother = [('h2.invalid', {'y': 'host'})]\n",
    "imports.py": f"from {HELPER} import HOSTS\n\nweb = HOSTS\n",
    f"{HELPER}.py": "HOSTS = ['i1.invalid', 'i2.invalid']\n",
}
COMPARED = [
    "site/fleet.py",  # inline group data vs group_data files; cwd vs beside the inventory
    "site/all_tuple.py",  # all = (hosts, data) vs group_data/all.py in both places
    "here.py",  # an inventory in the working directory: one group_data folder
    "imports.py",  # imports a module from the working directory, as pyinfra's CLI allows
    "@local",
    "@ssh/10.0.0.1",
    "@docker/x",  # its connector group @docker takes group_data/@docker.py
    "@local,@ssh/10.0.0.1,@docker/x",
    "w1.invalid,w2.invalid",
    "w1.invalid,w1.invalid",
]


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _seen(spec: str, limit: list[str] | None = None) -> list[dict[str, Any]]:
    """Each host ksm-guard loads for ``spec``, as ``pyinfra SPEC debug-inventory --json`` has it."""
    inventory, chosen = make_inventory(spec, {}, limit or [])
    hosts = [{"name": h.name, "groups": h.groups, "data": h.data.dict()} for h in inventory]
    assert chosen == [host["name"] for host in hosts]
    return list(json.loads(json.dumps(hosts)))


@pytest.fixture(autouse=True)
def lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Name lookups attempted, each refused: a test expecting some must clear them."""
    asked: list[str] = []

    def refuse(host: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "no name lookups in these tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)
    yield asked
    assert asked == [], f"names looked up: {asked}"


@pytest.fixture
def imports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Modules pyinfra's inventory code looks for (its module:function inventories): none found."""
    import pyinfra_cli.util

    looked: list[str] = []

    def find_spec(name: str, *args: Any) -> None:
        looked.append(name)

    monkeypatch.setattr(pyinfra_cli.util, "find_spec", find_spec)
    return looked


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TREE written out: the working directory of the comparisons."""
    return _write(tmp_path_factory.mktemp("tree"), TREE)


@pytest.fixture(scope="module")
def pyinfra_sees(tree: Path) -> dict[str, list[dict[str, Any]]]:
    """``pyinfra SPEC debug-inventory --json`` run in ``tree`` for every compared spec, at once."""
    runs = {
        spec: subprocess.Popen(
            [str(BIN / "pyinfra"), spec, "debug-inventory", "--json"],
            cwd=tree,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for spec in COMPARED
    }
    seen = {}
    for spec, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        seen[spec] = json.loads(out)
    return seen


@pytest.mark.parametrize("spec", COMPARED)
def test_hosts_groups_and_data_match_pyinfra(
    spec: str,
    tree: Path,
    pyinfra_sees: dict[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each host's name, groups and data are what pyinfra's own CLI loads, in the same order."""
    monkeypatch.chdir(tree)
    try:
        assert _seen(spec) == pyinfra_sees[spec]
    finally:
        sys.modules.pop(HELPER, None)
    assert str(tree) not in sys.path  # added while loading, as pyinfra's CLI has it, then gone


def test_group_data_file_beats_inline_group_data(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """group_data/web.py's x wins over web's inline x; host data beats both; the rest stays."""
    monkeypatch.chdir(tree)
    w1, w2, _ = _seen("site/fleet.py")
    assert (w1["data"]["x"], w2["data"]["x"], w1["data"]["k"]) == ("file", "host", "inline")


def test_group_data_beside_the_inventory_beats_the_working_directory(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both folders are read, the working directory's first; all.py beats all's inline data."""
    monkeypatch.chdir(tree)
    w1 = _seen("site/fleet.py")[0]["data"]
    a1 = _seen("site/all_tuple.py")[0]["data"]
    assert (w1["y"], w1["web_cwd"], w1["fleet_size"]) == ("beside", 1, 3)
    assert (a1["where"], a1["cwd_only"], a1["k"]) == ("beside", True, "inline")


def test_a_long_host_list_loads_where_pyinfra_crashes(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 names: pyinfra's Path(spec).exists() raises ENAMETOOLONG; ksm-guard loads them all."""
    from pyinfra_cli.inventory import make_inventory as pyinfra_make_inventory

    names = [f"web{number:02}.example.invalid" for number in range(40)]
    monkeypatch.chdir(tree)
    with pytest.raises(OSError, match="File name too long"):
        pyinfra_make_inventory(",".join(names), cwd=str(tree))
    cwd_data = {"where": "cwd", "cwd_only": True}
    assert _seen(",".join(names)) == [{"name": n, "groups": [], "data": cwd_data} for n in names]


def test_a_connector_argument_is_no_group_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyinfra also reads ./@ssh/group_data/ for ``@ssh/x`` (its Path(spec).parent): we don't."""
    _write(tmp_path, {"@ssh/group_data/all.py": "stray = True\n", "group_data/all.py": "a = 1\n"})
    command = [str(BIN / "pyinfra"), "@ssh/10.0.0.1", "debug-inventory", "--json"]
    pyinfra = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(pyinfra.stdout)[0]["data"]["stray"] is True
    monkeypatch.chdir(tmp_path)
    assert _seen("@ssh/10.0.0.1")[0]["data"] == {"a": 1, "ssh_hostname": "10.0.0.1"}


@pytest.fixture
def contacts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Connections opened and local commands run (how pyinfra's connectors reach a target)."""
    import pyinfra.connectors.util

    made: list[str] = []

    def connect(self: socket.socket, address: Any) -> None:
        made.append(f"connect {address}")
        raise OSError("no connections in these tests")

    def popen(command: Any, *args: Any, **kwargs: Any) -> None:
        made.append(f"run {command}")
        raise OSError("no local commands in these tests")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(pyinfra.connectors.util, "Popen", popen)
    return made


@pytest.mark.parametrize(
    "spec",
    [
        "@local",
        "@ssh/10.0.0.1",
        "@docker/x",
        "@podman/x",
        "@chroot/srv/guest",
        "@dockerssh/127.0.0.1:debian",
        "@podmanssh/127.0.0.1:debian",
        "@fake",
        "@fake/a",
    ],
)
def test_every_connector_pyinfra_accepts_loads_without_contact(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, contacts: list[str]
) -> None:
    """Each @connector loads as pyinfra loads it, and making the Inventory reaches nothing."""
    from pyinfra_cli.inventory import make_inventory as pyinfra_make_inventory

    monkeypatch.chdir(tmp_path)
    theirs = pyinfra_make_inventory(spec, cwd=str(tmp_path))
    assert _seen(spec) == [
        {"name": h.name, "groups": h.groups, "data": h.data.dict()} for h in theirs
    ]
    assert contacts == []


@pytest.mark.parametrize("word", ["web1.example.invalid", "os.path", "pve-a1"])
def test_a_bare_word_is_a_host_name(
    word: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, imports: list[str]
) -> None:
    """A word that is no file names one host: no module import, no name lookup (autouse check)."""
    monkeypatch.chdir(tmp_path)
    assert _seen(word) == [{"name": word, "groups": [], "data": {}}]
    assert imports == []


def test_pyinfra_itself_would_import_and_look_up_a_bare_word(
    lookups: list[str], imports: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why ksm-guard never calls pyinfra's make_inventory() for a bare word."""
    from pyinfra_cli.inventory import make_inventory as pyinfra_make_inventory

    monkeypatch.chdir(tmp_path)
    inventory = pyinfra_make_inventory("web1.example.invalid", cwd=str(tmp_path))
    assert (len(inventory), imports, lookups) == (0, ["web1.example"], ["web1.example.invalid"])
    lookups.clear()


@pytest.mark.parametrize(
    "spec, files",
    [
        ("a.invalid,a.invalid,b.invalid,a.invalid", {}),
        (" a.invalid, b.invalid,,a.invalid ", {}),  # pyinfra would make host " b.invalid"
        ("inv.py", {"inv.py": "hosts = ['a.invalid', 'b.invalid', 'a.invalid']\n"}),
        ("inv.py", {"inv.py": "web = ['a.invalid']\ndb = [('a.invalid', {}), 'b.invalid']\n"}),
        ("inv.py", {"inv.py": "all = ['a.invalid', 'a.invalid', 'b.invalid']\n"}),
    ],
)
def test_a_host_listed_twice_counts_once(
    spec: str, files: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every list form: the host is loaded and chosen once."""
    monkeypatch.chdir(_write(tmp_path, files))
    inventory, chosen = make_inventory(spec, {}, [])
    assert (len(inventory), chosen) == (2, ["a.invalid", "b.invalid"])


def test_at_local_twice_is_one_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``-i @local,@local``: pyinfra's @local connector refuses no duplicate, and one host runs."""
    monkeypatch.chdir(tmp_path)
    assert make_inventory("@local,@local", {}, [])[1] == ["@local"]


@pytest.mark.parametrize(
    "limit, chosen",
    [
        (["db"], ["w1.invalid", "d1.invalid"]),  # a group, in inventory order
        (["w*"], ["w1.invalid", "w2.invalid"]),  # a glob over host names
        (["all"], ["w1.invalid", "w2.invalid", "d1.invalid"]),
        (["d1.invalid", "web", "w1*"], ["w1.invalid", "w2.invalid", "d1.invalid"]),
    ],
)
def test_limit_chooses_hosts_in_inventory_order(
    limit: list[str], chosen: list[str], tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--limit takes group names and globs; a host matched twice is chosen once."""
    monkeypatch.chdir(tree)
    assert make_inventory("site/fleet.py", {}, limit)[1] == chosen


def test_limit_matching_nothing_is_an_error(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --limit value that matches no host or group names itself."""
    monkeypatch.chdir(tree)
    with pytest.raises(InventoryError, match=r"^--limit 'web\*' matches no host or group$"):
        make_inventory("site/fleet.py", {}, ["db", "web*"])


def test_override_data_beats_everything(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's own data (ksm_mode and friends) overrides host and group data."""
    monkeypatch.chdir(tree)
    inventory, _ = make_inventory("site/fleet.py", {"x": "override"}, [])
    assert inventory.get_host("w2.invalid").data.x == "override"


def test_a_rewritten_inventory_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyinfra caches compiled files by name; each load reads the file as it is now."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inv.py").write_text("hosts = ['a.invalid']\n")
    make_inventory("inv.py", {}, [])
    (tmp_path / "inv.py").write_text("hosts = ['b.invalid']\n")
    assert make_inventory("inv.py", {}, [])[1] == ["b.invalid"]


def test_a_failed_load_leaves_no_pyinfra_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyinfra's ctx.use() keeps its state and inventory when the body raises; we put them back."""
    from pyinfra.context import ctx_inventory, ctx_state

    monkeypatch.chdir(_write(tmp_path, {"inv.py": "hosts = ['a']\n", "group_data/all.py": "1/0"}))
    before = ctx_state.get(), ctx_inventory.get()
    with pytest.raises(InventoryError):
        make_inventory("inv.py", {}, [])
    assert (ctx_state.get(), ctx_inventory.get()) == before


HOSTS = "hosts = ['@local']\n"
PROD = {"inventories/prod.py": HOSTS}
ERRORS = [
    (PROD, "prod", "inventory not found: prod (did you mean inventories/prod.py?)"),
    ({"prod.py": HOSTS}, "prod", "inventory not found: prod (did you mean prod.py?)"),
    (PROD, "prod.py", "inventory not found: prod.py (did you mean inventories/prod.py?)"),
    ({}, "inventories/nope.py", "inventory not found: inventories/nope.py"),
    (
        {"i.py": f"import sys\n{HOSTS}sys.exit()\n"},
        "i.py",
        "cannot load i.py: sys.exit() at line 3",
    ),
    ({"i.py": f"{HOSTS}raise SystemExit(0)\n"}, "i.py", "cannot load i.py: sys.exit(0) at line 2"),
    (
        {"i.py": f"{HOSTS}raise RuntimeError('no\\nway')\n"},
        "i.py",
        "cannot load i.py: RuntimeError at line 2: no way",
    ),
    ({"i.py": "hosts = [\n  '@local',\n"}, "i.py", "cannot load i.py: syntax error at line 1"),
    ({"i.py/x": ""}, "i.py", "inventory is a directory, not a file: i.py"),
    ({"i.py": "settings = {'a': 1}\n"}, "i.py", "inventory i.py defines no hosts"),
    (
        {"i.py": HOSTS, "group_data/all.py": "x = 1 / 0\n"},
        "i.py",
        "cannot load {cwd}/group_data/all.py: ZeroDivisionError at line 1: division by zero",
    ),
    (
        {"i.py": HOSTS, "group_data/web.py/x": ""},
        "i.py",
        "cannot read {cwd}/group_data/web.py: Is a directory",
    ),
    (  # pyinfra's own loader raises on a module-level tuple that is no (hosts, data) group
        {"i.py": "timeout = (5, 10)\n"},
        "i.py",
        "invalid inventory i.py: TypeError: 'int' object is not iterable",
    ),
    ({}, "@nope", "invalid inventory @nope: Invalid connector: nope"),
    ({}, "@local/x", "invalid inventory @local/x: Cannot have more than one @local"),
    ({}, "@docker", "invalid inventory @docker: No docker base ID provided!"),
    ({}, " , ", "no host names in ' , '"),
    ({}, "", "no host names in ''"),
]


@pytest.mark.parametrize("files, spec, message", ERRORS, ids=[e[2] for e in ERRORS])
def test_a_bad_inventory_is_one_line_and_exit_2(
    files: dict[str, str], spec: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ksm-guard audit -i SPEC``: exit 2, one line on stderr, nothing on stdout, nothing run."""
    monkeypatch.chdir(_write(tmp_path, files))
    result = runner.invoke(app, ["audit", "-i", spec])
    expected = "ksm-guard: " + message.format(cwd=os.getcwd()) + "\n"
    assert (result.exit_code, result.stderr, result.stdout) == (2, expected, "")


def test_limit_matching_nothing_is_a_usage_error() -> None:
    """--limit that matches no host: exit 2, the pattern named."""
    result = runner.invoke(app, ["audit", "--limit", "web*"])
    assert result.exit_code == 2
    assert result.stderr == "ksm-guard: --limit 'web*' matches no host or group\n"
