"""The VM image cache key follows the release and the recipe's version and data, not its source
text; kernels come out of xz and zstd bzImages; old builds are pruned per release."""

from __future__ import annotations

import ast
import importlib.util
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.vm import cache, recipe
from tests.vm.util import VmError

ROOT = Path(__file__).resolve().parents[1]
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKsmguardtestkey ksm-guard-tests\n"
QEMU_VERSION = "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"
BOOKWORM_KEY = "a6a488751995c717"  # RECIPE_VERSION 2
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
    for release in recipe.RELEASES:
        assert variant.recipe_key(release, PUBKEY, QEMU_VERSION) == recipe.recipe_key(
            release, PUBKEY, QEMU_VERSION
        )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECIPE_VERSION", recipe.RECIPE_VERSION + 1),
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
@pytest.mark.parametrize("release", recipe.RELEASES)
def test_recipe_key_changes_with_recipe_data(
    monkeypatch: pytest.MonkeyPatch, name: str, value: object, release: str
) -> None:
    """Changing the recipe version or any of its data changes each release's key."""
    before = recipe.recipe_key(release, PUBKEY, QEMU_VERSION)
    monkeypatch.setattr(recipe, name, value)
    assert recipe.recipe_key(release, PUBKEY, QEMU_VERSION) != before


def test_each_release_has_its_own_key() -> None:
    """bookworm and trixie images are cached apart."""
    keys = {recipe.recipe_key(release, PUBKEY, QEMU_VERSION) for release in recipe.RELEASES}
    assert len(keys) == len(recipe.RELEASES) == 2


def test_bookworm_key_is_pinned() -> None:
    """bookworm's key for this suite key and QEMU version, written down: a change of the recipe's
    data or version shows here, so that a rebuild of everyone's cached images is a choice. (The
    key stayed d9dd6ba7906b4664 when trixie came, from c26d2a7 until RECIPE_VERSION 2.)"""
    assert recipe.recipe_key("bookworm", PUBKEY, QEMU_VERSION) == BOOKWORM_KEY


def test_unknown_release_is_refused() -> None:
    """A release the recipe does not know is an error, not a silent bookworm."""
    with pytest.raises(ValueError, match="unknown release 'sid'"):
        recipe.recipe_key("sid", PUBKEY, QEMU_VERSION)


@pytest.mark.parametrize(
    ("pubkey", "qemu_version"),
    [(PUBKEY.replace("test", "next"), QEMU_VERSION), (PUBKEY, QEMU_VERSION.replace("7.2", "8.2"))],
)
def test_recipe_key_changes_with_key_and_qemu(pubkey: str, qemu_version: str) -> None:
    """Another suite key or another QEMU version changes the key."""
    for release in recipe.RELEASES:
        assert recipe.recipe_key(release, pubkey, qemu_version) != recipe.recipe_key(
            release, PUBKEY, QEMU_VERSION
        )


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


ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def _bzimage(payload: bytes) -> bytes:
    """A stand-in bzImage: a setup header with a false magic, the payload, then trailing bytes."""
    return b"MZ" + b"\x00" * 510 + b"\xfd7zXZ\x00 not a stream " + payload + b"\x00" * 4096


def test_vmlinux_comes_out_of_an_xz_bzimage() -> None:
    """bookworm's 6.1 kernel: the ELF image behind the xz magic (a false magic is skipped)."""
    bzimage = _bzimage(lzma.compress(ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    assert recipe.extract_vmlinux(bzimage) == ELF


def test_vmlinux_comes_out_of_a_zstd_bzimage() -> None:
    """trixie's 6.12 kernel: the ELF image behind the zstd magic, through the zstd tool, whatever
    follows the frame."""
    frame = subprocess.run(["zstd", "-q", "-c"], input=ELF, capture_output=True, check=True).stdout
    assert frame.startswith(b"\x28\xb5\x2f\xfd")
    assert recipe.extract_vmlinux(_bzimage(frame)) == ELF


def test_a_bzimage_without_a_kernel_is_an_error() -> None:
    """No compressed ELF inside: a VmError naming both formats."""
    with pytest.raises(VmError, match="no xz- or zstd-compressed ELF kernel"):
        recipe.extract_vmlinux(_bzimage(b"\x28\xb5\x2f\xfd garbage"))


def _build(root: Path, name: str, release: str | None, used: int) -> Path:
    """A published build with a manifest (``release`` None: from before releases) used at
    ``used``."""
    build = root / name
    build.mkdir()
    manifest = {"kernel": "6.1.0-50-amd64"} if release is None else {"release": release}
    (build / "manifest.json").write_text(json.dumps(manifest))
    (build / "last-used").touch()
    os.utime(build / "last-used", (used, used))
    return build


def test_old_builds_are_pruned_per_release(tmp_path: Path) -> None:
    """Publishing a trixie build keeps the KEPT_BUILDS most recently used trixie builds (the new
    one included) and every bookworm build, old manifests counting as bookworm."""
    bookworm = [_build(tmp_path, f"b{i}", None if i else "bookworm", 100 + i) for i in range(4)]
    trixie = [_build(tmp_path, f"t{i}", "trixie", 200 + i) for i in range(4)]
    current = _build(tmp_path, "new", "trixie", 300)
    cache._prune_old_builds(tmp_path, current, "trixie")
    left = sorted(p.name for p in tmp_path.iterdir())
    kept_trixie = [t.name for t in trixie[-(cache.KEPT_BUILDS - 1) :]]
    assert left == sorted([*(b.name for b in bookworm), *kept_trixie, "new"])
