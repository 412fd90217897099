"""--textfile-dir when the write fails later: the old ksm_guard.prom stays, no temp file is left."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ksm_guard.cli.app import app
from ksm_guard.cli.prometheus import TEXTFILE_NAME, TextfileError, write_textfile

runner = CliRunner()
OLD = 'ksm_guard_up{host="node1"} 1\n'
NEW = 'ksm_guard_up{host="node1"} 0\n'


def _fill(path: Path) -> None:
    """Write ``path`` until the filesystem has no block left."""
    with path.open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs holding an old ksm_guard.prom, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "textfiles"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        (mount / TEXTFILE_NAME).write_text(OLD)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def full_dir(tiny_tmpfs: Path) -> Path:
    """The tmpfs with every block taken, next to the old ksm_guard.prom."""
    _fill(tiny_tmpfs / "filler")
    assert os.statvfs(tiny_tmpfs).f_bavail == 0
    return tiny_tmpfs


def test_a_full_disk_keeps_the_old_file_and_removes_the_temp_file(full_dir: Path) -> None:
    """The temp file is created, its write fails: TextfileError, old file as it was, no .tmp."""
    with pytest.raises(TextfileError) as raised:
        write_textfile(full_dir, NEW)
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == f"cannot write {full_dir / TEXTFILE_NAME}: No space left on device"
    assert (full_dir / TEXTFILE_NAME).read_text() == OLD
    assert sorted(path.name for path in full_dir.iterdir()) == ["filler", TEXTFILE_NAME]


def test_a_read_only_directory_keeps_the_old_file(tiny_tmpfs: Path) -> None:
    """Remounted read-only after the run started: no temp file can be made."""
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    with pytest.raises(TextfileError) as raised:
        write_textfile(tiny_tmpfs, NEW)
    assert str(raised.value) == f"cannot write {tiny_tmpfs / TEXTFILE_NAME}: Read-only file system"
    assert [path.name for path in tiny_tmpfs.iterdir()] == [TEXTFILE_NAME]
    assert (tiny_tmpfs / TEXTFILE_NAME).read_text() == OLD


def test_a_removed_directory_is_a_textfile_error(tmp_path: Path) -> None:
    """The directory is gone: one line naming the path, as an OSError of the dedicated kind."""
    gone = tmp_path / "gone"
    gone.mkdir()
    shutil.rmtree(gone)
    with pytest.raises(TextfileError) as raised:
        write_textfile(gone, NEW)
    assert isinstance(raised.value, OSError)
    assert str(raised.value) == f"cannot write {gone / TEXTFILE_NAME}: No such file or directory"


def test_a_good_write_replaces_the_old_file(tmp_path: Path) -> None:
    """The ordinary case still works: new content, mode 0644, nothing else in the directory."""
    (tmp_path / TEXTFILE_NAME).write_text(OLD)
    assert write_textfile(tmp_path, NEW) == tmp_path / TEXTFILE_NAME
    assert (tmp_path / TEXTFILE_NAME).read_text() == NEW
    assert (tmp_path / TEXTFILE_NAME).stat().st_mode & 0o777 == 0o644
    assert [path.name for path in tmp_path.iterdir()] == [TEXTFILE_NAME]


def test_audit_reports_a_failed_textfile_write_and_exits_3(full_dir: Path) -> None:
    """The report still on stdout, one line on stderr, exit 3; the old file as it was."""
    result = runner.invoke(app, ["audit", "-i", "@local", "--textfile-dir", str(full_dir)])
    assert result.exit_code == 3, result.output
    assert result.stdout.splitlines()[1].startswith("@local")
    assert "1 host(s):" in result.stdout
    line = f"ksm-guard: cannot write {full_dir / TEXTFILE_NAME}: No space left on device"
    assert result.stderr.splitlines() == [line]
    assert (full_dir / TEXTFILE_NAME).read_text() == OLD
    assert sorted(path.name for path in full_dir.iterdir()) == ["filler", TEXTFILE_NAME]
