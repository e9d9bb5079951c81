"""Fleet section of scripts/bench/run.py: 20 VMs at once against one.

One daemon at its default of 64 GETs in flight, 20 VMs each backed up
from its own random image (no chunk is shared, so no VM's fetch serves
another's).  The repository is a local
directory behind `serve --repo-delay-ms 20`: every chunk read waits 20 ms,
so what is measured is the daemon's scheduling of many VMs' misses, not
Garage's CPU on this 2-core machine.

  recover   wall time of `recover` for one VM alone, vs. the time until the
            last of 20 concurrent `recover` calls has returned (the disks
            are visible when `recover` returns), measured two ways, each in
            a fresh daemon: 20 requests at once on the control API from one
            client (what an orchestrator sees, and the target's figure), and
            20 `recoverfs recover` CLI processes started at once (which adds
            20 process start-ups competing for the 2 cores)
  reading   each VM reads first touches (4 KiB at random 1 MiB-aligned
            offsets, QD1, O_DIRECT); its read latencies as fio sees them
            (every read a miss), alone vs. all 20 at once, each in a fresh
            daemon and staging (the daemon's latency histogram is
            daemon-wide).  Each VM's p99 is taken from fio's latency bins
            pooled over all rounds, so the lone VM's p99 and every fleet
            VM's rest on the same number of reads; the per-round figure
            (one run's 32 reads: its maximum) is kept beside it.
Rounds alternate lone and fleet runs; the report gives medians and spread.
"""
import json
import os
import socket
import subprocess
import threading
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


def api_recover(sock, vm):
    """`POST /sessions` on the control socket, as the CLI sends it; the
    response's disk paths."""
    body = json.dumps({"vm": vm})
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(300)
        s.connect(sock)
        s.sendall((f"POST /sessions HTTP/1.1\r\nHost: recoverfs\r\nConnection: close\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if status != 200:
        raise RuntimeError(f"recover {vm} over the API: HTTP {status}: {payload[-300:]!r}")
    return json.loads(payload)["disks"]


def recover_many_api(rfs, names):
    """Sends `recover` for every name at once from one client (a thread
    per request, released together); seconds until the last answered."""
    errors, gate = [], threading.Barrier(len(names) + 1)

    def one(n):
        gate.wait()
        try:
            api_recover(rfs.socket, n)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    gate.wait()
    t = time.monotonic()
    for th in threads:
        th.join()
    secs = time.monotonic() - t
    if errors:
        raise errors[0]
    return secs


def pooled_p99_ms(bins_list):
    """p99 (ms) of fio latency bins ({ns: count}) summed over runs, and the
    number of reads behind it."""
    total = {}
    for bins in bins_list:
        for ns, n in bins.items():
            total[int(ns)] = total.get(int(ns), 0) + n
    n = sum(total.values())
    if not n:
        return None, 0
    need, seen = 0.99 * n, 0
    for ns in sorted(total):
        seen += total[ns]
        if seen >= need:
            return ns / 1e6, n
    return None, n


def read_first_touches(outdir, disks, reads):
    """One fio per disk, all started together; each VM's read latency p99
    (ms) as its guest sees it (fio's completion latency), and its latency
    bins."""
    procs = {}
    for n, d in disks.items():
        out = os.path.join(outdir, f"fio-{n}.json")
        procs[n] = (out, subprocess.Popen(
            ["fio", f"--name={n}", f"--filename={d}", "--readonly", "--rw=randread", "--bs=4k", "--direct=1",
             "--ioengine=psync", "--blockalign=1M", "--norandommap", f"--number_ios={reads}",
             "--output-format=json+", f"--output={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    p99, bins = {}, {}
    for n, (out, p) in procs.items():
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"fio on {n}: {err.decode(errors='replace').strip()[-300:]}")
        with open(out) as f:
            rd = json.load(f)["jobs"][0]["read"]
        p99[n] = rd["clat_ns"]["percentile"]["99.000000"] / 1e6
        bins[n] = rd["clat_ns"].get("bins", {})
    return p99, bins


SERVE_ARGS = ["--no-profile", "--repo-delay-ms", str(DELAY_MS)]
# The daemon's default GETs in flight. The other sections give 16, to
# match the peers' 16 requests in flight; here there is no peer, and 16
# places for 20 VMs reading at once would make every fleet run queue for
# a place by construction while the lone VM never does.
FETCHES = 64


def one(cfg, work, repo, names, label):
    with B.Scope(work, f"fleet-{label}-api") as s:
        api_secs = recover_many_api(B.Recoverfs(s, repo, args=SERVE_ARGS, fetch_workers=FETCHES).start(), names)
    with B.Scope(work, f"fleet-{label}") as s:
        rfs = B.Recoverfs(s, repo, args=SERVE_ARGS, fetch_workers=FETCHES).start()
        secs, disks = recover_many(rfs, names)
        B.drop_caches()
        p99, bins = read_first_touches(s.dir, disks, cfg.fleet_reads)
        # The daemon's scheduler (and its latency histogram) is shared by
        # all sessions: a daemon-wide figure, for reference.
        sched = rfs.status(names[0]).get("scheduler", {})
        daemon = sched.get("on_demand_latency_p99_ms")
        return {"recover_s": secs, "recover_api_s": api_secs, "on_demand_p99_ms": p99, "latency_bins": bins,
                "daemon_on_demand_p99_ms": daemon, "daemon_scheduler": sched}


def section_fleet(cfg, work):
    res = {"vms": VMS, "fetches": FETCHES, "delay_ms": DELAY_MS, "image_bytes": cfg.fleet_image_bytes, "reads": cfg.fleet_reads,
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
                    B.log(f"fleet round {rnd + 1} {label}: recover API {r['recover_api_s'] * 1000:.1f} ms, CLI "
                          f"{r['recover_s'] * 1000:.1f} ms, on-demand p99 max "
                          f"{max(v or 0 for v in r['on_demand_p99_ms'].values()):.1f} ms")
                except Exception as e:
                    res["errors"].append(f"{label}: {str(e)[:300]}")
                    B.log(f"fleet {label}: FAILED {e}")
    lone_p99 = B.spread([v for r in res["lone"] for v in r["on_demand_p99_ms"].values()])
    fleet_worst = B.spread([max(v or 0 for v in r["on_demand_p99_ms"].values()) for r in res["fleet"]])
    fleet_all = B.spread([v for r in res["fleet"] for v in r["on_demand_p99_ms"].values()])
    res["summary"] = {"lone_p99_ms": lone_p99, "fleet_worst_p99_ms": fleet_worst, "fleet_p99_ms": fleet_all,
                      "lone_recover_s": B.spread([r["recover_s"] for r in res["lone"]]),
                      "fleet_recover_s": B.spread([r["recover_s"] for r in res["fleet"]]),
                      "lone_recover_api_s": B.spread([r["recover_api_s"] for r in res["lone"]]),
                      "fleet_recover_api_s": B.spread([r["recover_api_s"] for r in res["fleet"]])}
    sm = res["summary"]
    sm.update(pooled(res))
    if lone_p99 and fleet_worst and lone_p99["median"]:
        sm["p99_ratio_per_round"] = fleet_worst["median"] / lone_p99["median"]
    if sm.get("lone_pooled_p99_ms") and sm.get("fleet_pooled_p99_ms"):
        sm["p99_pooled_ratio"] = sm["fleet_pooled_p99_ms"]["max"] / sm["lone_pooled_p99_ms"]
        sm["p99_ratio_median_vm"] = sm["fleet_pooled_p99_ms"]["median"] / sm["lone_pooled_p99_ms"]
    for k in ("", "_api"):
        lone, fl = sm[f"lone_recover{k}_s"], sm[f"fleet_recover{k}_s"]
        if lone and fl:
            sm[f"recover{k}_ratio"] = fl["median"] / lone["median"]
    return res


def pooled(res):
    """Each VM's p99 over all its rounds' reads (fio's bins summed): the
    lone VM's from every lone round, each fleet VM's from every fleet
    round, so both rest on rounds x reads samples."""
    lone, n_lone = pooled_p99_ms([b for r in res["lone"] for b in r.get("latency_bins", {}).values()])
    vms = sorted({n for r in res["fleet"] for n in r.get("latency_bins", {})})
    per_vm = {n: pooled_p99_ms([r["latency_bins"][n] for r in res["fleet"] if n in r.get("latency_bins", {})])
              for n in vms}
    out = {"lone_pooled_p99_ms": lone, "lone_pooled_reads": n_lone,
           "fleet_pooled_p99_ms": B.spread([v[0] for v in per_vm.values()]),
           "fleet_pooled_reads_per_vm": B.spread([v[1] for v in per_vm.values()])}
    return out


def targets(f):
    out = []
    sm = f.get("summary", {})
    if sm.get("p99_pooled_ratio") is not None:
        out.append(f"| {VMS} VMs reading at once: each VM's on-demand p99 ≤ 2× a lone VM's | worst VM, pooled over rounds, "
                   f"{sm['p99_pooled_ratio']:.2f}× | {'met' if sm['p99_pooled_ratio'] <= 2 else '**missed**'} |")
    if sm.get("recover_api_ratio") is not None:
        out.append(f"| recover of {VMS} VMs at once: last VM's disks visible ≤ 2× a lone VM's (control API) | "
                   f"{sm['recover_api_ratio']:.2f}× | {'met' if sm['recover_api_ratio'] <= 2 else '**missed**'} |")
    # Results of older runs (no API figure, no pooled p99): their own rows.
    if sm.get("p99_pooled_ratio") is None and sm.get("p99_ratio") is not None:
        out.append(f"| {VMS} VMs reading at once: each VM's on-demand p99 ≤ 2× a lone VM's | worst VM, per round, "
                   f"{sm['p99_ratio']:.2f}× | {'met' if sm['p99_ratio'] <= 2 else '**missed**'} |")
    if sm.get("recover_api_ratio") is None and sm.get("recover_ratio") is not None:
        out.append(f"| recover of {VMS} VMs at once: last VM's disks visible ≤ 2× a lone VM's (CLI processes) | "
                   f"{sm['recover_ratio']:.2f}× | {'met' if sm['recover_ratio'] <= 2 else '**missed**'} |")
    return out


def ms(sp):
    """A spread of seconds in milliseconds."""
    if not sp:
        return sp
    return {k: (v * 1000 if k in ("median", "min", "max") else v) for k, v in sp.items()}


def render(f):
    L = [f"## 5. {VMS} VMs at once\n"]
    if "error" in f:
        return L + [f"FAILED: {f['error']}\n"]
    L.append(
        f"One daemon (`--no-profile`, `--fetches-in-flight {f.get('fetches', 16)}`"
        + (": the daemon's default; the other sections give 16 to match the peers' 16 requests in flight, but "
           "here there is no peer, and 16 places for 20 VMs reading at once would make the fleet queue for a "
           "place by construction while a lone VM never does" if f.get("fetches", 16) != 16 else "")
        + f"), {VMS} VMs each backed up from its own {f['image_bytes'] // MiB} MiB random "
        f"image (no shared chunks), local repository behind `serve --repo-delay-ms {f['delay_ms']}`: the figures "
        "are the daemon's scheduling of many VMs, not the store's CPU. **Baseline: one VM alone in the same "
        "daemon configuration**, the issue's definition. Recover: wall time until `recover` returned (disks "
        f"visible) for one VM vs the last of {VMS} started at once, two ways, each in a fresh daemon: {VMS} "
        "requests at once on the control API from one client (what an orchestrator sees; the target's figure) "
        f"and {VMS} `recoverfs recover` processes started at once (adds {VMS} process start-ups on the same "
        f"cores). Reading: each VM's fio reads {f['reads']} first touches per round (4 KiB at random 1 MiB-aligned "
        "offsets, QD1, O_DIRECT), all VMs at once (fio's fixed seed gives every VM and round the same "
        "offsets; at 64 MiB and 32 reads they fall on 16 distinct chunks, so half the reads are misses and half "
        "staged hits, alike alone and in the fleet; a p99 is a miss's latency). **Pooled p99** (the target's figure): each VM's p99 from fio's latency bins summed "
        "over all rounds, so the lone VM's p99 and every fleet VM's rest on the same number of reads. The "
        "per-round figure (one run's p99 of 32 reads is its maximum; the fleet's worst of 20 such maxima against "
        "the lone VM's median maximum) is kept for comparison with older runs. Lone and fleet runs "
        "alternate, each in a fresh daemon and staging; median (min–max) over rounds.\n")
    sm = f.get("summary", {})
    L.append("| figure | one VM alone | all VMs at once | ratio |")
    L.append("|---|---:|---:|---:|")
    L.append(f"| recover until disks visible ms, control API (fleet: the last VM's) | "
             f"{B.fmt_spread(ms(sm.get('lone_recover_api_s')), 1)} | {B.fmt_spread(ms(sm.get('fleet_recover_api_s')), 1)} | "
             f"{B.fmt(sm.get('recover_api_ratio'), 2)}× |")
    L.append(f"| recover until disks visible ms, `recoverfs recover` processes (fleet: the last VM's) | "
             f"{B.fmt_spread(ms(sm.get('lone_recover_s')), 1)} | {B.fmt_spread(ms(sm.get('fleet_recover_s')), 1)} | "
             f"{B.fmt(sm.get('recover_ratio'), 2)}× |")
    fp = sm.get("fleet_pooled_p99_ms")
    if fp:
        L.append(f"| read p99 ms pooled over rounds ({sm.get('lone_pooled_reads')} reads alone; fleet: the worst VM's, "
                 f"{B.fmt_spread(sm.get('fleet_pooled_reads_per_vm'))} reads each) | "
                 f"{B.fmt(sm.get('lone_pooled_p99_ms'), 1)} | {fp['max']:.1f} | {B.fmt(sm.get('p99_pooled_ratio'), 2)}× |")
        L.append(f"| read p99 ms pooled over rounds, fleet: the median VM's (min–max over VMs) | | "
                 f"{B.fmt_spread(fp, 1)} | {B.fmt(sm.get('p99_ratio_median_vm'), 2)}× |")
    L.append(f"| read p99 ms per round ({f['reads']} reads: its maximum; fleet: the worst VM's) | {B.fmt_spread(sm.get('lone_p99_ms'), 1)} | "
             f"{B.fmt_spread(sm.get('fleet_worst_p99_ms'), 1)} | {B.fmt(sm.get('p99_ratio_per_round', sm.get('p99_ratio')), 2)}× |")
    L.append(f"| read p99 ms per round, every VM of every fleet run | | {B.fmt_spread(sm.get('fleet_p99_ms'), 1)} | |")
    L.append("")
    for e in f.get("errors", []):
        L.append(f"* FAILED: {e.replace('|', '/')}")
    L.append("")
    return L
