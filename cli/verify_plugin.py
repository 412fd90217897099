"""
The pytest plugin ``ksm-guard verify`` runs the checks with (in place of testinfra's own): a
``host`` fixture with one parameter per inventory host, named as in the inventory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import testinfra

HOSTS_OPTION = "--ksm-guard-hosts"
HOST_PROPERTY = "host"  # each JUnit testcase's <property name="host" value="web1"/>
CONTROL_PROPERTY = "control"  # and <property name="control" value="KSM-1"/> (controls.py IDs)
_SPECS = pytest.StashKey[dict[str, str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        HOSTS_OPTION,
        required=True,
        type=Path,
        help="JSON file: [[inventory host name, testinfra host spec], ...] in inventory order.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "control(id): the control ID (KSM-1...) a check proves")
    pairs = json.loads(Path(config.getoption(HOSTS_OPTION)).read_text(encoding="utf-8"))
    config.stash[_SPECS] = {str(name): str(spec) for name, spec in pairs}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "host" in metafunc.fixturenames:
        specs: dict[str, str] = metafunc.config.stash[_SPECS]
        names = list(specs)
        metafunc.parametrize("host", names, ids=names, indirect=True, scope="module")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "host" in callspec.params:
            item.user_properties.append((HOST_PROPERTY, callspec.params["host"]))
        marker = item.get_closest_marker("control")
        if marker is not None:
            item.user_properties.append((CONTROL_PROPERTY, str(marker.args[0])))


@pytest.fixture(scope="module")
def host(request: pytest.FixtureRequest) -> Any:
    """The testinfra host, its session opened: a host that cannot run commands errors here."""
    target = testinfra.get_host(request.config.stash[_SPECS][request.param])
    target.backend.hostname = request.param  # reports name the inventory's host, not an alias
    try:
        result = target.run("true")
    except Exception as error:  # paramiko's: refused, timed out, login failed, dropped
        pytest.fail(f"no SSH session: {type(error).__name__}: {error}", pytrace=False)
    if result.rc != 0:
        command = result.command.decode(errors="replace")
        pytest.fail(
            f"cannot run commands: {command!r} exited {result.rc}: {result.stderr.strip()}",
            pytrace=False,
        )
    return target
