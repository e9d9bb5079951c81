#!/usr/bin/env python3
"""Pre-copy between backups: does the load throttle protect the guest?

    python3 scripts/bench/precopy.py [--quick] [--rounds N] [--render-only]

One `tiny` VM runs its guest writer (a 512-byte write and a flush every
10 ms over a ring of sectors of its second disk) and has a 2 GiB data
disk of random bytes (the VM and writer of scripts/bench/vmbackup.py). In
each round, in rotating order, three arms of the same length:
* *alone*: the writer and nothing else;
* *throttled*: `recoverfs precopy --load-limit latency=L` into a fresh
  repository (one round: every disk read in full), L being 1.3 times the
  guest's mean I/O latency measured alone before the rounds;
* *unthrottled*: the same job without a load limit.
Reported, each against *alone* of the same round: the writer's write p99
while the job read (from QEMU's own write-latency histogram of the writer
disk, `block-latency-histogram-set`, sampled every 100 ms; the p99 is the
upper edge of its bin), and how long the round took throttled against
unthrottled (what the protection costs).

Writes docs/benchmarks-precopy.json and the "## Pre-copy throttle" section
of docs/benchmarks.md. Needs root, qemu-system-x86 and the tiny image.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402
import vmbackup as V  # noqa: E402

ROOT = B.ROOT
OUT_JSON = os.path.join(ROOT, "docs", "benchmarks-precopy.json")
HEAD = "\n## Pre-copy throttle\n"
ARMS = ["alone", "throttled", "unthrottled"]
# Large enough that an unthrottled first round reads for several seconds
# (a 160 MiB disk was read in 0.6 s: too few guest writes for a p99).
DATA_MIB = 2048


def mean_latency_ms(qmp_path, seconds):
    """The guest's mean I/O latency over `seconds` (what the throttle sees)."""
    q = V.Qmp(qmp_path)

    def totals():
        ops = ns = 0
        for d in q.cmd("query-blockstats"):
            s = d["stats"]
            ops += s["rd_operations"] + s["wr_operations"] + s["flush_operations"]
            ns += s["rd_total_time_ns"] + s["wr_total_time_ns"] + s["flush_total_time_ns"]
        return ops, ns

    a = totals()
    time.sleep(seconds)
    b = totals()
    q.close()
    return (b[1] - a[1]) / max(b[0] - a[0], 1) / 1e6


def arm_run(scope, vm, poller, arm, limit, secs, rnd):
    """One arm: the writer's p99 while it ran (ms, writes) and the job's
    round (none for `alone`)."""
    t0 = time.time()
    if arm == "alone":
        time.sleep(secs)
        time.sleep(0.3)
        p99, n = poller.p99_between(vm["name"], t0, time.time() - 0.3)
        return {"p99_ms": p99, "writes": n}
    repo, state = scope.path(f"repo-{arm}-{rnd}"), scope.path(f"state-{arm}-{rnd}")
    B.run([B.BIN, "init", "--repo", repo])
    args = [B.BIN, "precopy", "--repo", repo, "--vm", f"{vm['name']}={vm['qmp']}",
            "--state", state, "--every", "3600", "--until", f"+{secs}", "--json"]
    if arm == "throttled":
        args += ["--load-limit", f"latency={limit:.3f}"]
    r = B.run(args, timeout=secs + 600)
    rep = json.loads(r.stdout)
    rd = rep["rounds"][0]
    time.sleep(0.3)
    p99, n = poller.p99_between(vm["name"], t0, t0 + rd["ms"] / 1000.0)
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    return {"p99_ms": p99, "writes": n, "round_s": rd["ms"] / 1000.0,
            "held_s": rd["held_ms"] / 1000.0, "read_mib": rd["bytes_read"] / V.MiB}


def section(work, rounds_n, secs, tiny):
    with B.Scope(work, "precopy") as scope:
        vm = V.start_vm(scope, "w", 10, tiny, DATA_MIB)
        B.wait_for(lambda: os.path.exists(vm["console"]), 60, "the VM's console file")
        V.wait_writers([vm])
        poller = V.HistogramPoller([vm])
        poller.start()
        time.sleep(3)
        limit = 1.3 * mean_latency_ms(vm["qmp"], 5)
        B.log(f"load limit: latency {limit:.3f} ms")
        rounds = []
        try:
            for rnd in range(rounds_n):
                order = ARMS[rnd % 3:] + ARMS[:rnd % 3]
                this = {}
                for arm in order:
                    this[arm] = arm_run(scope, vm, poller, arm, limit, secs, rnd)
                    B.log(f"round {rnd + 1}/{rounds_n} {arm}: {this[arm]}")
                rounds.append(this)
        finally:
            poller.stop.set()
        return {"limit_ms": limit, "rounds": rounds}


def rows(res):
    r = res["rounds"]
    alone = [x["alone"]["p99_ms"] for x in r]
    out = []
    for arm in ("throttled", "unthrottled"):
        p = [x[arm]["p99_ms"] for x in r]
        out.append((f"guest write p99 during pre-copy, {arm}", f"{arm} / alone",
                    [a / b if a and b else None for a, b in zip(p, alone)], p, alone, "ms"))
    t = [x["throttled"]["round_s"] for x in r]
    u = [x["unthrottled"]["round_s"] for x in r]
    out.append(("round time (cut at the arm's end when throttled)", "throttled / unthrottled",
                [a / b for a, b in zip(t, u)], t, u, "s"))
    return out


def render(res):
    lines = [HEAD.strip(), "",
             f"Run {res['when']}{' (quick)' if res['quick'] else ''}: {len(res['section']['rounds'])} "
             f"rounds of {res['secs']} s arms in rotating order; load limit latency="
             f"{res['section']['limit_ms']:.3f} ms (1.3 × the guest's mean alone); median [min–max] "
             f"over rounds. Load average at start: {res['loadavg_start']}.", ""]
    if res.get("contended"):
        lines += [f"**Contended run**: {res['contended']}", ""]
    lines += ["| row | ratio | median [spread] | ours | baseline | why the baseline is fair |",
              "|---|---|---|---|---|---|"]
    fair = {"guest": "the same VM, writer, histogram and round; the writer alone in an arm of the same length",
            "round": "the same job reading the same disks into a fresh repository; only the load limit differs"}
    for name, what, r, ours, base, unit in rows(res):
        m, lo, hi = V.med_spread(r)
        mo, bo = V.med_spread(ours)[0], V.med_spread(base)[0]
        cell = f"{m:.2f} [{lo:.2f}–{hi:.2f}]" if m is not None else "n/a"
        fo = f"{mo:.2f} {unit}" if mo is not None else "n/a"
        fb = f"{bo:.2f} {unit}" if bo is not None else "n/a"
        f = next(v for k, v in fair.items() if name.startswith(k))
        lines.append(f"| {name} | {what} | {cell} | {fo} | {fb} | {f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--contended", help="say in the section that the machine was shared, and how")
    a = ap.parse_args()
    if a.render_only:
        B.replace_section(HEAD, render(json.load(open(OUT_JSON))))
        return
    if not os.path.exists(B.BIN):
        sys.exit(f"{B.BIN} not found: run `cargo build --release` first")
    rounds_n = a.rounds or (2 if a.quick else 5)
    secs = 12 if a.quick else 20
    tiny = subprocess.run([os.path.join(ROOT, "vm-images", "build.sh"), "tiny"], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    B.SOCK_DIR = tempfile.mkdtemp(prefix="/tmp/rfsp")
    work = tempfile.mkdtemp(prefix="recoverfs-precopy-", dir="/var/tmp")
    try:
        res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": a.quick,
               "secs": secs, "loadavg_start": B.loadavg(), "contended": a.contended}
        res["section"] = section(work, rounds_n, secs, tiny)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(B.SOCK_DIR, ignore_errors=True)
    res["rounds"] = res["section"]["rounds"]
    B.write_results(OUT_JSON, res, HEAD, render(res))


if __name__ == "__main__":
    main()
