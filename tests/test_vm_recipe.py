"""The VM image cache key follows the recipe's version and data, not its source text."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.vm import recipe

ROOT = Path(__file__).resolve().parents[1]
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKsmguardtestkey ksm-guard-tests\n"
QEMU_VERSION = "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"
UNRELATED_CODE = '''

# A helper nobody calls, as a later edit might add.
def _unrelated(value: int) -> int:
    """Return twice ``value``."""
    return 2 * value
'''


def _load_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> ModuleType:
    """Import ``source`` as a module of its own, beside the real recipe."""
    path = tmp_path / "recipe_variant.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("recipe_variant", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_recipe_key_ignores_reformatting_and_unrelated_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe module re-laid out (no comments, other quotes and wrapping) plus a new helper:
    same key."""
    source = Path(recipe.__file__).read_text()
    reformatted = ast.unparse(ast.parse(source)) + UNRELATED_CODE
    assert reformatted != source
    variant = _load_variant(tmp_path, monkeypatch, reformatted)
    assert variant.recipe_key(PUBKEY, QEMU_VERSION) == recipe.recipe_key(PUBKEY, QEMU_VERSION)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECIPE_VERSION", recipe.RECIPE_VERSION + 1),
        ("SUITE", "trixie"),
        ("PACKAGES", (*recipe.PACKAGES, "vim-tiny")),
        ("MASKED_UNITS", recipe.MASKED_UNITS[1:]),
        ("BASE_FILES", {**recipe.BASE_FILES, "etc/hostname": ("other-name\n", 0o644)}),
        ("PVE_KSMTUNED_TUNING", recipe.PVE_KSMTUNED_TUNING + "KSM_SLEEP_MSEC=10\n"),
        (
            "FLAVOUR_RECIPES",
            {**recipe.FLAVOUR_RECIPES, "bare": recipe.Flavour((), False, ())},
        ),
    ],
)
def test_recipe_key_changes_with_recipe_data(
    monkeypatch: pytest.MonkeyPatch, name: str, value: object
) -> None:
    """Changing the recipe version or any of its data changes the key."""
    before = recipe.recipe_key(PUBKEY, QEMU_VERSION)
    monkeypatch.setattr(recipe, name, value)
    assert recipe.recipe_key(PUBKEY, QEMU_VERSION) != before


@pytest.mark.parametrize(
    ("pubkey", "qemu_version"),
    [(PUBKEY.replace("test", "next"), QEMU_VERSION), (PUBKEY, QEMU_VERSION.replace("7.2", "8.2"))],
)
def test_recipe_key_changes_with_key_and_qemu(pubkey: str, qemu_version: str) -> None:
    """Another suite key or another QEMU version changes the key."""
    assert recipe.recipe_key(pubkey, qemu_version) != recipe.recipe_key(PUBKEY, QEMU_VERSION)


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("tests.localssh", []),
        ("tests.vm.recipe", ["tests.vm", "tests.vm.recipe", "tests.vm.util"]),
    ],
)
def test_unit_tier_imports_no_vm_machinery(module: str, allowed: list[str]) -> None:
    """The unit tier's SSH helpers import nothing of tests.vm; the recipe, only its data and
    helpers (no cache, QEMU, guest or session code)."""
    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('tests.vm')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == repr(allowed)
