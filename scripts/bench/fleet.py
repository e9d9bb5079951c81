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
            offsets, QD1, O_DIRECT; a fio job thread per VM, all in one fio
            process); its read latencies as fio sees them
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
import resource
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


def cpu_seconds(pid):
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def procs_running():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    return 0


class Load:
    """What the reads cost the machine: CPU-seconds of the fio processes
    (the bench's own load; its children, reaped meanwhile) and of the
    daemon, and the run queue sampled every 5 ms."""

    def __init__(self, daemon_pid):
        self.pid, self.samples, self.stop = daemon_pid, [], threading.Event()

    def __enter__(self):
        self.ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.daemon = cpu_seconds(self.pid)
        self.t = time.monotonic()
        self.thread = threading.Thread(target=self.sample)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.wait(0.005):
            self.samples.append(procs_running())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        s = sorted(self.samples) or [0]
        self.figures = {"wall_s": time.monotonic() - self.t,
                        "fio_cpu_s": ru.ru_utime - self.ru.ru_utime + ru.ru_stime - self.ru.ru_stime,
                        "daemon_cpu_s": cpu_seconds(self.pid) - self.daemon,
                        "run_queue_median": s[len(s) // 2]}


def first_touch_log(outdir, size, reads):
    """fio's I/O log of one job's first touches on a `size`-byte disk,
    recorded on a sparse scratch file: fio seeds each job of a process by
    its job number, so every job replays this log instead, and every VM
    (alone or in the fleet) reads the same offsets, as one fio per disk
    did before."""
    scratch, log = os.path.join(outdir, "first-touches.raw"), os.path.join(outdir, "first-touches.iolog")
    with open(scratch, "wb") as f:
        f.truncate(size)
    r = subprocess.run(["fio", "--name=log", f"--filename={scratch}", "--readonly", "--rw=randread", "--bs=4k",
                        "--ioengine=psync", "--blockalign=1M", "--norandommap", f"--number_ios={reads}",
                        f"--write_iolog={log}", "--output-format=terse", "--output=/dev/null"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    os.unlink(scratch)
    if r.returncode != 0:
        raise RuntimeError(f"fio (I/O log): {r.stderr.decode(errors='replace').strip()[-300:]}")
    return log


def read_first_touches(outdir, disks, log):
    """One fio job per disk, all started together in one fio process (a
    thread per job: 20 fio processes cost 2.7-3.1 CPU-seconds to start and
    report, 8x the daemon's CPU during the reads, on the same 2 cores, and
    with no daemon at all, plain local-file reads, they alone raised the
    worst job's p99 from 0.2 to 7-15 ms; one process with 20 job threads
    costs 0.2 CPU-seconds and 0.6 ms); each VM's read latency p99 (ms) as
    its guest sees it (fio's completion latency), and its latency bins."""
    out = os.path.join(outdir, "fio.json")
    jobs = [a for n, d in disks.items() for a in (f"--name={n}", f"--read_iolog={log}", f"--replay_redirect={d}")]
    r = subprocess.run(["fio", "--thread", "--readonly", "--direct=1", "--ioengine=psync", "--replay_no_stall=1",
                        "--output-format=json+", f"--output={out}", *jobs],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"fio: {r.stderr.decode(errors='replace').strip()[-300:]}")
    with open(out) as f:
        done = {j["jobname"]: j["read"] for j in json.load(f)["jobs"]}
    if set(done) != set(disks):
        raise RuntimeError(f"fio reported jobs {sorted(done)}, not {sorted(disks)}")
    p99 = {n: rd["clat_ns"]["percentile"]["99.000000"] / 1e6 for n, rd in done.items()}
    bins = {n: rd["clat_ns"].get("bins", {}) for n, rd in done.items()}
    return p99, bins


SERVE_ARGS = ["--no-profile", "--repo-delay-ms", str(DELAY_MS)]
# The daemon's default GETs in flight. The other sections give 16, to
# match the peers' 16 requests in flight; here there is no peer, and 16
# places for 20 VMs reading at once would make every fleet run queue for
# a place by construction while the lone VM never does.
FETCHES = 64


# The store is the 20 ms timer: after the caches are dropped (staging and
# the daemon start cold), the repository's chunk files are read back into
# the page cache. Left on disk, 20 VMs' misses read 20 chunk files from
# this machine's one virtual disk at once where a lone VM reads one, and
# the row measures that disk under 20-fold load (the stop-25 run: GET
# stage p99 78 ms against 28 alone), not the daemon's scheduling, which is
# what the section is for. Same store for the lone VM and the fleet.
WARM_STORE = True


def warm_chunks(repo):
    """Reads every chunk file of `repo` once (into the page cache)."""
    for d, _, files in os.walk(os.path.join(repo, "chunks")):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                while f.read(1 << 20):
                    pass


def release_all(rfs, names):
    """Discards every session (outside the timings): their pins go, so
    the next round's daemon, on a fresh staging at the same path, is not
    refused for sessions the repository says are kept there."""
    for n in names:
        rfs.release(n)


def one(cfg, work, repo, names, label):
    with B.Scope(work, f"fleet-{label}-api") as s:
        rfs = B.Recoverfs(s, repo, args=SERVE_ARGS, fetch_workers=FETCHES).start()
        api_secs = recover_many_api(rfs, names)
        release_all(rfs, names)
    with B.Scope(work, f"fleet-{label}") as s:
        rfs = B.Recoverfs(s, repo, args=SERVE_ARGS, fetch_workers=FETCHES).start()
        secs, disks = recover_many(rfs, names)
        log = first_touch_log(s.dir, os.path.getsize(next(iter(disks.values()))), cfg.fleet_reads)
        B.drop_caches()
        if WARM_STORE:
            warm_chunks(repo)
        with Load(rfs.proc.pid) as load:
            p99, bins = read_first_touches(s.dir, disks, log)
        # The daemon's scheduler (and its latency histogram) is shared by
        # all sessions: a daemon-wide figure, for reference.
        sched = rfs.status(names[0]).get("scheduler", {})
        daemon = sched.get("on_demand_latency_p99_ms")
        release_all(rfs, names)
        return {"recover_s": secs, "recover_api_s": api_secs, "on_demand_p99_ms": p99, "latency_bins": bins,
                "daemon_on_demand_p99_ms": daemon, "daemon_scheduler": sched, "load": load.figures}


def section_fleet(cfg, work):
    res = {"vms": VMS, "fetches": FETCHES, "delay_ms": DELAY_MS, "warm_store": WARM_STORE, "image_bytes": cfg.fleet_image_bytes, "reads": cfg.fleet_reads,
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
    for label in ("lone", "fleet"):
        for k in ("fio_cpu_s", "daemon_cpu_s", "run_queue_median"):
            res["summary"][f"{label}_{k}"] = B.spread([r["load"][k] for r in res[label] if "load" in r])
        for k in ("get", "finish", "cpu_wait"):
            res["summary"][f"{label}_daemon_{k}_p99_ms"] = B.spread(
                [r["daemon_scheduler"][f"on_demand_{k}_p99_ms"] for r in res[label]
                 if f"on_demand_{k}_p99_ms" in r.get("daemon_scheduler", {})])
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
        f"image (no shared chunks), local repository behind `serve --repo-delay-ms {f['delay_ms']}`"
        + (", its chunk files read back into the page cache after the caches are dropped (the store is the "
           "timer alone; left on disk, 20 VMs' misses read 20 chunk files at once from this machine's one "
           "virtual disk where a lone VM reads one, and the row would measure that disk)"
           if f.get("warm_store") else "")
        + ": the figures are the daemon's scheduling of many VMs, not the store's CPU. **Baseline: one VM alone in the same "
        "daemon configuration**, the issue's definition. Recover: wall time until `recover` returned (disks "
        f"visible) for one VM vs the last of {VMS} started at once, two ways, each in a fresh daemon: {VMS} "
        "requests at once on the control API from one client (what an orchestrator sees; the target's figure) "
        f"and {VMS} `recoverfs recover` processes started at once (adds {VMS} process start-ups on the same "
        f"cores). Reading: each VM's fio job reads {f['reads']} first touches per round (4 KiB at random 1 MiB-aligned "
        "offsets, QD1, O_DIRECT), all VMs at once, a job thread per VM in one fio process (20 fio processes cost "
        "about 3 CPU-seconds to start and report, 8× the daemon's CPU during the reads on the same 2 cores, and "
        "alone raised the worst p99 of plain local-file reads from 0.2 to 7–15 ms) (fio's fixed seed gives every VM and round the same "
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
    for k, what in (("get", "GET stage (20 ms timer + the local read)"),
                    ("finish", "finish stage (verify, answer, write staging)"),
                    ("cpu_wait", "wait for a fetch CPU thread")):
        if sm.get(f"fleet_daemon_{k}_p99_ms"):
            L.append(f"| daemon on-demand {what}, p99 ms (daemon-wide) | {B.fmt_spread(sm.get(f'lone_daemon_{k}_p99_ms'), 1)} | "
                     f"{B.fmt_spread(sm.get(f'fleet_daemon_{k}_p99_ms'), 1)} | |")
    if sm.get("fleet_fio_cpu_s"):
        L.append(f"| CPU-seconds during the reads: the fio processes (the bench's own load) | "
                 f"{B.fmt_spread(sm.get('lone_fio_cpu_s'), 2)} | {B.fmt_spread(sm.get('fleet_fio_cpu_s'), 2)} | |")
        L.append(f"| CPU-seconds during the reads: the daemon | {B.fmt_spread(sm.get('lone_daemon_cpu_s'), 2)} | "
                 f"{B.fmt_spread(sm.get('fleet_daemon_cpu_s'), 2)} | |")
        L.append(f"| runnable threads during the reads (median of 5 ms samples, 2 cores) | "
                 f"{B.fmt_spread(sm.get('lone_run_queue_median'), 0)} | {B.fmt_spread(sm.get('fleet_run_queue_median'), 0)} | |")
    L.append("")
    for e in f.get("errors", []):
        L.append(f"* FAILED: {e.replace('|', '/')}")
    L.append("")
    return L
