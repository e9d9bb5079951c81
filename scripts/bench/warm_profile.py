"""Where the warm gap goes: fio profiled on the staging file, the FUSE disk
and the `--fuse-passthrough` disk (the systems of `warm.py`'s section 1).

The daemon is not in the warm path (its CPU per GiB is 0.00 in section 1:
reads are hits in a page cache), so the difference to the staging file is
spent in the kernel, on fio's own syscalls. This script shows where:

  * 4 KiB random reads, hot, with io_uring at QD16 (section 1's job) and
    with plain `pread` at QD1 (psync): the ratio of each system to the
    staging file per engine, rounds interleaved, median (min-max);
  * `perf record -e cpu-clock -g` of fio (software clock: this VM has no
    PMU) in the last round: the share of fio's samples in the kernel
    functions that differ between the systems.

  python3 scripts/bench/warm_profile.py [--rounds N] [--json PATH]

Prints a Markdown section; writes nothing under docs/ by itself.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import run as B
import warm as W

MiB = B.MiB
SYSTEMS = ("staging", "recoverfs", "passthrough")
ENGINES = {"io_uring": ("io_uring", 16), "psync": ("psync", 1)}
# Kernel functions whose share differs between the systems (fio's samples).
SYMBOLS = {
    "page-cache lookup": ("filemap_get_read_batch", "xas_load"),
    "copy to user": ("_copy_to_iter",),
    "FUSE poll (io_uring)": ("fuse_file_poll",),
    "passthrough async context": ("backing_aio_put", "backing_aio_cleanup", "backing_file_read_iter"),
    "FUSE atime": ("fuse_invalidate_atime", "fuse_file_accessed"),
    "scheduling": ("finish_task_switch.isra.0", "schedule", "__schedule"),
}


def fio(path, engine, qd, runtime, out, perf_data=None):
    cmd = ["fio", "--name=j", f"--filename={path}", "--rw=randread", "--bs=4k", f"--iodepth={qd}",
           f"--ioengine={engine}", "--invalidate=0", "--time_based", f"--runtime={runtime}",
           "--output-format=json", f"--output={out}"]
    if perf_data:
        cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-g", "-o", perf_data, "--"] + cmd
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)["jobs"][0]["read"]["iops"]


def shares(perf_data):
    """Self-time share of each SYMBOLS group in fio's samples."""
    r = subprocess.run(["perf", "report", "-i", perf_data, "--no-children", "--sort", "sym", "--stdio",
                        "-q", "-g", "none"], capture_output=True, text=True, check=True)
    self_pct = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%"):
            self_pct[parts[-1]] = self_pct.get(parts[-1], 0) + float(parts[0][:-1])
    return {g: sum(self_pct.get(s, 0) for s in syms) for g, syms in SYMBOLS.items()}


def measure(work, rounds, runtime):
    res = {"rounds": rounds, "runtime_s": runtime, "iops": {e: {s: [] for s in SYSTEMS} for e in ENGINES},
           "shares": {}}
    image = B.make_image(os.path.join(work, "image.raw"), 1024 * MiB)
    with B.Scope(work, "warmprof") as s, B.DamonPaused() as damon:
        res["damon_paused"] = damon.paused
        repo = s.path("repo")
        B.backup(repo, "bench", image)
        rfs, disk = W.staged_daemon(s, repo, "recoverfs", [], res)
        pt, pt_disk = W.staged_daemon(s, repo, "recoverfs-pt", ["--fuse-passthrough"], res)
        paths = {"staging": rfs.data_file("bench"), "recoverfs": disk, "passthrough": pt_disk}
        pt_before = W.daemon_reads(pt)
        for rnd in range(rounds):
            order = SYSTEMS[rnd % 3:] + SYSTEMS[:rnd % 3]
            last = rnd == rounds - 1
            for e, (engine, qd) in ENGINES.items():
                for name in order:
                    W.read_all(paths[name])
                    data = s.path(f"{e}-{name}.perf") if last else None
                    iops = fio(paths[name], engine, qd, runtime, s.path(f"{e}-{name}-{rnd}.json"), data)
                    res["iops"][e][name].append(iops)
                    if data:
                        res["shares"].setdefault(e, {})[name] = shares(data)
                B.log(f"warm profile round {rnd + 1}: {e}: " +
                      ", ".join(f"{n} {res['iops'][e][n][-1]:.0f}" for n in SYSTEMS))
        res["pt_daemon_reads"] = W.daemon_reads(pt) - pt_before
    return res


def render(res):
    L = ["### Where the warm gap goes (`warm_profile.py`)\n",
         f"4 KiB random reads of the hot 1 GiB disk, {res['rounds']} interleaved rounds of {res['runtime_s']} s; "
         "IOPS as a share of the staging file's in the same round, median (min–max). The passthrough daemon saw "
         f"{res['pt_daemon_reads']} reads (0: passthrough applied throughout).\n",
         "| engine | recoverfs FUSE / staging | passthrough / staging | staging IOPS |", "|---|---:|---:|---:|"]
    for e, per in res["iops"].items():
        def rel(n):
            r = [a / b for a, b in zip(per[n], per["staging"]) if b]
            return B.fmt_spread({"median": sorted(r)[len(r) // 2], "min": min(r), "max": max(r), "n": len(r)}, 3)
        L.append(f"| {e} (QD{ENGINES[e][1]}) | {rel('recoverfs')} | {rel('passthrough')} | "
                 f"{B.fmt_spread(B.spread(per['staging']))} |")
    L.append("\nShare of fio's CPU samples (kernel self time, last round; `perf record -e cpu-clock`):\n")
    L.append("| engine | function group | " + " | ".join(SYSTEMS) + " |")
    L.append("|---|---|" + "---:|" * len(SYSTEMS))
    for e, per in res["shares"].items():
        for g in SYMBOLS:
            L.append(f"| {e} | {g} ({', '.join('`' + s + '`' for s in SYMBOLS[g])}) | " +
                     " | ".join(f"{per[n][g]:.1f}%" for n in SYSTEMS) + " |")
    L.append("")
    return L


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--json", help="also write the raw figures here")
    a = ap.parse_args()
    if not os.path.exists(B.BIN):
        sys.exit(f"{B.BIN} not found: run `cargo build --release` first")
    if not shutil.which("perf"):
        sys.exit("perf not found: apt-get install -y linux-perf")
    B.SOCK_DIR = tempfile.mkdtemp(prefix="rfsp-", dir="/tmp")
    B.REMOVE_SCOPES = True
    work = tempfile.mkdtemp(prefix="recoverfs-warmprof-", dir="/var/tmp")
    load_start = B.loadavg()
    try:
        res = measure(work, a.rounds, a.runtime)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(B.SOCK_DIR, ignore_errors=True)
    res["loadavg"] = {"start": load_start, "end": B.loadavg()}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"Load average at start {load_start}, at end {res['loadavg']['end']} on {os.cpu_count()} CPUs.\n")
    print("\n".join(render(res)))


if __name__ == "__main__":
    main()
