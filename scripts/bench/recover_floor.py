#!/usr/bin/env python3
"""What bounds "recover of 20 VMs at once ≤ 2× a lone VM's" on a file system.

A fresh `recover` is almost only file-system work: the strace of one shows
new directories, six small files written atomically (temporary file,
fsync, rename, directory fsync) and the disk's data file sized and synced,
then the repository pin. This probe replays that pattern without the
daemon, one session alone and 20 at once (a thread each, released
together), in three forms:

  today     the pattern a fresh recover makes (about 16 fsyncs)
  one-dir   the same files written straight into a hidden new directory,
            each fsynced, made visible by one rename: two directory
            fsyncs instead of one per file
  no-sync   the same directories and files with no sync at all: the floor
            of the work itself, which no durability scheme goes below
  shared    the same files, made durable by two syncfs(2) calls shared by
            every session waiting at that moment (leader/follower group
            commit): what sharing the syncs across concurrent recovers
            would give

Rounds interleave the forms and sizes; the table gives the median and
spread of the wall time and the 20-at-once / alone ratio.

    python3 scripts/bench/recover_floor.py [--dir /var/tmp] [--rounds 7]

Caveat for `shared`: syncfs flushes every dirty page of the file system,
not only the sessions' (in production: other VMs' unsynced guest writes),
and on ext4 without a journal it is not an ordered barrier for metadata
(the device flush can precede the last metadata writes), so it is a
measure of the bound, not a design.
"""
import argparse
import ctypes
import os
import shutil
import statistics
import threading
import time

LIBC = ctypes.CDLL(None, use_errno=True)
FILES = ["manifest.json", "disk0.present", "disk0.live", "disk0.changed", "session.json", "active"]


def dsync(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def put(path, sync):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"x" * 72)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def data_file(d, sync):
    fd = os.open(f"{d}/disk0.data", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 64 << 20)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def today(d, _group):
    os.mkdir(d)
    dsync(os.path.dirname(d))
    for n in FILES[:4]:
        put(f"{d}/.{n}.tmp", True)
        os.rename(f"{d}/.{n}.tmp", f"{d}/{n}")
        dsync(d)
    data_file(d, True)
    for n in FILES[4:]:
        put(f"{d}/.{n}.tmp", True)
        os.rename(f"{d}/.{n}.tmp", f"{d}/{n}")
        dsync(d)


def one_dir(d, _group):
    """Every file written (and fsynced) straight into a hidden new
    directory, which one rename makes visible: two directory fsyncs in
    all instead of one per file, and no per-file temporary and rename."""
    parent = os.path.dirname(d)
    tmp = f"{parent}/.new-{os.path.basename(d)}"
    os.mkdir(tmp)
    for n in FILES:
        put(f"{tmp}/{n}", True)
    data_file(tmp, True)
    dsync(tmp)
    os.rename(tmp, d)
    dsync(parent)


def no_sync(d, _group):
    os.mkdir(d)
    for n in FILES:
        put(f"{d}/{n}", False)
    data_file(d, False)


def shared(d, group):
    os.mkdir(d)
    for n in FILES[:4] + FILES[5:]:
        put(f"{d}/{n}", False)
    data_file(d, False)
    group.sync()
    put(f"{d}/.session.json.tmp", False)
    os.rename(f"{d}/.session.json.tmp", f"{d}/session.json")
    group.sync()


class Group:
    """Leader/follower: one syncfs covers every session that arrived
    before it started."""

    def __init__(self, fd):
        self.fd, self.cv = fd, threading.Condition()
        self.arrived = self.done = 0
        self.running = False

    def sync(self):
        with self.cv:
            self.arrived += 1
            ticket = self.arrived
            while self.done < ticket and self.running:
                self.cv.wait()
            if self.done >= ticket:
                return
            self.running, upto = True, self.arrived
        if LIBC.syncfs(self.fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
        with self.cv:
            self.done, self.running = upto, False
            self.cv.notify_all()


def run(base, form, n):
    root = os.path.join(base, f"{form.__name__}-{n}-{time.time_ns()}")
    os.makedirs(root)
    group = Group(os.open(root, os.O_RDONLY | os.O_DIRECTORY))
    gate = threading.Barrier(n + 1)
    errors = []

    def one(i):
        gate.wait()
        try:
            form(f"{root}/s{i}", group)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    os.close(group.fd)
    shutil.rmtree(root)
    if errors:
        raise errors[0]
    return secs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/var/tmp", help="file system to measure (a directory on it)")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    base = os.path.join(a.dir, f"recover-floor-{os.getpid()}")
    os.makedirs(base)
    res = {}
    try:
        for r in range(a.rounds):
            forms = [today, one_dir, no_sync, shared]
            forms = forms[r % 4:] + forms[:r % 4]
            for form in forms:
                for n in ((1, 20) if r % 2 == 0 else (20, 1)):
                    res.setdefault((form.__name__, n), []).append(run(base, form, n))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"| form | one alone ms | 20 at once ms | ratio |  ({a.rounds} rounds, median (min–max); {a.dir})")
    print("|---|---:|---:|---:|")
    for form in ("today", "one_dir", "no_sync", "shared"):
        one, many = res[(form, 1)], res[(form, 20)]
        m1, m20 = statistics.median(one), statistics.median(many)
        print(f"| {form} | {m1 * 1e3:.2f} ({min(one) * 1e3:.2f}–{max(one) * 1e3:.2f}) | "
              f"{m20 * 1e3:.2f} ({min(many) * 1e3:.2f}–{max(many) * 1e3:.2f}) | {m20 / m1:.1f}× |")


if __name__ == "__main__":
    main()
