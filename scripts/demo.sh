#!/usr/bin/env bash
# make demo: back up a sample disk, serve it, recover it, read and write
# through the mount, show status, release and unmount. Cleans up after
# itself, so it can run again.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${RECOVERFS_BIN:-target/release/recoverfs}
WORK=$(mktemp -d /tmp/recoverfs-demo.XXXXXX)
DAEMON=""

cleanup() {
    [ -n "$DAEMON" ] && kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
    fusermount3 -u -z "$WORK/mnt" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "making a 256 MiB sample disk image with data and holes"
python3 - "$WORK/disk.raw" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(256 << 20)
    for i in range(0, 256, 3):           # every third MiB holds data
        f.seek(i << 20)
        f.write(os.urandom(1 << 20))
PY

step "backing it up (deduplicated, compressed, content-addressed)"
ID=$($BIN backup --repo "$WORK/repo" --vm demo "$WORK/disk.raw")
$BIN list --repo "$WORK/repo"

step "serving the recovery datastore"
mkdir -p "$WORK/mnt"
$BIN serve --repo "$WORK/repo" --staging "$WORK/staging" --mount "$WORK/mnt" \
    --socket "$WORK/control.sock" 2>"$WORK/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do [ -S "$WORK/control.sock" ] && break; sleep 0.05; done
SOCK=(--socket "$WORK/control.sock")

step "recovering VM demo from backup $ID"
START=$(date +%s%N)
DISK=$($BIN recover "${SOCK[@]}" demo | head -1)
ls -l "$WORK/mnt/demo"
echo "disk ready after $(( ($(date +%s%N) - START) / 1000000 )) ms"

step "reading 16 MiB from the middle of the disk (fetched on demand)"
dd if="$DISK" of=/dev/null bs=1M skip=96 count=16 status=none
cmp <(dd if="$DISK" bs=1M skip=96 count=16 status=none) <(dd if="$WORK/disk.raw" bs=1M skip=96 count=16 status=none) \
    && echo "bytes match the original image"

step "writing 1 MiB as the guest would (goes to staging only), then fsync"
dd if=/dev/urandom of="$DISK" bs=1M seek=10 count=1 conv=notrunc,fsync status=none
echo "written and fsync'ed"

step "status"
$BIN status "${SOCK[@]}"
curl -s --unix-socket "$WORK/control.sock" http://recoverfs/sessions/demo/disks/0/changed; echo

step "releasing the session and stopping the daemon"
$BIN release "${SOCK[@]}" demo
kill -TERM "$DAEMON"; wait "$DAEMON" || true; DAEMON=""
grep -q "$WORK/mnt" /proc/mounts && echo "still mounted!" && exit 1
echo "unmounted cleanly; the backup was never modified:"
$BIN verify --repo "$WORK/repo"
