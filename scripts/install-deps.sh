#!/usr/bin/env bash
# Installs the given Debian packages if any is missing. Runs apt-get update
# once, only when something must be installed.
#
# qemu-system-x86 is special: this machine image may carry a newer
# qemu-utils (from backports) that conflicts with Debian's qemu-system-x86,
# so both are installed at qemu-system-x86's candidate version, and so is
# qemu-block-extra (QEMU's nfs:// and other block drivers).
set -euo pipefail

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

missing=()
for p in "$@"; do
    installed "$p" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
pkgs=()
qemu_version() { apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}'; }
for p in "${missing[@]}"; do
    case "$p" in
        qemu-system-x86) v=$(qemu_version); pkgs+=("qemu-system-x86=$v" "qemu-utils=$v") ;;
        # Its block drivers are built for exactly one QEMU version.
        qemu-block-extra) pkgs+=("qemu-block-extra=$(qemu_version)") ;;
        *) pkgs+=("$p") ;;
    esac
done
# Packages must not start services here (rpcbind would take port 111 on
# every address, which the NFS export and its tests bind per address).
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 0755 "$POLICY"
    trap '$SUDO rm -f "$POLICY"' EXIT
fi
$SUDO apt-get install -y -qq --no-install-recommends --allow-downgrades "${pkgs[@]}" >/dev/null
