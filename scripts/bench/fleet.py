"""Fleet section of scripts/bench/run.py: 20 VMs at once against one.

One daemon, 20 VMs each backed up from its own random image (no chunk is
shared, so no VM's fetch serves another's).  The repository is a local
directory behind `serve --repo-delay-ms 20`: every chunk read waits 20 ms,
so what is measured is the daemon's scheduling of many VMs' misses, not
Garage's CPU on this 2-core machine.

  recover   wall time of `recover` for one VM alone, vs. the time until the
            last of 20 concurrent `recover` calls has returned (the disks
            are visible when `recover` returns)
  reading   each VM reads first touches (4 KiB at random 1 MiB-aligned
            offsets, QD1, O_DIRECT); its read p99 as fio sees it (every
            read a miss), alone vs. all 20 at once, each in a fresh daemon
            and staging (the daemon's latency histogram is daemon-wide)
Rounds alternate lone and fleet runs; the report gives medians and spread.
"""
import json
import os
import subprocess
import time

import run as B

MiB = B.MiB
VMS = 20
DELAY_MS = 20


def vm(i):
    return f"vm{i:02d}"


def recover_many(rfs, names):
    """Starts `recover` for every name at once; seconds until the last
    returned, and each disk path."""
    t = time.monotonic()
    procs = [(n, subprocess.Popen([rfs.bin, "recover", "--socket", rfs.socket, n], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)) for n in names]
    disks = {}
    for n, p in procs:
        out, err = p.communicate(timeout=300)
        paths = [line.strip() for line in out.splitlines() if line.startswith("/")]
        if p.returncode != 0 or not paths:
            raise RuntimeError(f"recover {n}: rc {p.returncode}: {err.strip()[-300:]}")
        disks[n] = paths[0]
    return time.monotonic() - t, disks


def read_first_touches(outdir, disks, reads):
    """One fio per disk, all started together; each VM's read latency p99
    (ms) as its guest sees it (fio's completion latency)."""
    procs = {}
    for n, d in disks.items():
        out = os.path.join(outdir, f"fio-{n}.json")
        procs[n] = (out, subprocess.Popen(
            ["fio", f"--name={n}", f"--filename={d}", "--readonly", "--rw=randread", "--bs=4k", "--direct=1",
             "--ioengine=psync", "--blockalign=1M", "--norandommap", f"--number_ios={reads}",
             "--output-format=json", f"--output={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    p99 = {}
    for n, (out, p) in procs.items():
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"fio on {n}: {err.decode(errors='replace').strip()[-300:]}")
        with open(out) as f:
            rd = json.load(f)["jobs"][0]["read"]
        p99[n] = rd["clat_ns"]["percentile"]["99.000000"] / 1e6
    return p99


def one(cfg, work, repo, names, label):
    with B.Scope(work, f"fleet-{label}") as s:
        rfs = B.Recoverfs(s, repo, args=["--no-profile", "--repo-delay-ms", str(DELAY_MS)]).start()
        secs, disks = recover_many(rfs, names)
        B.drop_caches()
        p99 = read_first_touches(s.dir, disks, cfg.fleet_reads)
        # The daemon's scheduler (and its latency histogram) is shared by
        # all sessions: a daemon-wide figure, for reference.
        daemon = rfs.status(names[0]).get("scheduler", {}).get("on_demand_latency_p99_ms")
        return {"recover_s": secs, "on_demand_p99_ms": p99, "daemon_on_demand_p99_ms": daemon}


def section_fleet(cfg, work):
    res = {"vms": VMS, "delay_ms": DELAY_MS, "image_bytes": cfg.fleet_image_bytes, "reads": cfg.fleet_reads,
           "lone": [], "fleet": [], "errors": []}
    with B.Scope(work, "fleet-top") as top:
        repo = top.path("repo")
        for i in range(VMS):
            img = B.make_image(top.path("img.raw"), cfg.fleet_image_bytes)
            B.backup(repo, vm(i), img)
            os.unlink(img)
        B.log(f"fleet: {VMS} backups done")
        names = [vm(i) for i in range(VMS)]
        for rnd in range(cfg.fleet_rounds):
            for label, which in (("lone", names[rnd % VMS:rnd % VMS + 1]), ("fleet", names)):
                try:
                    r = one(cfg, work, repo, which, label)
                    res[label].append(r)
                    B.log(f"fleet round {rnd + 1} {label}: recover {r['recover_s']:.2f}s, on-demand p99 max "
                          f"{max(v or 0 for v in r['on_demand_p99_ms'].values()):.1f} ms")
                except Exception as e:
                    res["errors"].append(f"{label}: {str(e)[:300]}")
                    B.log(f"fleet {label}: FAILED {e}")
    lone_p99 = B.spread([v for r in res["lone"] for v in r["on_demand_p99_ms"].values()])
    fleet_worst = B.spread([max(v or 0 for v in r["on_demand_p99_ms"].values()) for r in res["fleet"]])
    fleet_all = B.spread([v for r in res["fleet"] for v in r["on_demand_p99_ms"].values()])
    res["summary"] = {"lone_p99_ms": lone_p99, "fleet_worst_p99_ms": fleet_worst, "fleet_p99_ms": fleet_all,
                      "lone_recover_s": B.spread([r["recover_s"] for r in res["lone"]]),
                      "fleet_recover_s": B.spread([r["recover_s"] for r in res["fleet"]])}
    sm = res["summary"]
    if lone_p99 and fleet_worst and lone_p99["median"]:
        sm["p99_ratio"] = fleet_worst["median"] / lone_p99["median"]
    if sm["lone_recover_s"] and sm["fleet_recover_s"]:
        sm["recover_ratio"] = sm["fleet_recover_s"]["median"] / sm["lone_recover_s"]["median"]
    return res


def targets(f):
    out = []
    sm = f.get("summary", {})
    if sm.get("p99_ratio") is not None:
        out.append(f"| {VMS} VMs reading at once: each VM's on-demand p99 ≤ 2× a lone VM's | worst VM "
                   f"{sm['p99_ratio']:.2f}× | {'met' if sm['p99_ratio'] <= 2 else '**missed**'} |")
    if sm.get("recover_ratio") is not None:
        out.append(f"| recover of {VMS} VMs at once: last VM's disks visible ≤ 2× a lone VM's | "
                   f"{sm['recover_ratio']:.2f}× | {'met' if sm['recover_ratio'] <= 2 else '**missed**'} |")
    return out


def render(f):
    L = [f"## 5. {VMS} VMs at once\n"]
    if "error" in f:
        return L + [f"FAILED: {f['error']}\n"]
    L.append(
        f"One daemon (`--no-profile`), {VMS} VMs each backed up from its own {f['image_bytes'] // MiB} MiB random "
        f"image (no shared chunks), local repository behind `serve --repo-delay-ms {f['delay_ms']}`: the figures "
        "are the daemon's scheduling of many VMs, not the store's CPU. **Baseline: one VM alone in the same "
        "daemon configuration**, the issue's definition. Recover: wall time until `recover` returned (disks "
        f"visible) for one VM vs the last of {VMS} started at once. Reading: each VM's fio reads "
        f"{f['reads']} first touches (4 KiB at random 1 MiB-aligned offsets, QD1, O_DIRECT), all VMs at once; "
        "each VM's on-demand p99 is its fio's read latency p99 (every read is a miss but for the few repeats "
        "fio's `blockalign` allows); the daemon's own histogram is shared by all sessions, so it is not per VM. "
        "Lone and fleet runs "
        "alternate, each in a fresh daemon and staging; median (min–max) over rounds.\n")
    sm = f.get("summary", {})
    L.append("| figure | one VM alone | all VMs at once | ratio |")
    L.append("|---|---:|---:|---:|")
    L.append(f"| recover until disks visible s (fleet: the last VM's) | {B.fmt_spread(sm.get('lone_recover_s'), 2)} | "
             f"{B.fmt_spread(sm.get('fleet_recover_s'), 2)} | {B.fmt(sm.get('recover_ratio'), 2)}× |")
    L.append(f"| read p99 ms as the guest sees it, every read a miss (fleet: the worst VM's) | {B.fmt_spread(sm.get('lone_p99_ms'), 1)} | "
             f"{B.fmt_spread(sm.get('fleet_worst_p99_ms'), 1)} | {B.fmt(sm.get('p99_ratio'), 2)}× |")
    L.append(f"| read p99 ms, every VM of every fleet run | | {B.fmt_spread(sm.get('fleet_p99_ms'), 1)} | |")
    L.append("")
    for e in f.get("errors", []):
        L.append(f"* FAILED: {e.replace('|', '/')}")
    L.append("")
    return L
