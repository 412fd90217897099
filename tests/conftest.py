"""Shared helpers: inventories written for a test, and the installed console scripts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture
def write_inventory(tmp_path: Path):
    """Write a pyinfra inventory file from its Python source and return its path."""

    def write(source: str, name: str = "inv.py") -> str:
        path = tmp_path / name
        path.write_text(source)
        return str(path)

    return write
