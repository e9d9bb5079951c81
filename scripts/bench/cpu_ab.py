#!/usr/bin/env python3
"""CPU-seconds per cold GiB of recoverfs binaries, side by side (A/B).

The cold section's "seq" case alone (`cold.py`): one Garage, one latency
proxy at 20 ms in front of its S3 API, a random image with zero holes;
each binary serves a backup (`--no-profile`, `--fetch-workers 16`, fresh
staging per run), the page cache is dropped, and fio reads the FUSE disk
once in full (1 MiB, O_DIRECT, libaio QD16). The figure is the daemon's
own CPU (user + system, every thread, /proc/PID/stat) per GiB fio read.
Binaries are interleaved in every round (order rotated); median and
spread over rounds.

    python3 scripts/bench/cpu_ab.py --bin base=/path/a@old --bin new=/path/b \
        [--rounds 3] [--image-mib 2048] [--perf new] [--keep]

`NAME=PATH[@GROUP][,FLAG...]`: FLAGs are extra `serve` flags (e.g.
`--stage-fills-direct`); binaries of one GROUP (default: its name) read one
backup, written by the group's first binary (a binary reads its own
backup format: the baseline cannot read version-2 backups). `--perf NAME`
adds one extra run of that binary under `perf record -g` (cpu-clock) and
keeps perf.data in the work directory (printed).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402
import cold  # noqa: E402

GiB = 1 << 30


def minor_faults(pid):
    """The process's minor page faults so far (every thread): a fresh
    anonymous page the daemon touches is one."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def one(work, garage, port, name, path, prefix, runtime, perf=None, status=False, flags=()):
    with B.Scope(work, f"ab-{name}-{int(time.time() * 1000)}") as s:
        rfs, disk = cold.recoverfs_system(s, f"s3://{B.Garage.BUCKET}/{prefix}", garage.env(port),
                                          list(flags), False, path)
        B.drop_caches()
        prec = None
        if perf:
            prec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-o", perf,
                                     "-p", str(rfs.proc.pid)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(1)
        flt0 = minor_faults(rfs.proc.pid)
        m = B.Meter({"system": rfs.proc.pid}).start()
        r = B.fio_job(s.dir, "seq", disk, "read", "1M", cold.INFLIGHT, runtime, direct=1,
                      engine="libaio", time_based=False)
        r.update(m.stop())
        if prec:
            prec.send_signal(2)
            prec.wait(timeout=120)
        r["own_cpu_s_per_gib"] = r["cpu_s_by"]["system"] / (r["io_bytes"] / GiB)
        r["minflt_per_gib"] = (minor_faults(rfs.proc.pid) - flt0) / (r["io_bytes"] / GiB)
        if status:
            st = rfs.status("bench")["disks"][0]
            r["status"] = {k: st.get(k) for k in ("fetched_bytes", "reads", "read_hits")}
        return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", action="append", required=True, help="NAME=PATH[@GROUP][,FLAG...]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-mib", type=int, default=2048)
    ap.add_argument("--latency-ms", type=int, default=20)
    ap.add_argument("--runtime", type=int, default=60, help="cap of one pass, s")
    ap.add_argument("--perf", action="append", default=[], help="NAME to profile once")
    ap.add_argument("--json", default=None, help="write the raw runs here")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    bins, flags = [], {}
    for spec in a.bin:
        name, rest = spec.split("=", 1)
        rest, *fl = rest.split(",")
        path, _, group = rest.partition("@")
        flags[name] = fl
        bins.append((name, os.path.abspath(path), group or name))

    work = tempfile.mkdtemp(prefix="rfs-cpu-ab-", dir="/var/tmp")
    B.SOCK_DIR = tempfile.mkdtemp(prefix="rfsab-", dir="/tmp")
    B.REMOVE_SCOPES = not a.keep
    top = B.Scope(work, "top")
    res = {"runs": {n: [] for n, _, _ in bins}, "perf": {}}
    try:
        image = B.make_image(top.path("cold.raw"), a.image_mib * B.MiB)
        garage = B.Garage(top).start()
        done = set()
        for name, path, group in bins:
            if group in done:
                continue
            b = B.backup(f"s3://{B.Garage.BUCKET}/ab-{group}", "bench", image, env=garage.env(), bin=path)
            B.log(f"backup {group} by {name}: {b['seconds']:.0f}s")
            done.add(group)
        os.unlink(image)
        port = B.start_proxy(top, garage.s3_port, a.latency_ms, name="proxy-s3")
        for rnd in range(a.rounds):
            order = bins[rnd % len(bins):] + bins[:rnd % len(bins)]
            for name, path, group in order:
                r = one(work, garage, port, name, path, f"ab-{group}", a.runtime, flags=flags[name])
                res["runs"][name].append(r)
                B.log(f"round {rnd + 1} {name}: {r['mb_s']:.0f} MB/s, own {r['cpu_s_by']['system']:.2f}s "
                      f"= {r['own_cpu_s_per_gib']:.3f} CPU-s/GiB, {r['minflt_per_gib']:.0f} minor faults/GiB")
        for name in a.perf:
            path, group = next((p, g) for n, p, g in bins if n == name)
            out = os.path.join(work, f"perf-{name}.data")
            r = one(work, garage, port, name, path, f"ab-{group}", a.runtime, perf=out, status=True,
                    flags=flags[name])
            res["perf"][name] = {"data": out, "run": r}
            B.log(f"perf {name}: {out}: {r['mb_s']:.0f} MB/s, {r['own_cpu_s_per_gib']:.3f} CPU-s/GiB "
                  f"(under perf), status {r['status']}")
    finally:
        top.close()
        shutil.rmtree(B.SOCK_DIR, ignore_errors=True)
        if not a.keep and not a.perf:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| binary | own CPU-s / GiB, median (min–max) | MB/s, median | rounds |")
    print("|---|---:|---:|---:|")
    med = {}
    for name, _, _ in bins:
        v = [r["own_cpu_s_per_gib"] for r in res["runs"][name]]
        if not v:
            continue
        med[name] = statistics.median(v)
        mb = statistics.median(r["mb_s"] for r in res["runs"][name])
        print(f"| {name} | {med[name]:.3f} ({min(v):.3f}–{max(v):.3f}) | {mb:.0f} | {len(v)} |")
    first = bins[0][0]
    for name in med:
        if name != first and med.get(first):
            print(f"{name} / {first}: {med[name] / med[first]:.3f}×")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"work directory {work}")


if __name__ == "__main__":
    main()
