"""Build, boot and clean up ksm-guard's test VMs by hand: ``python -m tests.vm
build|up|reap|capture``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from tests.vm.guest import DEFAULT_MEMORY_MIB
from tests.vm.inventory import write_inventory
from tests.vm.recipe import FLAVOURS, PRIMARY_RELEASE, RELEASES
from tests.vm.session import VmSession, parallel, reap_stale_sessions
from tests.vm.util import timed


def _cmd_build(args: argparse.Namespace) -> int:
    """Build or reuse the images of each release side by side (and optionally the booted snapshots
    of every flavour: at the default size, all the suite restores), print where they are."""
    timings: dict[str, float] = {}
    releases = args.release or list(RELEASES)
    with VmSession(memory_mib=args.memory) as session:
        with timed(f"ensure images of {', '.join(releases)}", timings):
            parallel(session.images, releases)
        for release in releases:
            print(f"{release}: {session.images(release).root}")
        if args.snapshots:
            with timed("ensure snapshots", timings):
                for release in releases:
                    session.ensure_snapshots(FLAVOURS, args.memory, release)
            print(f"accel: {session.accel}")
    print(json.dumps(timings))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    """Boot guests, print how to reach them, wait for Ctrl-C, then stop them."""
    flavours = args.flavour or list(FLAVOURS)
    with VmSession(memory_mib=args.memory) as session:
        with timed(f"boot {args.release} {', '.join(flavours)}"):
            guests = session.start_many(flavours, release=args.release)
        inventory = write_inventory(session.workdir / "inventory.py", guests.values())
        for guest in guests.values():
            print(f"{guest.name:10} ssh -F {session.ssh_config} {guest.name}")
        print(f"pyinfra inventory: {inventory}\nCtrl-C stops the VMs.", flush=True)
        try:
            while any(guest.is_running() for guest in guests.values()):
                time.sleep(1)
            print("all VMs exited")
        except KeyboardInterrupt:
            print("stopping")
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    """Capture KsmHost fixtures from the release's debian and pve guests (tests/vm/capture.py)."""
    from tests.vm.capture import capture

    with VmSession(memory_mib=args.memory) as session:
        for path in capture(session, args.release):
            print(path)
    return 0


def _cmd_reap(args: argparse.Namespace) -> int:
    """Stop VMs of dead sessions (with --all also those kept with --keep-vms)."""
    print(f"stopped {reap_stale_sessions(include_kept=args.all)} VM(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tests.vm``."""
    parser = argparse.ArgumentParser(prog="python -m tests.vm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build or reuse the cached images")
    build.add_argument(
        "--snapshots", action="store_true", help="also create the booted snapshots the suite uses"
    )
    build.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, help="guest MiB")
    build.add_argument(
        "--release", action="append", choices=RELEASES, help="repeatable (default: all)"
    )
    build.set_defaults(func=_cmd_build)
    up = sub.add_parser("up", help="boot guests until Ctrl-C (KSM_GUARD_KEEP_VMS=1: leave them)")
    up.add_argument("--flavour", action="append", choices=FLAVOURS, help="repeatable")
    up.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, help="guest MiB")
    up.add_argument("--release", choices=RELEASES, default=PRIMARY_RELEASE, help="Debian release")
    up.set_defaults(func=_cmd_up)
    grab = sub.add_parser("capture", help="write KsmHost fixtures from real guests")
    grab.add_argument("--release", choices=RELEASES, default=PRIMARY_RELEASE, help="Debian release")
    grab.set_defaults(func=_cmd_capture)
    reap = sub.add_parser("reap", help="stop VMs left over by dead sessions")
    reap.add_argument("--all", action="store_true", help="include sessions kept with --keep-vms")
    reap.set_defaults(func=_cmd_reap)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
