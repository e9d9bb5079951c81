#!/usr/bin/env bash
# Build (or reuse) a bootable raw disk image for recoverfs tests.
#
#   vm-images/build.sh tiny|debian
#
# The last line of stdout is the absolute path of the image; everything else
# goes to stderr so callers can simply take the last line.
#
# Images are cached in vm-images/out/NAME.img together with NAME.img.stamp,
# a hash of every script that went into the image.  A cached image is reused
# only while that hash still matches.  Booting an image changes it (its boot
# counter), so callers that need a pristine image should copy it first.
set -euo pipefail

# Keep the real stdout for the final path only.
exec 3>&1 1>&2

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/out"

usage() {
    echo "usage: $0 tiny|debian" >&2
    exit 2
}

[[ $# -eq 1 ]] || usage
NAME="$1"
case "$NAME" in
    tiny | debian) ;;
    *) usage ;;
esac

if [[ $(id -u) -ne 0 ]]; then
    # debootstrap, mknod and preserving file ownership in the root
    # filesystems all need real root.
    echo "build.sh: must run as root" >&2
    exit 1
fi

# shellcheck source=lib/common.sh
. "$HERE/lib/common.sh"

mkdir -p "$OUT"
IMG="$OUT/$NAME.img"
STAMP="$IMG.stamp"

# Tests may ask for the same image from several processes at once: the
# first one builds, the others wait and then reuse its result.
exec 9>"$OUT/.$NAME.lock"
flock 9

want_stamp="$(script_hash "$NAME")"
if [[ -f $IMG && -f $STAMP && "$(cat "$STAMP")" == "$want_stamp" ]]; then
    log "reusing cached $IMG"
    echo "$IMG" >&3
    exit 0
fi

# Invalidate first: if anything below fails, no stale stamp vouches for
# whatever image file is left behind.
rm -f "$STAMP"

ensure_host_packages "$NAME"

# Leftovers of a build that was killed outright (we hold the lock, so no
# live build owns them).
for stale in "$OUT/.work-$NAME".*; do
    safe_rm_tree "$stale"
done

WORK="$(mktemp -d "$OUT/.work-$NAME.XXXXXX")"
cleanup() {
    safe_rm_tree "$WORK"
}
trap cleanup EXIT
# Make Ctrl-C / kill run the EXIT trap too.
trap 'exit 130' INT TERM
EMPTY_DIR="$WORK/empty"
mkdir "$EMPTY_DIR"

start=$SECONDS
# shellcheck source=/dev/null
. "$HERE/images/$NAME.sh"
# Each image script defines build_image WORKDIR OUTFILE.
build_image "$WORK" "$WORK/$NAME.img"

mv -f "$WORK/$NAME.img" "$IMG"
echo "$want_stamp" >"$STAMP"
log "built $IMG in $((SECONDS - start)) s"
echo "$IMG" >&3
