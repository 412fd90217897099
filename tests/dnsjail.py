"""
A DNS resolver that never answers, for one command: ``unshare --net --mount`` (root) gives the
command a network of its own (only loopback) and its own /etc/resolv.conf, /etc/hosts and
/etc/nsswitch.conf, bind-mounted; a UDP socket on 127.0.0.1:53 records each query and drops it.
Nothing in there can reach this machine's real resolver: its network is not in the namespace.

``python -m tests.dnsjail SPEC`` is the part that runs inside the namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# glibc's per-query timeout, 30 s, three times: a lookup of a name would take minutes.
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:30 attempts:3\n"
# "files dns" only: nss-resolve or an nscd would answer over a Unix socket, from outside.
NSSWITCH_CONF = "hosts: files dns\n"


@dataclass
class Jailed:
    """How the command went, and the names it asked the silent resolver for."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    queries: list[str]


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root for unshare --net --mount"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return f"unshare --net --mount fails here: {probe.stderr.strip()}"
    return None


def run_jailed(command: list[str], hosts: str = "", timeout: float = 120) -> Jailed:
    """Run ``command`` behind the silent resolver; ``hosts`` is added to /etc/hosts there."""
    spec = json.dumps({"command": command, "hosts": hosts, "timeout": timeout})
    done = subprocess.run(
        ["unshare", "--net", "--mount", sys.executable, "-m", "tests.dnsjail", spec],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the namespace could not be set up: {done.stderr.strip()}")
    return Jailed(**json.loads(done.stdout))


def _qname(packet: bytes) -> str:
    """The first question's name in a DNS query (the labels after the 12-byte header)."""
    labels, at = [], 12
    while at < len(packet) and packet[at]:
        size = packet[at]
        labels.append(packet[at + 1 : at + 1 + size].decode("ascii", "replace"))
        at += 1 + size
    return ".".join(labels)


def _silent_resolver(queries: list[str]) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 53))

    def receive() -> None:
        while True:
            try:
                packet, _ = server.recvfrom(4096)
            except OSError:
                return
            queries.append(_qname(packet))

    threading.Thread(target=receive, daemon=True).start()
    return server


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _inside(spec: dict[str, object]) -> dict[str, object]:
    """In the namespace: loopback up, the three files in place, the resolver listening."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    files = Path(tempfile.mkdtemp(prefix="dnsjail-"))
    contents = {
        "resolv.conf": RESOLV_CONF,
        "hosts": f"127.0.0.1 localhost\n::1 localhost\n{spec['hosts']}",
        "nsswitch.conf": NSSWITCH_CONF,
    }
    for name, text in contents.items():
        (files / name).write_text(text)
        subprocess.run(["mount", "--bind", str(files / name), f"/etc/{name}"], check=True)
    queries: list[str] = []
    server = _silent_resolver(queries)
    command = [str(part) for part in spec["command"]]  # type: ignore[attr-defined]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=float(spec["timeout"]),  # type: ignore[arg-type]
            check=False,
        )
        outcome = (done.returncode, done.stdout, done.stderr)
    except subprocess.TimeoutExpired as expired:
        killed = f"{_text(expired.stderr)}\n(killed: {expired})"
        outcome = (-1, _text(expired.stdout), killed)
    seconds = time.monotonic() - started
    server.close()
    shutil.rmtree(files, ignore_errors=True)  # the bind mounts go with the namespace
    returncode, stdout, stderr = outcome
    return {
        "returncode": returncode,
        "stdout": stdout,
        "stderr": stderr,
        "seconds": seconds,
        "queries": list(queries),
    }


if __name__ == "__main__":
    print(json.dumps(_inside(json.loads(sys.argv[1]))))
