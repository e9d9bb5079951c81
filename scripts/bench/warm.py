"""Warm section of scripts/bench/run.py: every block staged, page cache hot.

Same work, same caching: every system reads the same staged bytes with the
same fio job, buffered, after one full read has made its page cache hot.

  staging file   the daemon's own staging data file, read directly (the
                 baseline: what the daemon itself reads from, the same way)
  recoverfs      the FUSE disk file
  bindfs         `bindfs -r --multithreaded` of the staging directory
  QEMU FUSE      `qemu-storage-daemon` FUSE export of the staging file
                 (QEMU 7.2 handles FUSE requests one at a time)

O_DIRECT on both sides is not measured: the daemon has no O_DIRECT staging
mode (it reads its staging file through the page cache), so an O_DIRECT
read of the FUSE file is not O_DIRECT underneath.

Systems are interleaved within every round (rotated start), and each job
runs `rounds` times; the report gives median and spread.
"""
import os
import time

import run as B

MiB = B.MiB

# name: (rw, bs, iodepth, title).  Buffered reads with io_uring: libaio
# would run buffered reads synchronously (QD1 whatever the iodepth).
WARM_JOBS = {
    "rand4k_qd16": ("randread", "4k", 16, "4 KiB random QD16, buffered, hot"),
    "seq1m_qd16": ("read", "1M", 16, "1 MiB sequential QD16, buffered, hot"),
    "rand4k_qd1": ("randread", "4k", 1, "4 KiB random QD1, buffered, hot"),
}
WARM_TARGET_JOBS = ("rand4k_qd16", "seq1m_qd16")
SYSTEMS = ("staging", "recoverfs", "bindfs", "qemu_fuse")
NAMES = {"staging": "staging file (baseline)", "recoverfs": "recoverfs FUSE",
         "bindfs": "bindfs (multithreaded)", "qemu_fuse": "qemu-storage-daemon FUSE export"}


def bindfs_peer(scope, data):
    mnt = scope.path("bindfs-mnt")
    os.makedirs(mnt)
    p = scope.spawn("bindfs", ["bindfs", "-f", "-r", "--multithreaded", os.path.dirname(data), mnt])
    scope.add_mount(mnt)
    path = os.path.join(mnt, os.path.basename(data))
    B.wait_for(lambda: B.mounted(mnt) and os.path.exists(path), 20, "bindfs", p, scope)
    return path, p.pid


def qemu_fuse_peer(scope, data):
    mnt = scope.path("qsd-warm")
    open(mnt, "w").close()
    p = scope.spawn("qsd-warm", [
        "qemu-storage-daemon",
        "--blockdev", f"file,node-name=f,filename={data},cache.direct=off,read-only=on",
        "--blockdev", "raw,node-name=r,file=f,read-only=on",
        "--export", f"type=fuse,id=e0,node-name=r,mountpoint={mnt}"])
    scope.add_mount(mnt)
    size = os.path.getsize(data)
    B.wait_for(lambda: B.mounted(mnt) and os.path.getsize(mnt) == size, 20, "qemu-storage-daemon", p, scope)
    return mnt, p.pid


def read_all(path):
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MiB):
            pass


def section_warm(cfg, work, image):
    res = {"runtime_s": cfg.warm_runtime, "rounds": cfg.rounds, "image_bytes": os.path.getsize(image),
           "jobs": {j: {s: [] for s in SYSTEMS} for j in WARM_JOBS}, "errors": {}}
    with B.Scope(work, "warm") as s:
        repo = s.path("repo")
        res["backup"] = B.backup(repo, "bench", image)
        rfs = B.Recoverfs(s, repo, args=["--no-profile"]).start()
        disk = rfs.recover("bench")
        t = time.monotonic()
        read_all(disk)
        res["stage_all_seconds"] = time.monotonic() - t
        st = rfs.status("bench")["disks"][0]
        if st["blocks_staged"] + st.get("zero_blocks", 0) < st["blocks_total"]:
            res["warning"] = (f"only {st['blocks_staged']} + {st.get('zero_blocks', 0)} zero of "
                              f"{st['blocks_total']} blocks staged")
        data = rfs.data_file("bench")
        targets = {"staging": (data, None), "recoverfs": (disk, rfs.proc.pid)}
        for name, fn in (("bindfs", bindfs_peer), ("qemu_fuse", qemu_fuse_peer)):
            try:
                targets[name] = fn(s, data)
            except Exception as e:
                res["errors"][name] = str(e)[:300]
                B.log(f"warm: {name} FAILED: {e}")
        B.log(f"warm: staged all in {res['stage_all_seconds']:.1f}s; {len(targets)} systems")
        for rnd in range(cfg.rounds):
            order = [x for x in SYSTEMS if x in targets]
            order = order[rnd % len(order):] + order[:rnd % len(order)]
            for job, (rw, bs, qd, _) in WARM_JOBS.items():
                for name in order:
                    path, pid = targets[name]
                    try:
                        read_all(path)  # hot: this system's page cache holds the whole disk
                        m = B.Meter([pid]).start()
                        # invalidate=0: fio would otherwise drop the file's
                        # page cache at the job start (POSIX_FADV_DONTNEED),
                        # which empties the staging file's cache but not a
                        # FUSE file's kernel cache: the baseline would run cold.
                        r = B.fio_job(s.dir, f"{job}-{name}", path, rw, bs, qd, cfg.warm_runtime,
                                      engine="io_uring", extra=["--invalidate=0"])
                        r.update(m.stop())
                        r["cpu_s_per_gib"] = r["cpu_s"] / (r["io_bytes"] / 2**30) if pid and r["io_bytes"] else None
                        res["jobs"][job][name].append(r)
                    except Exception as e:
                        res["errors"][f"{job}/{name}"] = str(e)[:300]
                        B.log(f"warm: {job} {name} FAILED: {e}")
                B.log(f"warm round {rnd + 1}: {job}: " + ", ".join(
                    f"{n} {res['jobs'][job][n][-1]['iops' if 'rand' in job else 'mb_s']:.0f}"
                    for n in order if res["jobs"][job][n]))
    summarise(res)
    return res


def value(job, r):
    return r["iops"] if job.startswith("rand") else r["mb_s"]


def summarise(res):
    res["summary"] = {}
    for job, per in res["jobs"].items():
        sm = {n: B.spread([value(job, r) for r in rs]) for n, rs in per.items() if rs}
        cpu = {n: B.spread([r.get("cpu_s_per_gib") for r in rs]) for n, rs in per.items() if rs}
        base = sm.get("staging")
        peers = [sm[n]["median"] for n in ("bindfs", "qemu_fuse") if sm.get(n)]
        rv = sm.get("recoverfs")
        res["summary"][job] = {
            "values": sm, "cpu_s_per_gib": cpu,
            "ratio_vs_staging": rv["median"] / base["median"] if rv and base and base["median"] else None,
            "best_fuse_peer": max(peers) if peers else None,
            "ratio_vs_best_peer": rv["median"] / max(peers) if rv and peers and max(peers) else None}


def targets(w):
    out = []
    for job in WARM_TARGET_JOBS:
        sm = w.get("summary", {}).get(job)
        if not sm or sm.get("ratio_vs_staging") is None:
            continue
        rs, rp = sm["ratio_vs_staging"], sm.get("ratio_vs_best_peer")
        ok = rs >= 0.9 and (rp is None or rp >= 1)
        out.append(f"| warm {WARM_JOBS[job][3]}: ≥ best FUSE peer, ≥ 90% of the staging file | "
                   f"{rs:.0%} of staging, {B.fmt(rp, 2)}× best FUSE peer | {'met' if ok else '**missed**'} |")
    return out


def render(w):
    L = ["## 1. Warm reads: same bytes, same caching\n"]
    if "error" in w:
        return L + [f"FAILED: {w['error']}\n"]
    L.append(
        f"{w['image_bytes'] / MiB:.0f} MiB random image with zero holes, local directory repository, every block "
        f"staged (whole disk read once through FUSE, {w['stage_all_seconds']:.1f} s). Each system is read once in "
        "full right before its job, so its page cache is hot; then the same fio job (io_uring, buffered, "
        f"{w['runtime_s']} s). {w['rounds']} rounds, systems interleaved (rotated order); median (min–max).\n")
    L.append("**Baseline: the staging data file read the same way** (buffered, hot): it is the file the daemon "
             "serves from and reads through the page cache, so it is the ceiling for any FUSE layer above it. "
             "**Peers:** bindfs (`-r --multithreaded`) and `qemu-storage-daemon`'s FUSE export "
             "(`cache.direct=off`) of the same staging file in the same run: other FUSE servers over the same "
             "bytes, the fair comparison for the FUSE layer. QEMU 7.2's FUSE export serves one request at a time. "
             "No O_DIRECT rows: the daemon has no O_DIRECT staging mode, so O_DIRECT on the FUSE file would be "
             "compared with buffered reads underneath. CPU-s/GiB: user+system time of the serving process "
             "(recoverfs, bindfs, qemu-storage-daemon; `/proc/PID/stat`) per GiB fio read; the kernel's own work "
             "is not attributed (`perf stat -e instructions` is not supported on this VM: no PMU).\n")
    L.append("| job | unit | " + " | ".join(NAMES[n] for n in SYSTEMS) +
             " | recoverfs / staging | recoverfs / best FUSE peer | target |")
    L.append("|---|---|" + "---:|" * len(SYSTEMS) + "---:|---:|---|")
    for job, sm in w.get("summary", {}).items():
        unit = "IOPS" if job.startswith("rand") else "MB/s"
        cells = [B.fmt_spread(sm["values"].get(n)) for n in SYSTEMS]
        rs, rp = sm.get("ratio_vs_staging"), sm.get("ratio_vs_best_peer")
        tgt = "—"
        if job in WARM_TARGET_JOBS and rs is not None:
            ok = rs >= 0.9 and (rp is None or rp >= 1)
            tgt = "≥ 90% of staging, ≥ best peer: " + ("met" if ok else "**missed**")
        L.append(f"| {WARM_JOBS[job][3]} | {unit} | {' | '.join(cells)} | "
                 f"{f'{rs:.0%}' if rs is not None else '—'} | {B.fmt(rp, 2)}× | {tgt} |")
    L.append("")
    missed = [j for j in WARM_TARGET_JOBS if (w.get("summary", {}).get(j, {}).get("ratio_vs_staging") or 1) < 0.9]
    if missed:
        L.append("Missed ≥ 90% of the staging file: the bound is the FUSE round trip. Every read that is not a "
                 "hit in the FUSE file's own page cache goes to the serving process (the CPU-seconds below "
                 "show how many did); the kernel here (6.18) has FUSE passthrough, which would hand such reads "
                 "to the staging file directly, and the daemon does not use it.\n")
    L.append("CPU-seconds of the serving process per GiB read (median (min–max)):\n")
    L.append("| job | " + " | ".join(NAMES[n] for n in SYSTEMS[1:]) + " |")
    L.append("|---|" + "---:|" * (len(SYSTEMS) - 1))
    for job, sm in w.get("summary", {}).items():
        L.append(f"| {WARM_JOBS[job][3]} | " +
                 " | ".join(B.fmt_spread(sm["cpu_s_per_gib"].get(n), 2) for n in SYSTEMS[1:]) + " |")
    L.append("")
    for k, e in w.get("errors", {}).items():
        L.append(f"* {k} FAILED: {e.replace('|', '/')}")
    if w.get("warning"):
        L.append(f"\nWarning: {w['warning']}")
    L.append("")
    return L
