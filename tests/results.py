"""Reading ksm-guard's JSON result back in tests."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest


def hosts_of(result: subprocess.CompletedProcess[str] | Any) -> dict[str, dict[str, Any]]:
    """The hosts of a ``-o json`` result by name (a subprocess's or CliRunner's)."""
    stdout = result.stdout
    try:
        document = json.loads(stdout)
    except json.JSONDecodeError:
        code = getattr(result, "returncode", getattr(result, "exit_code", None))
        pytest.fail(f"no JSON on stdout (exit {code}): {result.stderr}")
    return {host["host"]: host for host in document["hosts"]}
