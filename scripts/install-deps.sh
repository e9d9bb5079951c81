#!/usr/bin/env bash
# Installs the given Debian packages if any is missing. Runs apt-get update
# once, only when something must be installed.
#
# qemu-system-x86 is special: this machine image may carry a newer
# qemu-utils (from backports) that conflicts with Debian's qemu-system-x86,
# so both are installed at qemu-system-x86's candidate version.
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
for p in "${missing[@]}"; do
    if [ "$p" = qemu-system-x86 ]; then
        v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        pkgs+=("qemu-system-x86=$v" "qemu-utils=$v")
    else
        pkgs+=("$p")
    fi
done
$SUDO apt-get install -y -qq --no-install-recommends --allow-downgrades "${pkgs[@]}" >/dev/null
