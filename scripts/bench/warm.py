"""Warm section of scripts/bench/run.py: every block staged, page cache hot.

Same work, same caching: every system reads the same staged bytes with the
same fio job, buffered, after one full read has made its page cache hot.

  staging file   the daemon's own staging data file, read directly (the
                 baseline: what the daemon itself reads from, the same way)
  recoverfs      the FUSE disk file (default: every read passes the daemon)
  recoverfs, passthrough
                 a second daemon serving the same backup with
                 `--fuse-passthrough`: fio's read-only opens of the fully
                 staged disk are read by the kernel from that daemon's
                 staging file (the daemon's read counter is checked to stay
                 put, so the figure is passthrough's)
  bindfs         `bindfs -r --multithreaded` of the staging directory
  QEMU FUSE      `qemu-storage-daemon` FUSE export of the staging file
                 (QEMU 7.2 handles FUSE requests one at a time)

O_DIRECT on both sides is not measured: the daemon has no O_DIRECT staging
mode (it reads its staging file through the page cache), so an O_DIRECT
read of the FUSE file is not O_DIRECT underneath.

Systems are interleaved within every round (rotated start), and each job
runs `rounds` times; the report gives median and spread.

Alone (validation; prints the section, writes nothing under docs/):
  python3 scripts/bench/warm.py [--quick] [--contended "why"] [--json PATH]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
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
SYSTEMS = ("staging", "recoverfs", "recoverfs_pt", "bindfs", "qemu_fuse")
NAMES = {"staging": "staging file (baseline)", "recoverfs": "recoverfs FUSE",
         "recoverfs_pt": "recoverfs FUSE, passthrough (`--fuse-passthrough`)",
         "bindfs": "bindfs (multithreaded)", "qemu_fuse": "qemu-storage-daemon FUSE export"}
PEERS = ("bindfs", "qemu_fuse")


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


def staged_daemon(scope, repo, name, args, res, second_copy=False):
    """A daemon serving the backup, its disk read once in full (every block
    staged); returns (daemon, disk path). `second_copy`: another daemon of
    this run already serves it."""
    rfs = B.Recoverfs(scope, repo, name=name, args=["--no-profile"] + args).start()
    disk = rfs.recover("bench", second_copy=second_copy)
    t = time.monotonic()
    read_all(disk)
    res.setdefault("stage_all_seconds", time.monotonic() - t)
    st = rfs.status("bench")["disks"][0]
    if st["blocks_staged"] + st.get("zero_blocks", 0) < st["blocks_total"]:
        res["warning"] = (f"{name}: only {st['blocks_staged']} + {st.get('zero_blocks', 0)} zero of "
                          f"{st['blocks_total']} blocks staged")
    return rfs, disk


def daemon_reads(rfs):
    return rfs.status("bench")["disks"][0]["reads"]


def run_job(s, res, job, name, target):
    """One measured fio job on a hot system; for the passthrough daemon,
    also the reads it saw (0 when passthrough applied)."""
    rw, bs, qd, _ = WARM_JOBS[job]
    path, pid, rfs = target
    read_all(path)  # hot: this system's page cache holds the whole disk
    before = daemon_reads(rfs) if rfs else None
    m = B.Meter([pid]).start()
    # invalidate=0: fio would otherwise drop the file's page cache at the
    # job start (POSIX_FADV_DONTNEED), which empties the staging file's
    # cache but not a FUSE file's kernel cache: the baseline would run cold.
    r = B.fio_job(s.dir, f"{job}-{name}", path, rw, bs, qd, res["runtime_s"],
                  engine="io_uring", extra=["--invalidate=0"])
    r.update(m.stop())
    r["cpu_s_per_gib"] = r["cpu_s"] / (r["io_bytes"] / 2**30) if pid and r["io_bytes"] else None
    if rfs:
        r["daemon_reads"] = daemon_reads(rfs) - before
    res["jobs"][job][name].append(r)


def section_warm(cfg, work, image):
    res = {"runtime_s": cfg.warm_runtime, "rounds": cfg.rounds, "image_bytes": os.path.getsize(image),
           "jobs": {j: {s: [] for s in SYSTEMS} for j in WARM_JOBS}, "errors": {}}
    with B.Scope(work, "warm") as s, B.DamonPaused() as damon:
        res["damon_paused"] = damon.paused
        repo = s.path("repo")
        res["backup"] = B.backup(repo, "bench", image)
        rfs, disk = staged_daemon(s, repo, "recoverfs", [], res)
        data = rfs.data_file("bench")
        targets = {"staging": (data, None, None), "recoverfs": (disk, rfs.proc.pid, None)}
        try:
            pt, pt_disk = staged_daemon(s, repo, "recoverfs-pt", ["--fuse-passthrough"], res, second_copy=True)
            targets["recoverfs_pt"] = (pt_disk, pt.proc.pid, pt)
        except Exception as e:
            res["errors"]["recoverfs_pt"] = str(e)[:300]
            B.log(f"warm: recoverfs_pt FAILED: {e}")
        for name, fn in (("bindfs", bindfs_peer), ("qemu_fuse", qemu_fuse_peer)):
            try:
                targets[name] = fn(s, data) + (None,)
            except Exception as e:
                res["errors"][name] = str(e)[:300]
                B.log(f"warm: {name} FAILED: {e}")
        B.log(f"warm: staged all in {res['stage_all_seconds']:.1f}s; {len(targets)} systems")
        for rnd in range(cfg.rounds):
            order = [x for x in SYSTEMS if x in targets]
            order = order[rnd % len(order):] + order[:rnd % len(order)]
            for job in WARM_JOBS:
                for name in order:
                    try:
                        run_job(s, res, job, name, targets[name])
                    except Exception as e:
                        res["errors"][f"{job}/{name}"] = str(e)[:300]
                        B.log(f"warm: {job} {name} FAILED: {e}")
                B.log(f"warm round {rnd + 1}: {job}: " + ", ".join(
                    f"{n} {value(job, res['jobs'][job][n][-1]):.0f}"
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
        peers = [sm[n]["median"] for n in PEERS if sm.get(n)]

        def ratio(n, to):
            return sm[n]["median"] / to if sm.get(n) and to else None
        pt_reads = [r.get("daemon_reads") for r in per.get("recoverfs_pt", [])]
        res["summary"][job] = {
            "values": sm, "cpu_s_per_gib": cpu,
            "ratio_vs_staging": ratio("recoverfs", base and base["median"]),
            "pt_ratio_vs_staging": ratio("recoverfs_pt", base and base["median"]),
            # Reads the passthrough daemon saw during its jobs: 0 when
            # passthrough applied to every one of them.
            "pt_daemon_reads": sum(x for x in pt_reads if x is not None) if pt_reads else None,
            "best_fuse_peer": max(peers) if peers else None,
            "ratio_vs_best_peer": ratio("recoverfs", max(peers) if peers else None)}


def pct(v):
    # One decimal: 89.8% must not read as the 90% target.
    return "—" if v is None else f"{v:.1%}"


def verdict(sm):
    """The target: the FUSE disk ≥ the best FUSE peer, and where passthrough
    applies (the `--fuse-passthrough` system, its daemon seeing no read) ≥
    90% of the staging file. None when not measured."""
    rp, pt = sm.get("ratio_vs_best_peer"), sm.get("pt_ratio_vs_staging")
    if pt is None:
        return None
    applied = sm.get("pt_daemon_reads") == 0
    return pt >= 0.9 and applied and (rp is None or rp >= 1)


def targets(w):
    out = []
    for job in WARM_TARGET_JOBS:
        sm = w.get("summary", {}).get(job)
        if not sm:
            continue
        ok = verdict(sm)
        if ok is None:
            why = w.get("errors", {}).get("recoverfs_pt", "no `--fuse-passthrough` system in this run")
            out.append(f"| warm {WARM_JOBS[job][3]}: ≥ best FUSE peer; ≥ 90% of the staging file where passthrough "
                       f"applies | not measured ({why.replace('|', '/')}) | **missed** |")
            continue
        pt, rp = sm["pt_ratio_vs_staging"], sm.get("ratio_vs_best_peer")
        note = "" if sm.get("pt_daemon_reads") == 0 else f" (**passthrough did not apply**: the daemon saw {sm.get('pt_daemon_reads')} reads)"
        out.append(f"| warm {WARM_JOBS[job][3]}: ≥ best FUSE peer; ≥ 90% of the staging file where passthrough "
                   f"applies | passthrough {pct(pt)} of staging{note}; without it {B.fmt(rp, 2)}× best FUSE peer, "
                   f"{pct(sm['ratio_vs_staging'])} of staging | {'met' if ok else '**missed**'} |")
    return out


def render(w):
    L = ["## 1. Warm reads: same bytes, same caching\n"]
    if "error" in w:
        return L + [f"FAILED: {w['error']}\n"]
    L.append(
        f"{w['image_bytes'] / MiB:.0f} MiB random image with zero holes, local directory repository, every block "
        f"staged (whole disk read once through FUSE, {w['stage_all_seconds']:.1f} s). Each system is read once in "
        "full right before its job, so its page cache is hot; then the same fio job (io_uring, buffered, "
        f"{w['runtime_s']} s). {w['rounds']} rounds, systems interleaved (rotated order); median (min–max)."
        + (" This VM's DAMON reclaim was paused for the section, for every system alike: it pages out "
           "page-cache pages it finds idle, recently read ones included, so a file read in full just before "
           "its job would not stay hot (and which system lost pages would be chance)."
           if w.get("damon_paused") else "") + "\n")
    L.append("**Baseline: the staging data file read the same way** (buffered, hot): it is the file the daemon "
             "serves from and reads through the page cache, so it is the ceiling for any FUSE layer above it. "
             "**recoverfs** twice: as served by default (every read the kernel does not find in the FUSE file's "
             "own page cache passes the daemon), and a second daemon with `--fuse-passthrough` serving the same "
             "backup, whose fully staged disk fio opens read-only: the kernel reads that daemon's staging file "
             "itself (the row under the table gives the reads that daemon saw during its jobs: 0 means "
             "passthrough applied throughout). Passthrough is opt-in because a writable open of a disk is "
             "refused while passthrough readers hold it (README). "
             "**Peers:** bindfs (`-r --multithreaded`) and `qemu-storage-daemon`'s FUSE export "
             "(`cache.direct=off`) of the same staging file in the same run: other FUSE servers over the same "
             "bytes, the fair comparison for the FUSE layer. QEMU 7.2's FUSE export serves one request at a time. "
             "No O_DIRECT rows: the daemon has no O_DIRECT staging mode, so O_DIRECT on the FUSE file would be "
             "compared with buffered reads underneath. CPU-s/GiB: user+system time of the serving process "
             "(recoverfs, bindfs, qemu-storage-daemon; `/proc/PID/stat`) per GiB fio read; the kernel's own work "
             "is not attributed (`perf stat -e instructions` is not supported on this VM: no PMU).\n")
    L.append("| job | unit | " + " | ".join(NAMES[n] for n in SYSTEMS) +
             " | recoverfs / staging | passthrough / staging | recoverfs / best FUSE peer | target |")
    L.append("|---|---|" + "---:|" * len(SYSTEMS) + "---:|---:|---:|---|")
    for job, sm in w.get("summary", {}).items():
        unit = "IOPS" if job.startswith("rand") else "MB/s"
        cells = [B.fmt_spread(sm["values"].get(n)) for n in SYSTEMS]
        tgt = "—"
        ok = verdict(sm) if job in WARM_TARGET_JOBS else None
        if ok is not None:
            tgt = "passthrough ≥ 90% of staging, recoverfs ≥ best peer: " + ("met" if ok else "**missed**")
        L.append(f"| {WARM_JOBS[job][3]} | {unit} | {' | '.join(cells)} | {pct(sm.get('ratio_vs_staging'))} | "
                 f"{pct(sm.get('pt_ratio_vs_staging'))} | {B.fmt(sm.get('ratio_vs_best_peer'), 2)}× | {tgt} |")
    L.append("")
    reads = {job: sm.get("pt_daemon_reads") for job, sm in w.get("summary", {}).items()}
    L.append("Reads the `--fuse-passthrough` daemon saw during its jobs: " +
             ", ".join(f"{WARM_JOBS[j][3]}: {B.fmt(n)}" for j, n in reads.items()) + ".\n")
    slow = [j for j in WARM_TARGET_JOBS if (w.get("summary", {}).get(j, {}).get("ratio_vs_staging") or 1) < 0.9]
    if slow:
        cpu = [(w["summary"][j]["cpu_s_per_gib"].get("recoverfs") or {}).get("median") for j in slow]
        if all(c is not None and c < 0.01 for c in cpu):
            L.append("Without passthrough, recoverfs stays under 90% of the staging file, and the daemon is not "
                     "what bounds it: it saw almost no reads (its CPU-seconds per GiB below are 0.00), so the "
                     "kernel answered them from the FUSE file's own page cache. The difference is the kernel's "
                     "cost per read on a FUSE file (`warm_profile.py` shows where it goes).\n")
        else:
            L.append("Without passthrough, recoverfs stays under 90% of the staging file: reads that miss the "
                     "FUSE file's own page cache go to the daemon (the CPU-seconds below show how many did). "
                     "`--fuse-passthrough` removes that round trip for read-only opens of fully staged disks "
                     "(the passthrough column).\n")
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


def main():
    """The warm section alone: prints its targets and table, with the load
    average, labelled contended when the machine was shared."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="512 MiB image, 3 s jobs, 2 rounds")
    ap.add_argument("--contended", help="say that the machine was shared, and how")
    ap.add_argument("--json", help="also write the raw figures here")
    a = ap.parse_args()
    if not os.path.exists(B.BIN):
        sys.exit(f"{B.BIN} not found: run `cargo build --release` first")
    cfg = argparse.Namespace(warm_runtime=3 if a.quick else 10, rounds=2 if a.quick else 5)
    B.SOCK_DIR = tempfile.mkdtemp(prefix="rfsw-", dir="/tmp")
    B.REMOVE_SCOPES = True
    work = tempfile.mkdtemp(prefix="recoverfs-warm-", dir="/var/tmp")
    load_start = B.loadavg()
    try:
        image = B.make_image(os.path.join(work, "image.raw"), (512 if a.quick else 1024) * MiB)
        res = section_warm(cfg, work, image)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(B.SOCK_DIR, ignore_errors=True)
    res["loadavg"] = {"start": load_start, "end": B.loadavg()}
    res["contended"] = a.contended
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    loads = [x[0] for x in res["loadavg"].values() if x]
    head = [f"Load average at start {load_start}, at end {res['loadavg']['end']} on {os.cpu_count()} CPUs."]
    if a.contended or (loads and max(loads) > (os.cpu_count() or 1)):
        head.append(f"**Contended run** ({a.contended or 'load above the CPU count'}): validation figures, "
                    "not the reference ones.")
    print("\n".join(head + [""] + targets(res) + [""] + render(res)))


if __name__ == "__main__":
    main()
