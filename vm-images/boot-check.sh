#!/usr/bin/env bash
# Smoke test for an image: build it (or take the cached one), boot a copy of
# it BOOTS times (default 2) with exactly the qemu command the tests use, and
# check that boot k prints "RECOVERFS-<NAME>-UP boot=k".  Reports the wall
# time from starting qemu to the marker and to qemu's exit.
#
#   vm-images/boot-check.sh tiny|debian [BOOTS]
#
# The cached image itself is never booted (booting changes it).
set -euo pipefail
# EPOCHREALTIME must use a decimal point.
export LC_ALL=C

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME="${1:?usage: $0 tiny|debian [BOOTS]}"
BOOTS="${2:-2}"
case "$NAME" in
    tiny) TIMEOUT=120 ;;
    debian) TIMEOUT=600 ;;
    *) echo "usage: $0 tiny|debian [BOOTS]" >&2 && exit 2 ;;
esac
MARKER="RECOVERFS-${NAME^^}-UP boot="

command -v qemu-system-x86_64 >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >&2

img="$("$HERE/build.sh" "$NAME" | tail -n1)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp --sparse=always "$img" "$tmp/disk.img"

for ((i = 1; i <= BOOTS; i++)); do
    log="$tmp/boot$i.log"
    start=$EPOCHREALTIME
    marker_at=
    rc=0
    # qemu's stdout is the serial console; note when the marker line passes.
    while IFS= read -r line; do
        printf '%s\n' "$line" >>"$log"
        if [[ -z $marker_at && $line == *"$MARKER"* ]]; then
            marker_at=$EPOCHREALTIME
            got="${line#*"$MARKER"}"
            got="${got%%[!0-9]*}"
        fi
    done < <(timeout "$TIMEOUT" qemu-system-x86_64 -nographic -m 512 -no-reboot \
        -drive file="$tmp/disk.img",format=raw,if=virtio </dev/null 2>&1 || echo "QEMU-EXIT-STATUS $?")
    end=$EPOCHREALTIME
    if grep -q '^QEMU-EXIT-STATUS' "$log"; then
        rc=1
    fi
    if [[ -z $marker_at ]]; then
        echo "boot $i: FAIL, no marker (log follows)" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
    if [[ $got != "$i" ]]; then
        echo "boot $i: FAIL, marker says boot=$got" >&2
        exit 1
    fi
    if ((rc)); then
        echo "boot $i: FAIL, qemu did not power off cleanly: $(grep '^QEMU-EXIT-STATUS' "$log")" >&2
        exit 1
    fi
    awk -v i="$i" -v s="$start" -v m="$marker_at" -v e="$end" 'BEGIN {
        printf "boot %d: ok, boot=%d, marker after %.1f s, qemu exited after %.1f s\n", i, i, m - s, e - s
    }'
done
