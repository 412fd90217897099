#!/usr/bin/env bash
# Create .venv with ksm-guard and its test tools; install missing Debian packages first.
# Usage: scripts/bootstrap.sh [--test | --bench]   (instead of the venv: --test installs what the
# tests need, sshd for the loopback fleet, QEMU for the VMs and Chromium for the report page;
# --bench what the benchmark needs)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "bootstrap: installing ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi
if [ "${1:-}" = "--test" ]; then
    apt_install openssh-server openssh-client qemu-system-x86 qemu-utils debootstrap \
        e2fsprogs xz-utils zstd chromium prometheus shellcheck
    exit 0
fi
if [ "${1:-}" = "--bench" ]; then
    apt_install openssh-server openssh-client util-linux
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "pip>=25.1"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e . --group dev
# Byte-compile the project now: with PYTHONDONTWRITEBYTECODE set, every run would compile it anew.
"$VENV/bin/python" -m compileall -q cli operations >/dev/null
