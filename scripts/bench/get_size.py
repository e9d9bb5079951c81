#!/usr/bin/env python3
"""Does a larger repository object pay on this store? The raw-GET ceiling by
GET size (issue 16, "Large repository objects").

The cold section's sequential bound is the store's own throughput with 16
ranged 1 MiB GETs in flight (one 1 MiB chunk per GET). Packing adjacent
chunks into larger objects, or reading several adjacent chunks with one
ranged GET, raises the bytes per request; it pays only if the store then
delivers more bytes per second at the same requests in flight. This
measures exactly that, with nothing of recoverfs in the path: one Garage,
one `scripts/latency-proxy.py` at the cold section's latency in front of its
web endpoint (as every system of section 2 reads it), a random image
uploaded as one object, and `curl --parallel` keeping 16 ranged GETs of
SIZE bytes in flight at SIZE-aligned offsets (1 GiB per run). Sizes are
interleaved in every round (order rotated); median (min-max) over rounds;
the page cache is dropped before every run. The CPU of Garage and of the
proxy per GiB is beside each figure (from /proc/PID/stat).

With `--recoverfs`, the same run also reads the image end to end through
recoverfs, as section 2's sequential row does (FUSE, fio 1 MiB O_DIRECT
QD16, `--no-profile`, `--fetch-workers 16`, fresh staging, its own proxy
on the S3 API at the same latency), from two backups of it in the same
bucket: 1 MiB chunks (the default) and 4 MiB chunks. A larger chunk is
one larger object per GET today, so the pair shows what larger objects
would give recoverfs itself, with nothing else changed.

    python3 scripts/bench/get_size.py [--rounds 5] [--latency-ms 20] [--image-mib 2048] [--recoverfs]

Writes docs/benchmarks-get-size.json and prints the tables.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402
import cold  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
INFLIGHT = cold.INFLIGHT  # the same 16 GETs in flight as section 2
SIZES = (1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB)
CHUNKS = ("1M", "4M")
KEY = "raw-get-size.img"


def ranged_gets(workdir, url, image_bytes, length, total=GiB):
    """`total` bytes as ranged GETs of `length` at `length`-aligned offsets
    spread over the image, 16 in flight (section 2's ceiling, at another
    size). MB/s, GETs/s, seconds, bytes."""
    n = max(total // length, INFLIGHT)
    r = cold.raw_get_ceiling(workdir, url, image_bytes, n, length=length, align=length)
    return {"mb_s": r["mb_s"], "gets_per_s": r["requests_per_s"], "seconds": r["seconds"],
            "bytes": n * length}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--image-mib", type=int, default=2048)
    ap.add_argument("--recoverfs", action="store_true",
                    help="also read 1 MiB- and 4 MiB-chunk backups through recoverfs (release build)")
    ap.add_argument("--out", default=os.path.join(B.ROOT, "docs", "benchmarks-get-size.json"))
    a = ap.parse_args()
    B.SOCK_DIR = tempfile.mkdtemp(prefix="rfsg-", dir="/tmp")
    B.REMOVE_SCOPES = True
    work = tempfile.mkdtemp(prefix="recoverfs-getsize-", dir="/var/tmp")
    rev = B.run(["git", "-C", B.ROOT, "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    res = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": a.rounds,
           "latency_ms": a.latency_ms, "inflight": INFLIGHT, "image_mib": a.image_mib,
           "git": rev, "load_start": B.loadavg(), "runs": {str(s): [] for s in SIZES},
           "recoverfs": {c: [] for c in CHUNKS} if a.recoverfs else None}
    try:
        measure(work, a, res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(B.SOCK_DIR, ignore_errors=True)
    res["load_end"] = B.loadavg()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"load average at start {res['load_start']}, at end {res['load_end']}")
    base = B.spread([r["mb_s"] for r in res["runs"][str(MiB)]])["median"]
    print("| GET size | MB/s | GETs/s | vs 1 MiB | Garage CPU-s/GiB | proxy CPU-s/GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for length in SIZES:
        rs = res["runs"][str(length)]
        mb = B.spread([r["mb_s"] for r in rs])
        print(f"| {length >> 20} MiB | {B.fmt_spread(mb)} | "
              f"{B.fmt_spread(B.spread([r['gets_per_s'] for r in rs]))} | {mb['median'] / base:.2f}× | "
              f"{B.fmt_spread(B.spread([r['cpu_s_per_gib']['garage'] for r in rs]), 2)} | "
              f"{B.fmt_spread(B.spread([r['cpu_s_per_gib']['proxy'] for r in rs]), 2)} |")
    if a.recoverfs:
        base = B.spread([r["mb_s"] for r in res["recoverfs"]["1M"]])["median"]
        print("\n| recoverfs backup | MB/s | vs 1 MiB chunks | daemon CPU-s/GiB | Garage CPU-s/GiB | proxy CPU-s/GiB |")
        print("|---|---:|---:|---:|---:|---:|")
        for c in CHUNKS:
            rs = res["recoverfs"][c]
            mb = B.spread([r["mb_s"] for r in rs])
            by = lambda k: B.fmt_spread(B.spread([r["cpu_s_by"][k] * GiB / r["io_bytes"] for r in rs]), 2)
            print(f"| {c}iB chunks | {B.fmt_spread(mb)} | {mb['median'] / base:.2f}× | {by('system')} | "
                  f"{by('garage')} | {by('proxy')} |")
    print(f"raw figures: {a.out}")


def read_through_recoverfs(s, garage, proxy, chunk):
    """One full sequential read of the `chunk`-chunk backup through a fresh
    recoverfs FUSE disk, as section 2's sequential row reads it."""
    rfs, disk = cold.recoverfs_system(s, f"s3://{B.Garage.BUCKET}/getsize-{chunk}", garage.env(proxy["port"]),
                                      [], False)
    B.drop_caches()
    m = B.Meter({"system": rfs.proc.pid, "garage": garage.proc.pid, "proxy": proxy["pid"]}).start()
    r = cold.fio_case(s, "seq", disk, 0, 60, fuse=True)
    r.update(m.stop())
    return r


def measure(work, a, res):
    with B.Scope(work, "getsize") as s:
        garage = B.Garage(s).start()
        image = B.make_image(s.path("image.raw"), a.image_mib * MiB)
        garage.put_file(KEY, image)
        port = B.start_proxy(s, garage.web_port, a.latency_ms, name="proxy-web")
        proxy_pid = s.procs[-1].pid
        url = garage.web_url(port, KEY)
        if a.recoverfs:
            for c in CHUNKS:
                B.backup(f"s3://{B.Garage.BUCKET}/getsize-{c}", "bench", image, env=garage.env(), chunk=c)
            s3 = {"port": B.start_proxy(s, garage.s3_port, a.latency_ms, name="proxy-s3")}
            s3["pid"] = s.procs[-1].pid
        for rnd in range(a.rounds):
            if a.recoverfs:
                for c in CHUNKS[rnd % 2:] + CHUNKS[:rnd % 2]:
                    with B.Scope(work, f"rfs-{c}-{rnd}") as rs:
                        r = read_through_recoverfs(rs, garage, s3, c)
                    res["recoverfs"][c].append(r)
                    B.log(f"round {rnd + 1} recoverfs {c} chunks: {r['mb_s']:.0f} MB/s, daemon cpu/GiB "
                          f"{r['cpu_s_by']['system'] * GiB / r['io_bytes']:.2f}")
            order = SIZES[rnd % len(SIZES):] + SIZES[:rnd % len(SIZES)]
            for length in order:
                B.drop_caches()
                m = B.Meter({"garage": garage.proc.pid, "proxy": proxy_pid}).start()
                r = ranged_gets(s.dir, url, a.image_mib * MiB, length)
                cpu = m.stop()["cpu_s_by"]
                gib = r["bytes"] / GiB
                r["cpu_s_per_gib"] = {k: v / gib for k, v in cpu.items()}
                res["runs"][str(length)].append(r)
                B.log(f"round {rnd + 1} {length >> 20} MiB: {r['mb_s']:.0f} MB/s, "
                      f"{r['gets_per_s']:.0f} GETs/s, cpu/GiB garage {r['cpu_s_per_gib']['garage']:.2f} "
                      f"proxy {r['cpu_s_per_gib']['proxy']:.2f}")


if __name__ == "__main__":
    main()
