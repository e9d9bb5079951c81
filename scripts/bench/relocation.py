#!/usr/bin/env python3
"""Relocation benchmark (part of `make bench`).

Measures, in one run on the same machine:
  * throughput, over --rounds rounds (median and spread): each round
    measures the baseline of issue 16, the repository read rate `recoverfs
    verify` achieves (every chunk read, decompressed and checked, on
    verify's worker threads, caches dropped first) and the target's write
    rate (dd, O_DIRECT, synced), and both run at once (the bound where
    repository and target share a device), then a cold relocation without a rate
    limit on a fresh daemon (caches dropped): disk bytes / wall time from
    the start request to the first status poll (every 10 ms) that shows the
    cutover done. A relocation does both to every byte, so the slower of
    the two bounds it; the ratio is per round (target >= 0.9). Plus the
    cutover pause;
  * the VM's read/write latency (fio 4 KiB random 70/30, QD1, O_DIRECT on
    the FUSE disk file) in alternating segments within ONE relocation:
    with the copy running (rate-limited so it spans every segment) and with
    it paused (`relocate --pause`), >= 5 pairs, the order within a pair
    alternating; the per-pair ratio of p99 (with / without), median and
    spread (goal: p99 at most 1.2x).

Appends a "Relocation" section to docs/benchmarks.md (unless
--no-section) and writes the raw figures to docs/benchmarks-relocation.json
(or --json PATH). Cleans up its mounts and processes.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402  (shared: replace_section)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target/release/recoverfs")


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def drop_caches():
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def api(sock, method, path, body=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    data = json.dumps(body).encode() if body is not None else b""
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        out, rest = b"", body
        while True:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return json.loads(body) if body else None


class Daemon:
    def __init__(self, work, repo, name):
        self.mount = os.path.join(work, f"mnt-{name}")
        self.staging = os.path.join(work, f"staging-{name}")
        self.sock = os.path.join(work, f"{name}.sock")
        os.makedirs(self.mount)
        self.log = open(os.path.join(work, f"{name}.log"), "w")
        self.p = subprocess.Popen([BIN, "serve", "--repo", repo, "--staging", self.staging, "--mount", self.mount,
                                   "--socket", self.sock], stderr=self.log, stdout=subprocess.DEVNULL)
        for _ in range(400):
            if os.path.exists(self.sock):
                return
            time.sleep(0.025)
        raise RuntimeError("daemon did not start")

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
        subprocess.run(["fusermount3", "-u", "-z", self.mount], capture_output=True)
        # A throwaway staging: left, its kept session would make the next
        # daemon on this repository refuse the VM as recovered elsewhere.
        shutil.rmtree(self.staging, ignore_errors=True)


def fio_latency(disk, seconds):
    out = sh("fio", "--name=vm", f"--filename={disk}", "--rw=randrw", "--rwmixread=70", "--bs=4k",
             "--ioengine=psync", "--iodepth=1", "--direct=1", "--time_based", f"--runtime={seconds}",
             "--output-format=json")
    job = json.loads(out.stdout)["jobs"][0]
    pct = lambda side, p: job[side]["clat_ns"]["percentile"].get(p, 0) / 1000.0
    return {
        "read_p50_us": pct("read", "50.000000"), "read_p99_us": pct("read", "99.000000"),
        "write_p50_us": pct("write", "50.000000"), "write_p99_us": pct("write", "99.000000"),
        "read_iops": job["read"]["iops"], "write_iops": job["write"]["iops"],
    }


def spread(xs):
    """Median, min and max of a list (None when empty)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fs_of(path):
    """The filesystem type and device a path lives on, for the report."""
    r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", path],
                       capture_output=True, text=True, check=True)
    fstype, *source = r.stdout.split("\n")[0].split()
    # A RAM file system's source is its type again ("tmpfs tmpfs").
    return " ".join([fstype] + [x for x in source if x != fstype])


def relocation_of(sock):
    return api(sock, "GET", "/sessions/vm")["relocation"]


def throughput_round(work, repo, primary, size_mib, k):
    """One round: verify and dd (the baseline), then a cold relocation."""
    r = {}
    drop_caches()
    t = time.monotonic()
    sh(BIN, "verify", "--repo", repo, "--vm", "vm")
    r["verify_mbps"] = size_mib * (1 << 20) / (time.monotonic() - t) / 1e6
    probe = os.path.join(primary, "probe")
    t = time.monotonic()
    sh("dd", "if=/dev/zero", f"of={probe}", "bs=1M", f"count={size_mib}", "oflag=direct", "conv=fsync")
    r["target_write_mbps"] = size_mib * (1 << 20) / (time.monotonic() - t) / 1e6
    os.unlink(probe)
    r["baseline_mbps"] = min(r["verify_mbps"], r["target_write_mbps"])
    # The same read and the same write at once: where the repository and
    # the target share a device (here one virtual disk), this, not the
    # slower of the two alone, is what a copy can reach.
    drop_caches()
    t = time.monotonic()
    both = [subprocess.Popen([BIN, "verify", "--repo", repo, "--vm", "vm"], stdout=subprocess.DEVNULL),
            subprocess.Popen(["dd", "if=/dev/zero", f"of={probe}", "bs=1M", f"count={size_mib}", "oflag=direct",
                              "conv=fsync"], stderr=subprocess.DEVNULL)]
    if any([p.wait() != 0 for p in both]):
        raise RuntimeError("verify or dd failed")
    r["concurrent_mbps"] = size_mib * (1 << 20) / (time.monotonic() - t) / 1e6
    os.unlink(probe)
    r["device_copy_mbps"] = device_copy(work, primary, size_mib)
    drop_caches()
    d = Daemon(work, repo, f"tput{k}")
    try:
        api(d.sock, "POST", "/sessions", {"vm": "vm"})
        t = time.monotonic()
        api(d.sock, "POST", "/sessions/vm/relocate", {"to": primary})
        while True:
            st = relocation_of(d.sock)
            if st["state"] == "done":
                break
            if st["state"] == "failed":
                raise RuntimeError(f"relocation failed: {st}")
            time.sleep(0.01)
        r["relocate_s"] = time.monotonic() - t
        r["copy_seconds"] = st["copy_seconds"]
        r["relocate_mbps"] = size_mib * (1 << 20) / r["relocate_s"] / 1e6
        r["ratio"] = r["relocate_mbps"] / r["baseline_mbps"]
        r["ratio_of_concurrent"] = r["relocate_mbps"] / r["concurrent_mbps"]
        r["ratio_of_device_copy"] = r["relocate_mbps"] / r["device_copy_mbps"]
        r["cutover_pause_ms"] = st["cutover_pause_ms"]
        api(d.sock, "DELETE", "/sessions/vm?discard=true")
    finally:
        d.stop()
    shutil.rmtree(os.path.join(primary, "vm"), ignore_errors=True)
    return r


def device_copy(work, primary, size_mib):
    """The devices' own copy rate without the page cache (a reference for
    a copy between these two filesystems, not a ceiling: buffered I/O may
    beat it): fio reads a file of the disk's size on the repository's
    filesystem and writes one on the target's at once, each 1 MiB requests,
    16 in flight, O_DIRECT (no CPU spent on caching), caches dropped;
    bytes / the slower job's runtime. Where both are one device, reading
    and writing share it: this, not either alone, is what it gives."""
    src, dst = os.path.join(work, "device-read"), os.path.join(primary, "device-write")
    drop_caches()
    out = sh("fio", "--output-format=json", "--ioengine=libaio", "--direct=1", "--bs=1M", "--iodepth=16",
             f"--size={size_mib}M", "--name=read", f"--filename={src}", "--rw=read",
             "--name=write", f"--filename={dst}", "--rw=write", "--end_fsync=1")
    os.unlink(dst)
    ms = max(j["job_runtime"] for j in json.loads(out.stdout)["jobs"])
    return size_mib * (1 << 20) / (ms / 1000) / 1e6


def latency_segments(work, repo, primary, size_mib, pairs, seg_s, rate):
    """Alternating segments with and without (paused) relocation, all
    within one relocation."""
    d = Daemon(work, repo, "lat")
    try:
        disk = api(d.sock, "POST", "/sessions", {"vm": "vm"})["disks"][0]
        sh("dd", f"if={disk}", "of=/dev/null", "bs=1M")  # stage every block
        api(d.sock, "POST", "/sessions/vm/relocate", {"to": primary, "rate_mbps": rate, "force": True})
        st = api(d.sock, "POST", "/sessions/vm/relocate/pause")
        assert st["state"] == "paused", st
        out = []
        for k in range(pairs):
            pair = {}
            # Alternate which comes first, so a drift over the run (page
            # cache, the target filling) does not favour one side.
            for side in (("without", "with") if k % 2 == 0 else ("with", "without")):
                verb = "resume" if side == "with" else "pause"
                t = time.monotonic()
                st = api(d.sock, "POST", f"/sessions/vm/relocate/{verb}")
                pair[f"{verb}_ms"] = (time.monotonic() - t) * 1000
                pair[side] = fio_latency(disk, seg_s)
                st = relocation_of(d.sock)
                pair[f"{side}_state_after"] = st["state"]
                pair[f"{side}_bytes_done_after"] = st["bytes_done"]
            # Valid only if the copy ran through the whole "with" segment.
            pair["valid"] = pair["with_state_after"] in ("copying", "converging", "not-converging")
            for key in ("read_p99_us", "write_p99_us", "read_p50_us", "write_p50_us"):
                wo = pair["without"][key]
                pair[f"ratio_{key}"] = pair["with"][key] / wo if wo else None
            out.append(pair)
        return out, relocation_of(d.sock)
    finally:
        d.stop()


def fmt(s, digits=2):
    if s["median"] is None:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f}, n={s['n']})"


def main():
    ap = argparse.ArgumentParser(
        description="Relocation throughput as a share of min(verify's repository read rate, target write rate), "
                    "and the VM's latency in alternating segments with and without (paused) relocation; writes "
                    "docs/benchmarks.md's Relocation section and the raw figures as JSON. Needs root (drops caches).")
    ap.add_argument("--quick", action="store_true", help="a 256 MiB disk, 3 rounds, 5 pairs of 2 s segments")
    ap.add_argument("--size-mib", type=int, default=0, help="disk size in MiB (default 1024, 256 with --quick)")
    ap.add_argument("--rounds", type=int, default=0, help="throughput rounds (default 5, 3 with --quick)")
    ap.add_argument("--pairs", type=int, default=0, help="latency segment pairs (default 6, 5 with --quick)")
    ap.add_argument("--segment-s", type=int, default=0, help="seconds per latency segment (default 6, 2 with --quick)")
    ap.add_argument("--latency-rate", type=float, default=0,
                    help="relocation rate limit during the latency segments, MB/s (default: so it spans them)")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs/benchmarks-relocation.json"),
                    help="where to write the raw figures")
    ap.add_argument("--no-section", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--primary-dir", help="where the relocation target (primary storage) goes, e.g. another "
                                          "device than the repository's (default: beside the repository)")
    ap.add_argument("--separate-primary-dir",
                    help="a second target, on another device than the repository's (e.g. a tmpfs where the machine "
                         "has one disk): every round also relocates there, order alternating, and the section adds "
                         "its rows")
    a = ap.parse_args()
    size_mib = a.size_mib or (256 if a.quick else 1024)
    rounds = a.rounds or (3 if a.quick else 5)
    pairs = max(5, a.pairs or (5 if a.quick else 6))
    seg_s = a.segment_s or (2 if a.quick else 6)
    # The copy must outlast every "with" segment (and the time to pause).
    rate = a.latency_rate or max(1.0, size_mib * 1.048576 / (pairs * seg_s * 1.5))
    work = tempfile.mkdtemp(prefix="recoverfs-bench-reloc-", dir="/var/tmp")
    res = {"size_mib": size_mib, "rounds": [], "latency_rate_mbps": rate, "segment_s": seg_s}
    primary = primary2 = None
    try:
        img = os.path.join(work, "disk.raw")
        with open(img, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        repo = os.path.join(work, "repo")
        sh(BIN, "backup", "--repo", repo, "--vm", "vm", img)
        # Kept (on the repository's filesystem) for the device copy ceiling.
        os.rename(img, os.path.join(work, "device-read"))
        primary = tempfile.mkdtemp(prefix="recoverfs-bench-primary-", dir=a.primary_dir) if a.primary_dir \
            else os.path.join(work, "primary")
        os.makedirs(primary, exist_ok=True)
        res["repo_fs"], res["primary_fs"] = fs_of(repo), fs_of(primary)
        if a.separate_primary_dir:
            primary2 = tempfile.mkdtemp(prefix="recoverfs-bench-primary-", dir=a.separate_primary_dir)
            res["separate_primary_fs"] = fs_of(primary2)
            res["rounds_separate"] = []
        for k in range(rounds):
            # The two targets' relocations alternate which goes first, so
            # a drift over the run favours neither.
            if primary2 and k % 2 == 1:
                res["rounds_separate"].append(throughput_round(work, repo, primary2, size_mib, f"s{k}"))
            r = throughput_round(work, repo, primary, size_mib, k)
            if primary2 and k % 2 == 0:
                res["rounds_separate"].append(throughput_round(work, repo, primary2, size_mib, f"s{k}"))
            if primary2:
                s2 = res["rounds_separate"][-1]
                print(f"round {k}, separate target: relocation {s2['relocate_mbps']:.0f} MB/s, verify "
                      f"{s2['verify_mbps']:.0f}, dd {s2['target_write_mbps']:.0f}: ratio {s2['ratio']:.2f}",
                      file=sys.stderr)
            print(f"round {k}: relocation {r['relocate_mbps']:.0f} MB/s, verify {r['verify_mbps']:.0f}, "
                  f"dd {r['target_write_mbps']:.0f}, both at once {r['concurrent_mbps']:.0f}: ratio {r['ratio']:.2f}, "
                  f"of both at once {r['ratio_of_concurrent']:.2f}, device copy (fio) {r['device_copy_mbps']:.0f}: "
                  f"of it {r['ratio_of_device_copy']:.2f}", file=sys.stderr)
            res["rounds"].append(r)
        res["segments"], res["relocation_after_segments"] = latency_segments(
            work, repo, primary, size_mib, pairs, seg_s, rate)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if primary and a.primary_dir:
            shutil.rmtree(primary, ignore_errors=True)
        if primary2:
            shutil.rmtree(primary2, ignore_errors=True)

    R = res["rounds"]
    res["ratio"] = spread([r["ratio"] for r in R])
    res["ratio_of_concurrent"] = spread([r["ratio_of_concurrent"] for r in R])
    res["ratio_of_device_copy"] = spread([r["ratio_of_device_copy"] for r in R])
    for k in ("relocate_mbps", "verify_mbps", "target_write_mbps", "baseline_mbps", "concurrent_mbps", "device_copy_mbps",
              "cutover_pause_ms"):
        res[k] = spread([r[k] for r in R])
    separate_rows = separate_text = ""
    if primary2:
        S = res["rounds_separate"]
        sep = res["separate"] = {k: spread([r[k] for r in S])
                                 for k in ("ratio", "ratio_of_concurrent", "relocate_mbps", "verify_mbps",
                                           "target_write_mbps", "concurrent_mbps")}
        separate_rows = (
            f"| relocation throughput, target on another device ({res['separate_primary_fs']}), same rounds "
            f"| {fmt(sep['relocate_mbps'], 0)} MB/s | min(`verify` repository read {fmt(sep['verify_mbps'], 0)}, "
            f"target write {fmt(sep['target_write_mbps'], 0)}) MB/s | {fmt(sep['ratio'])} (target ≥ 0.90) |\n"
            f"| the same, against `verify` and the target write run at once | | "
            f"{fmt(sep['concurrent_mbps'], 0)} MB/s (both done) | {fmt(sep['ratio_of_concurrent'])} |\n")
        separate_text = (
            f"\nThe rows \"target on another device\" relocate the same backup, in the same rounds (which of "
            f"the two targets goes first alternating), to {res['separate_primary_fs']}: this machine has one "
            f"disk, so a RAM file system stands in for primary storage on a device of its own. The repository's "
            f"device then serves reads only, as it does where primary storage is another array, and the ratio "
            f"is the copier's own overhead against `verify` without the two competing for one device. A ratio "
            f"above 1 says the copier, with many reads in flight, read the repository faster than `verify`'s "
            f"threads did.\n")
    valid = [p for p in res["segments"] if p["valid"]]
    for k in ("read_p99_us", "write_p99_us", "read_p50_us", "write_p50_us"):
        res[f"pair_ratio_{k}"] = spread([p[f"ratio_{k}"] for p in valid])
        res[f"with_{k}"] = spread([p["with"][k] for p in valid])
        res[f"without_{k}"] = spread([p["without"][k] for p in valid])
    res["pause_ms"] = spread([p["pause_ms"] for p in res["segments"]])
    res["valid_pairs"] = len(valid)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=2)
    # The copier raises its own limit (up to 4x what was asked) while the
    # guest re-dirties blocks as fast as it copies: say what it ran at.
    final_limit = (res["relocation_after_segments"] or {}).get("rate_limit_mbps")
    raised = (f" (the copier raised its limit to {final_limit:.1f} MB/s, as it does up to 4x when the guest's "
              "writes re-dirty blocks as fast as it copies)") if final_limit and final_limit > rate * 1.01 else ""
    md = f"""
## Relocation

Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on a 2-core machine (load average at the end
{', '.join(f'{x:.1f}' for x in os.getloadavg())}); ratios are within this run.
A {size_mib} MiB disk of random data, recovered from a local repository on {res['repo_fs']}; the target on
{res['primary_fs']}. Median (min–max, n).

| figure | value | baseline (same round) | ratio |
|---|---|---|---|
| relocation throughput, cold, no rate limit ({rounds} rounds) | {fmt(res['relocate_mbps'], 0)} MB/s | min(`verify` repository read {fmt(res['verify_mbps'], 0)}, target write {fmt(res['target_write_mbps'], 0)}) MB/s | {fmt(res['ratio'])} (target ≥ 0.90) |
| the same, against `verify` and the target write run at once | | {fmt(res['concurrent_mbps'], 0)} MB/s (both done) | {fmt(res['ratio_of_concurrent'])} |
| the same, against the devices' own copy rate (fio read + write at once, QD16 each, O_DIRECT) | | {fmt(res['device_copy_mbps'], 0)} MB/s (both done) | {fmt(res['ratio_of_device_copy'])} |
{separate_rows}| cutover pause (longest write stall) | {fmt(res['cutover_pause_ms'], 1)} ms | | |
| VM read p99 (fio 4K randrw 70/30 QD1 O_DIRECT), per pair | {fmt(res['with_read_p99_us'], 0)} µs with | {fmt(res['without_read_p99_us'], 0)} µs paused | {fmt(res['pair_ratio_read_p99_us'])} |
| VM write p99, per pair | {fmt(res['with_write_p99_us'], 0)} µs with | {fmt(res['without_write_p99_us'], 0)} µs paused | {fmt(res['pair_ratio_write_p99_us'])} |
| VM read p50, per pair | | | {fmt(res['pair_ratio_read_p50_us'])} |
| VM write p50, per pair | | | {fmt(res['pair_ratio_write_p50_us'])} |
| `relocate --pause` (API call until the copier stopped) | {fmt(res['pause_ms'], 1)} ms | | |

Why this baseline: a relocation must read every chunk from the repository, decompress and check it, and
write it to the target; `recoverfs verify` does the first part with its own parallelism on the same
repository (caches dropped), and dd the second on the same target filesystem, in the same round, so neither
side is given a faster disk or a warmer cache than the relocation had. The slower of the two bounds a
relocation, which does both to every byte, as far as dd's O_DIRECT rate is what the target gives (a ratio
above 1 says buffered writes got more); 0.90 of it means the copier's own overhead (fetch engine, fsync batches, the copied map) costs ≤ 10 %.
Where the repository and the target share one device, reading and writing compete for it, so the second row
runs `verify` and the dd write at the same time (the same bytes read and written as the relocation): its
ratio is the copier's overhead on this machine, the first row's the target of issue 16. The third
row is fio reading and writing at once on these two filesystems (16 requests of 1 MiB in flight each way,
O_DIRECT): what the devices give a copy that bypasses the page cache. It is a reference, not a ceiling: a
ratio above 1 there means the relocation's buffered I/O got more from this device than O_DIRECT did.
{separate_text}
Latency: {len(res['segments'])} pairs of {seg_s} s segments ({res['valid_pairs']} valid: the copy still running at the
end of the "with" segment) within one relocation started at {rate:.1f} MB/s so that it spans them all{raised}, alternating
running and paused (`relocate --pause` / `--resume`), the order within a pair alternating. The ratio is
p99 with / p99 paused of the same pair. Goal: at most 1.2x. Raw figures: `{os.path.relpath(a.json, ROOT)}`.
"""
    if not a.no_section:
        B.replace_section("\n## Relocation\n", md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
