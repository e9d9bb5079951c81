#!/usr/bin/env python3
"""What bounds "CPU-seconds per cold GiB <= 0.6x the baseline binary's".

A cold sequential FUSE read of a backup on S3 makes the daemon do four
passes over every byte that no design of copy-on-read can drop:

  recv    the body arrives on a TCP socket and is copied to user memory
  hash    BLAKE3 over the plain bytes (every chunk is verified when read)
  stage   the bytes are written into the staging file (copy-on-read)
  reply   the FUSE reply copies them into the kernel's request pages

(The test image is random, so its chunks are stored raw: no decompression.)
This probe times each pass on its own on this machine, as the CPU time
(user + system, getrusage of a child process doing only that pass) per
GiB, and prints their sum: the floor of the daemon's own CPU per cold GiB.
The baseline binary makes the same four passes, so a ratio far below
floor / baseline is out of reach without dropping one of them.

  recv    a child receives 1 GiB over loopback TCP into one reused 1 MiB
          buffer (recv_into); a sender thread in the parent writes it.
          Only the receiver's CPU counts, as only the daemon's does.
  hash    `b3sum --num-threads 1` (Debian's b3sum: the same blake3 crate,
          the same SIMD) over a 1 GiB file in the page cache, mmap'd,
          as the daemon hashes bytes already in memory.
  stage   a child writes 1 GiB in 1 MiB pwrites to a new file (page cache,
          no fsync; writeback runs in kernel threads, for the daemon too).
  reply   a child writes 1 GiB in 1 MiB writes into a 1 MiB pipe that
          another process drains: a user-to-kernel copy into fresh pages,
          the nearest stand-in for a FUSE reply that needs no FUSE server.

    python3 scripts/bench/cpu_floor.py [--dir /var/tmp] [--rounds 5] [--baseline 1.49]
"""
import argparse
import fcntl
import mmap
import os
import resource
import shutil
import socket
import statistics
import subprocess
import threading

F_SETPIPE_SZ = 1031
GIB = 1 << 30
MIB = 1 << 20


def child_cpu(fn):
    """Runs fn in a forked child; the child's user+system CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001 (the exit code says it failed)
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{fn.__name__} failed in its child")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def recv_pass(_dir):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def send():
        c = socket.create_connection(("127.0.0.1", port))
        buf = os.urandom(MIB)
        for _ in range(GIB // MIB):
            c.sendall(buf)
        c.close()

    t = threading.Thread(target=send)
    t.start()
    conn, _ = srv.accept()
    srv.close()

    def receive():
        buf = memoryview(bytearray(MIB))
        left = GIB
        while left:
            n = conn.recv_into(buf, min(MIB, left))
            if n == 0:
                raise RuntimeError("short stream")
            left -= n

    secs = child_cpu(receive)
    conn.close()
    t.join()
    return secs


def hash_pass(d):
    path = f"{d}/hash.bin"
    with open(path, "wb") as f:
        buf = os.urandom(MIB)
        for _ in range(GIB // MIB):
            f.write(buf)
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)  # hot

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["b3sum", "--num-threads", "1", path], stdout=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.unlink(path)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def stage_pass(d, direct=False):
    """1 GiB of 1 MiB pwrites into a new file: buffered (into fresh
    page-cache pages), or with `direct` as `serve --stage-fills-direct`
    writes them, O_DIRECT from one page-aligned buffer."""
    path = f"{d}/stage.bin"

    def write():
        buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT needs
        buf.write(os.urandom(MIB))
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags, 0o600)
        for i in range(GIB // MIB):
            os.pwrite(fd, buf, i * MIB)
        os.close(fd)

    secs = child_cpu(write)
    os.unlink(path)
    return secs


def stage_direct_pass(d):
    return stage_pass(d, direct=True)


def reply_pass(_dir):
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, MIB)
    drain = subprocess.Popen(["cat"], stdin=r, stdout=subprocess.DEVNULL)
    os.close(r)

    def write():
        buf = os.urandom(MIB)
        for _ in range(GIB // MIB):
            os.write(w, buf)

    secs = child_cpu(write)
    os.close(w)
    drain.wait()
    return secs


PASSES = [("recv", recv_pass), ("hash", hash_pass), ("stage", stage_pass), ("reply", reply_pass)]
# Not in the sum: the alternative to "stage" that the daemon now uses.
EXTRA = [("stage, O_DIRECT", stage_direct_pass)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp", help="where the stage and hash files go")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", type=float, default=None,
                    help="the baseline binary's own CPU-s per cold GiB, to print the target beside the floor")
    a = ap.parse_args()
    if shutil.which("b3sum") is None:
        raise SystemExit("cpu_floor: b3sum is not installed (apt-get install b3sum)")
    d = os.path.join(a.dir, f"cpu-floor-{os.getpid()}")
    os.makedirs(d)
    res = {name: [] for name, _ in PASSES + EXTRA}
    try:
        for r in range(a.rounds):
            every = PASSES + EXTRA
            order = every[r % len(every):] + every[:r % len(every)]
            for name, fn in order:
                res[name].append(fn(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"| pass | CPU-s per GiB, median (min–max), {a.rounds} rounds |")
    print("|---|---:|")
    total = 0.0
    for name, _ in PASSES:
        v = res[name]
        m = statistics.median(v)
        total += m
        print(f"| {name} | {m:.3f} ({min(v):.3f}–{max(v):.3f}) |")
    print(f"| **sum: the floor** | **{total:.3f}** |")
    for name, _ in EXTRA:
        v = res[name]
        m = statistics.median(v)
        print(f"| {name} (not in the sum) | {m:.3f} ({min(v):.3f}–{max(v):.3f}) |")
        print(f"| **sum with {name}** | **{total - statistics.median(res['stage']) + m:.3f}** |")
    if a.baseline:
        print(f"\nbaseline {a.baseline:.2f} CPU-s/GiB: target 0.6× = {0.6 * a.baseline:.2f}; "
              f"floor / baseline = {total / a.baseline:.2f}×")


if __name__ == "__main__":
    main()
