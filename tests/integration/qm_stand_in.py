#!/usr/bin/python3
"""A STAND-IN for Proxmox VE's ``qm``, installed as /usr/sbin/qm on the test VMs only.

Proxmox VE cannot be installed on the Debian test guests, so this implements the one call
ksm-guard makes, ``qm set <vmid> --allow-ksm 0|1``, editing /etc/pve/qemu-server/<vmid>.conf
the way qemu-server does: for a running VM (live pid in /var/run/qemu-server/<vmid>.pid) the
value goes to the ``[PENDING]`` section, applied at the next start; for a stopped VM straight
into the main section. Snapshot sections are left alone. Each call is appended to
/var/log/qm-stand-in.log. It never starts, stops or restarts anything.
"""

from __future__ import annotations

import os
import sys

LOG = "/var/log/qm-stand-in.log"


def running(vmid: str) -> bool:
    """The VM's pid file names a live process."""
    try:
        with open(f"/var/run/qemu-server/{vmid}.pid") as handle:
            pid = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return os.path.exists(f"/proc/{pid}")


def main(args: list[str]) -> int:
    """Apply ``set <vmid> --allow-ksm <0|1>`` to the VM's config."""
    if len(args) != 4 or args[0] != "set" or args[2] != "--allow-ksm" or args[3] not in "01":
        print("qm stand-in: only 'qm set <vmid> --allow-ksm 0|1' is implemented", file=sys.stderr)
        return 255
    vmid, value = args[1], args[3]
    path = f"/etc/pve/qemu-server/{vmid}.conf"
    if not os.path.exists(path):
        print(f"Configuration file '{path}' does not exist", file=sys.stderr)
        return 2
    with open(LOG, "a") as log:
        log.write(" ".join(args) + "\n")

    # Sections: the main one (header None), then "[PENDING]", snapshots, "[special:...]".
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    with open(path) as handle:
        for line in handle.read().splitlines():
            if line.startswith("["):
                sections.append((line, []))
            elif line.strip():
                sections[-1][1].append(line)
    main_lines = sections[0][1]
    pending = next((lines for header, lines in sections if header == "[PENDING]"), None)
    if pending is None:
        pending = []
        sections.insert(1, ("[PENDING]", pending))
    current = next((line for line in main_lines if line.startswith("allow-ksm:")), "allow-ksm: 1")
    pending[:] = [line for line in pending if not line.startswith("allow-ksm:")]
    if running(vmid):
        if current != f"allow-ksm: {value}":
            pending.append(f"allow-ksm: {value}")
    else:
        main_lines[:] = [line for line in main_lines if not line.startswith("allow-ksm:")]
        main_lines.append(f"allow-ksm: {value}")

    blocks = ["\n".join(lines) for _, lines in sections[:1]]
    blocks += ["\n".join([header, *lines]) for header, lines in sections[1:] if header and lines]
    with open(f"{path}.tmp", "w") as handle:
        handle.write("\n\n".join(blocks) + "\n")
    os.replace(f"{path}.tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
