#!/usr/bin/env python3
"""What a staging fill costs by how it is written (stop 43).

The cold read's staging write is 1 MiB buffered pwrites of fetched chunks
into a sparse staging file, from the fetch engine's CPU threads. This
probe writes 1 GiB that way into a sparse 2 GiB file in DIR (page cache,
the same filesystem as staging) and prints the writer's own CPU-seconds
(user + system, getrusage) and the whole machine's busy CPU-seconds with
the writeback counted (the file is fsynced inside that window), for:

  1 thread                  one writer
  2 threads                 two writers at once (the inode lock contended)
  2 threads, one at a time  two writers that take a user-space lock first
  1 thread, allocated       fallocate(KEEP_SIZE) of each 1 MiB, then write
  2 threads, lock+allocate  what `OsFile::fill_buffered` does

Median (min-max) over rounds, variants interleaved.

    python3 scripts/bench/fill_write.py [--dir DIR] [--rounds 5]
"""
import argparse
import mmap
import os
import resource
import statistics
import threading

MIB = 1 << 20
GIB = 1 << 30


def busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def one(d, threads, lock, allocate):
    path = os.path.join(d, "fill-write.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, 2 * GIB)
        os.sync()
        buf = mmap.mmap(-1, MIB)
        buf.write(os.urandom(MIB))
        gate = threading.Lock() if lock else None
        r0, s0 = resource.getrusage(resource.RUSAGE_SELF), busy_seconds()

        def work(k):
            for i in range(k, GIB // MIB, threads):
                if gate:
                    gate.acquire()
                if allocate:
                    os.posix_fallocate(fd, i * MIB, MIB)
                os.pwrite(fd, buf, i * MIB)
                if gate:
                    gate.release()

        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        own = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        os.fsync(fd)
        return own, busy_seconds() - s0
    finally:
        os.close(fd)
        os.unlink(path)


VARIANTS = [
    ("1 thread", 1, False, False),
    ("2 threads", 2, False, False),
    ("2 threads, one at a time", 2, True, False),
    ("1 thread, allocated", 1, False, True),
    ("2 threads, lock+allocate", 2, True, True),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    res = {v[0]: ([], []) for v in VARIANTS}
    for r in range(a.rounds):
        for name, threads, lock, allocate in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            own, total = one(a.dir, threads, lock, allocate)
            res[name][0].append(own)
            res[name][1].append(total)
    fmt = lambda xs: f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"  # noqa: E731
    print("| 1 GiB of 1 MiB buffered fills | writer's CPU-s | machine's CPU-s, writeback counted |")
    print("|---|---:|---:|")
    for name, *_ in VARIANTS:
        print(f"| {name} | {fmt(res[name][0])} | {fmt(res[name][1])} |")


if __name__ == "__main__":
    main()
