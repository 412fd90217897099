"""
The built wheel in a fresh venv, beside other packages named ``operations`` and ``cli``: each
keeps working, and so does a user's deploy with its own ``operations/`` folder.

Slow (a venv and its packages from the registries): ``make test-install``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

ROOT = Path(__file__).parent.parent

# Two other distributions whose import names ksm-guard must not take: a pyinfra deploy helper
# package called ``operations`` and a tool shipping a ``cli`` package with its own command.
OTHERS = {
    "other-operations": (
        "operations",
        "def web():\n    return 'their operations'\n",
        "",
    ),
    "other-cli": (
        "cli",
        "def main():\n    print('their cli')\n",
        '[project.scripts]\nother-cli = "cli:main"\n',
    ),
}


def _run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run outside the clone (whose operations/ and cli/ folders must not be on the path)."""
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True, text=True, check=False, cwd=cwd or Path(argv[0]).parents[2],
    )  # fmt: skip


def _other_package(root: Path, dist: str, package: str, code: str, extra: str) -> Path:
    project = root / dist
    (project / package).mkdir(parents=True)
    (project / package / "__init__.py").write_text(code)
    (project / "pyproject.toml").write_text(
        f'[project]\nname = "{dist}"\nversion = "1.0"\n{extra}\n'
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        f'[tool.hatch.build.targets.wheel]\npackages = ["{package}"]\n'
    )
    return project


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv: the other two packages first, then ksm-guard's wheel, as a user would."""
    root = tmp_path_factory.mktemp("install")
    built = _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", root, ROOT)
    assert built.returncode == 0, built.stderr
    (wheel,) = root.glob("ksm_guard-*.whl")
    env = root / "venv"
    assert _run(sys.executable, "-m", "venv", env).returncode == 0
    pip: list[str | Path] = [env / "bin" / "python", "-m", "pip", "install", "-q"]
    pip.append("--disable-pip-version-check")
    for dist, (package, code, extra) in OTHERS.items():
        done = _run(*pip, _other_package(root, dist, package, code, extra))
        assert done.returncode == 0, done.stderr
    done = _run(*pip, "-c", ROOT / "constraints.txt", wheel)
    assert done.returncode == 0, done.stderr
    return env


def test_ksm_guard_runs(venv: Path) -> None:
    """The installed command answers --version and audits this machine."""
    version = _run(venv / "bin" / "ksm-guard", "--version")
    assert version.stdout.strip() == "ksm-guard 0.1.0", version.stderr
    audit = _run(venv / "bin" / "ksm-guard", "audit", "-o", "json")
    assert audit.returncode in (0, 1), audit.stderr
    assert json.loads(audit.stdout)["hosts"][0]["host"] == "@local"


def test_the_other_packages_keep_their_names(venv: Path) -> None:
    """``operations`` and ``cli`` are still the other distributions' packages, and work."""
    probe = "import operations, cli; print(operations.web()); cli.main()"
    result = _run(venv / "bin" / "python", "-c", probe)
    assert result.stdout.splitlines() == ["their operations", "their cli"], result.stderr
    assert _run(venv / "bin" / "other-cli").stdout.strip() == "their cli"


def test_one_import_name(venv: Path) -> None:
    """ksm-guard's code loads as ksm_guard.* only: none of it under ``operations`` or ``cli``."""
    probe = textwrap.dedent(
        """
        import operations, cli
        from ksm_guard.cli import app, engine, render
        from ksm_guard.operations import model, modes
        from ksm_guard.operations.model import Mode
        assert engine.Mode is Mode is modes.Mode
        assert "site-packages/operations" in operations.__file__
        assert "site-packages/cli" in cli.__file__
        print("ok")
        """
    )
    result = _run(venv / "bin" / "python", "-c", probe)
    assert result.stdout.strip() == "ok", result.stderr


def test_a_user_deploy_with_its_own_operations_folder(venv: Path, tmp_path: Path) -> None:
    """
    A deploy imports its own ``operations.web`` and ksm-guard's operations; pyinfra runs it.
    Run last: it first removes the other ``operations`` distribution, whose name would clash
    with the deploy's own folder whatever ksm-guard did (the clash this guards against is one
    ksm-guard's wheel used to cause by installing an ``operations`` package itself).
    """
    python = venv / "bin" / "python"
    assert _run(python, "-m", "pip", "uninstall", "-q", "-y", "other-operations").returncode == 0
    (tmp_path / "operations").mkdir()
    (tmp_path / "operations" / "__init__.py").write_text("")
    (tmp_path / "operations" / "web.py").write_text('NAME = "the deploy\'s own web"\n')
    (tmp_path / "deploy.py").write_text(
        textwrap.dedent(
            """
            from operations import web
            from ksm_guard.operations import ksm

            print("loaded:", web.NAME)
            ksm.audited(name="Audit KSM")
            """
        )
    )
    result = _run(venv / "bin" / "pyinfra", "@local", "deploy.py", "--dry", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded: the deploy's own web" in result.stdout + result.stderr
    assert "Audit KSM" in result.stdout + result.stderr
