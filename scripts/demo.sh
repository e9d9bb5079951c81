#!/usr/bin/env bash
# make demo: boot a VM straight from its backup.
#   1. build the VM image (DEMO=debian, the default, or DEMO=tiny)
#   2. back it up
#   3. serve the recovery datastore and recover the VM
#   4. boot it with QEMU from the mount, with live progress, until its marker
#   5. summary: time from `recover` to the marker, bytes fetched vs disk size
#   6. release (the boot's reads become the VM's operational profile), then
#      recover again from fresh staging and boot following that profile, this
#      time over NBD (the recommended way to attach QEMU) while the daemon is
#      killed with kill -9 mid-boot and restarted: the guest never notices
# Cleans up after itself, so it can run again.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${RECOVERFS_BIN:-target/release/recoverfs}
DEMO=${DEMO:-debian}
case "$DEMO" in tiny | debian) ;; *) echo "DEMO must be tiny or debian" >&2; exit 2 ;; esac
MARKER="RECOVERFS-${DEMO^^}-UP"
WORK=$(mktemp -d /tmp/recoverfs-demo.XXXXXX)
DAEMON=""

cleanup() {
    if [ -n "$DAEMON" ]; then kill -TERM "$DAEMON" 2>/dev/null; wait "$DAEMON" 2>/dev/null || true; fi
    fusermount3 -u -z "$WORK/mnt" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
ms() { echo $(( $(date +%s%N) / 1000000 )); }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building the $DEMO VM image (cached after the first run)"
IMAGE=$(vm-images/build.sh "$DEMO" | tail -1)
ls -lhs "$IMAGE"

step "backing it up (deduplicated, compressed, content-addressed)"
ID=$($BIN backup --repo "$WORK/repo" --vm "$DEMO" "$IMAGE")
$BIN list --repo "$WORK/repo"

step "the VM is dead: serving its backup as a recovery datastore (FUSE, and NBD on a Unix socket)"
mkdir -p "$WORK/mnt"
start_daemon() {
    rm -f "$WORK/control.sock"
    $BIN serve --repo "$WORK/repo" --staging "$WORK/staging" --mount "$WORK/mnt" \
        --socket "$WORK/control.sock" --nbd "unix:$WORK/nbd.sock" 2>>"$WORK/daemon.log" &
    DAEMON=$!
    for _ in $(seq 200); do [ -S "$WORK/control.sock" ] && break; sleep 0.05; done
}
start_daemon
SOCK=(--socket "$WORK/control.sock")

# One recovery: recover, boot to the marker, summary. $1 names the run, $2
# is how QEMU reaches the disks (fuse or nbd), $3 "crash" kills the daemon
# with kill -9 during the boot and restarts it.
recover_and_boot() {
    step "recovering VM $DEMO from backup $ID ($1)"
    T0=$(ms)
    $BIN recover "${SOCK[@]}" "$DEMO"
    T1=$(ms)
    echo "disks ready after $((T1 - T0)) ms"

    step "booting it with QEMU straight from the backup via $2 ($1)"
    $BIN boot "${SOCK[@]}" "$DEMO" --via "$2" --marker "$MARKER" --timeout 900 >"$WORK/boot.out" &
    BOOT=$!
    tail -f "$WORK/boot.out" --pid "$BOOT" &
    if [ "${3:-}" = crash ]; then
        sleep "$([ "$DEMO" = tiny ] && echo 1 || echo 6)"
        step "kill -9 of the daemon in the middle of the boot; restarting it 1 s later"
        kill -9 "$DAEMON"; wait "$DAEMON" 2>/dev/null || true
        sleep 1
        start_daemon
        echo "daemon restarted (pid $DAEMON); it resumed the session by itself, and QEMU reconnected"
        echo "(the figures below count what the restarted daemon did)"
    fi
    wait "$BOOT"
    sleep 0.3
    BOOT_S=$(sed -n 's/^marker reached after \([0-9.]*\) s.*/\1/p' "$WORK/boot.out")

    step "status ($1)"
    $BIN status "${SOCK[@]}"

    step "summary ($1)"
    python3 - "$WORK/control.sock" "$((T1 - T0))" "$BOOT_S" "$DEMO" <<'PY' | tee -a "$WORK/summary"
import json, socket, sys
sock, recover_ms, boot_s, vm = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_UNIX); s.connect(sock)
s.sendall(f"GET /sessions/{vm} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
raw = b""
while chunk := s.recv(65536): raw += chunk
st = json.loads(raw.split(b"\r\n\r\n", 1)[1])
fetched = sum(d["fetched_bytes"] for d in st["disks"]); size = sum(d["size"] for d in st["disks"])
first = sum(d["profile"]["first_reads"] for d in st["disks"])
hits = sum(d["profile"]["first_read_hits"] for d in st["disks"])
src = st["disks"][0]["profile"]["source"] or "none"
print(f"[profile: {src}] time from recover to the marker: {recover_ms / 1000 + boot_s:.1f} s "
      f"(disks ready in {recover_ms} ms, boot {boot_s:.1f} s under QEMU TCG); "
      f"fetched {fetched / 2**20:.1f} MiB of a {size / 2**20:.0f} MiB disk ({100 * fetched / size:.1f}%); "
      f"{hits} of {first} first reads found their block already staged")
PY
}

recover_and_boot "first recovery: no profile yet, the default one" fuse

step "releasing the session: what the guest read becomes the VM's operational profile"
$BIN release "${SOCK[@]}" "$DEMO" --discard
$BIN profile show --repo "$WORK/repo" "$DEMO"

recover_and_boot "second recovery, fresh staging: following the recorded profile" nbd crash

step "both recoveries"
cat "$WORK/summary"

step "releasing the session (staging kept for a later recover) and stopping the daemon"
$BIN release "${SOCK[@]}" "$DEMO"
kill -TERM "$DAEMON"; wait "$DAEMON" || true; DAEMON=""
echo "done"
