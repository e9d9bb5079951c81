#!/usr/bin/env python3
"""Backups of running QEMU VMs: does busiest-first pay, and how fast is the
read of a point-in-time view?

    python3 scripts/bench/vmbackup.py [--quick] [--rounds N] [--render-only]

**Order.** Three `tiny` VMs run their guest writer (a 512-byte write with a
flush, each in a new 64 KiB cluster of a second disk, as scattered writes
land) at three rates: as fast as TCG lets it ("busy"), a pause of 50 ms
("mid") and 500 ms ("slow"). Each also
has a 160 MiB data disk of its own random bytes, so reading a VM takes
seconds. `backup-vms --jobs 1` backs the three up from one snapshot time,
once with `--order busiest-first` (the default) and once with
`--order idle-first`, in alternating order, each run into a fresh
repository. Reported, as busiest-first / idle-first:
* the copy-before-write bytes of all views together, measured by
  `backup-vms` as each view is released (what the guests' writes copied
  aside while views were open);
* each VM's guest write p99 while its view was open (from its `resumed` to
  its `view_released` event), from QEMU's own write-latency histogram of
  the writer disk (`block-latency-histogram-set`, read through a second QMP
  monitor every 100 ms; the p99 is the upper edge of its histogram bin).

**Throughput.** One paused VM holds a 512 MiB disk (256 MiB random, 128
MiB of a repeated text page, 128 MiB unallocated). The harness opens one
copy-before-write view of it (the same QMP steps `backup-vms` takes) and
exports it over QEMU's NBD server; in each round, in alternating order,
that same export is read by
* `recoverfs backup` of the NBD URL into a fresh local repository (chunk,
  hash, compress, store; chunks are written durably), and
* `qemu-img convert -m 16 -W` of the same URL to a raw file on the same
  filesystem, then `sync` of that file (so both end durable),
with the page cache dropped before each. Reported: data bytes per second,
as recoverfs / qemu-img, and each side's CPU-seconds per GiB read (the
client process's user + system time; QEMU serving the export is the same
for both and reported apart).

Writes docs/benchmarks-vmbackup.json and the "## Backups of running VMs"
section of docs/benchmarks.md. Needs root, qemu-system-x86, qemu-utils and
the tiny image.
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
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402

ROOT = B.ROOT
OUT_JSON = os.path.join(ROOT, "docs", "benchmarks-vmbackup.json")
HEAD = "\n## Backups of running VMs\n"
MiB = 1 << 20
WRITERS = {"busy": 0, "mid": 50, "slow": 500}   # pause between writes, ms
DATA_MIB = 160
TP_MIB = 512
# Write-latency histogram bin edges, ns: 10 µs .. 4 s, about 12 per decade.
BOUNDS = sorted({int(10_000 * 10 ** (i / 12)) for i in range(0, 67)})


class Qmp:
    """A minimal QMP client (one command at a time)."""

    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rwb")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error'].get('desc')}")

    def close(self):
        self.s.close()


def write_random(path, mib, seed):
    import random
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(rnd.randbytes(MiB))


def writer_disk(path):
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        # Far more writes than a run makes, each in a new 64 KiB cluster
        # (stride 128 sectors) over a ring of 131000 sectors, as scattered
        # writes would land: every write while a view is open copies a
        # cluster aside, until the ring wraps.
        f.write(b"RECOVERFS-WRITER%08d%08d%08d%08d" % (99999999, 0, 131000, 128))


def start_vm(scope, name, pause_ms, tiny, data_mib=DATA_MIB):
    boot = scope.path(f"{name}-boot.raw")
    subprocess.run(["cp", "--sparse=always", tiny, boot], check=True)
    wr = scope.path(f"{name}-writer.raw")
    writer_disk(wr)
    with open(wr, "r+b") as f:
        f.seek(24)
        f.write(b"%08d" % pause_ms)
    data = scope.path(f"{name}-data.raw")
    write_random(data, data_mib, hash(name) & 0xFFFF)
    qmp, mon, console = scope.sock(f"{name}-qmp"), scope.sock(f"{name}-mon"), scope.path(f"{name}.console")
    scope.spawn(name, [
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-m", "128", "-no-reboot",
        "-serial", f"file:{console}",
        "-qmp", f"unix:{qmp},server=on,wait=off", "-qmp", f"unix:{mon},server=on,wait=off",
        "-drive", f"file={boot},format=raw,if=none,id=boot",
        "-device", "virtio-blk-pci,drive=boot,id=vboot",
        "-drive", f"file={wr},format=raw,if=none,id=writer",
        "-device", "virtio-blk-pci,drive=writer,id=vwriter",
        "-drive", f"file={data},format=raw,if=none,id=data",
        "-device", "virtio-blk-pci,drive=data,id=vdata",
    ])
    return {"name": name, "qmp": qmp, "mon": mon, "console": console}


def wait_writers(vms, timeout=300):
    deadline = time.monotonic() + timeout
    for v in vms:
        while b"RECOVERFS-WRITER start" not in open(v["console"], "rb").read():
            if time.monotonic() > deadline:
                sys.exit(f"{v['name']}: the guest writer did not start")
            time.sleep(0.2)


class HistogramPoller(threading.Thread):
    """Samples each VM's cumulative write-latency histogram of its writer
    disk every 100 ms: (monotonic-free wall time, bins)."""

    def __init__(self, vms):
        super().__init__(daemon=True)
        self.mons = {}
        for v in vms:
            q = Qmp(v["mon"])
            q.cmd("block-latency-histogram-set", {"id": "/machine/peripheral/vwriter/virtio-backend", "boundaries-write": BOUNDS})
            self.mons[v["name"]] = q
        self.samples = {n: [] for n in self.mons}
        self.stop = threading.Event()

    def sample(self):
        for name, q in self.mons.items():
            for d in q.cmd("query-blockstats"):
                if d.get("qdev", "").endswith("vwriter/virtio-backend") or d.get("device") == "writer":
                    h = d["stats"].get("wr_latency_histogram")
                    if h:
                        self.samples[name].append((time.time(), h["bins"]))

    def run(self):
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.1)

    def delta_between(self, name, t0, t1):
        """Bin counts of the writes between wall times t0 and t1 (None if
        the samples do not cover the window)."""
        s = self.samples[name]
        before = [b for t, b in s if t <= t0]
        after = [b for t, b in s if t >= t1]
        if not before or not after:
            return None
        return [a - b for a, b in zip(after[0], before[-1])]

    def p99_between(self, name, t0, t1):
        """p99 (ms, bin upper edge) of writes between wall times t0 and t1."""
        return p99_of(self.delta_between(name, t0, t1))


def p99_of(delta):
    """(p99 in ms as its bin's upper edge, count) of a histogram delta."""
    n = sum(delta or [])
    if n == 0:
        return None, 0
    need, acc = 0.99 * n, 0
    for i, c in enumerate(delta):
        acc += c
        if acc >= need:
            edge = BOUNDS[i] if i < len(BOUNDS) else BOUNDS[-1] * 10
            return edge / 1e6, n
    return None, n


def wall(at):
    """An event's RFC 3339 wall time as seconds since the epoch."""
    from datetime import datetime
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def order_run(scope, vms, poller, order, rnd):
    repo = scope.path(f"repo-{order}-{rnd}")
    args = [B.BIN, "backup-vms", "--repo", repo, "--jobs", "1", "--rate-window", "2",
            "--order", order, "--json", "--chunk-size", "1M"]
    for v in vms:
        args += ["--vm", f"{v['name']}={v['qmp']}"]
    r = B.run(args, timeout=900)
    summ = json.loads(r.stdout)
    time.sleep(0.3)   # one more histogram sample after the last release
    out = {"order": order, "vms": {}}
    for v in summ["vms"]:
        ev = {e["event"]: wall(e["at"]) for e in v["events"]}
        p99, n = poller.p99_between(v["vm"], ev["resumed"], ev["view_released"])
        out["vms"][v["vm"]] = {"read_order": v["order"], "cbw_bytes": v["cbw_bytes"],
                               "open_s": ev["view_released"] - ev["resumed"],
                               "write_p99_ms": p99, "writes": n, "write_rate": v["write_rate"],
                               "paused_ms": v["paused_ms"]}
    out["cbw_total"] = sum(x["cbw_bytes"] for x in out["vms"].values())
    shutil.rmtree(repo, ignore_errors=True)
    return out


def section_order(work, rounds_n, tiny):
    with B.Scope(work, "order") as scope:
        vms = [start_vm(scope, n, p, tiny) for n, p in WRITERS.items()]
        wait_writers(vms)
        poller = HistogramPoller(vms)
        poller.start()
        time.sleep(3)
        rounds = []
        try:
            for rnd in range(rounds_n):
                arms = ["busiest-first", "idle-first"]
                if rnd % 2:
                    arms.reverse()
                this = {}
                for arm in arms:
                    B.log(f"order round {rnd + 1}/{rounds_n}: {arm}")
                    this[arm] = order_run(scope, vms, poller, arm, rnd)
                    B.log(f"  cbw {this[arm]['cbw_total'] / MiB:.1f} MiB, p99 " + ", ".join(
                        f"{n} {x['write_p99_ms']}" for n, x in this[arm]["vms"].items()))
                rounds.append(this)
        finally:
            poller.stop.set()
        return rounds


def cpu_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def timed(args, env=None):
    """Runs `args`; wall seconds and the child's CPU seconds."""
    with tempfile.TemporaryFile() as errf:
        t0 = time.monotonic()
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=errf, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall_s = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped above
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    return wall_s, ru.ru_utime + ru.ru_stime, err


def tp_disk(path):
    import random
    rnd = random.Random(42)
    page = (b"recoverfs benchmark text page: the quick brown fox jumps over the lazy dog. " * 60)[:4096]
    with open(path, "wb") as f:
        for _ in range(256):
            f.write(rnd.randbytes(MiB))
        for _ in range(128):
            f.write(page * (MiB // 4096))
        f.truncate(TP_MIB * MiB)


def open_view(q, sock_path, tmp):
    """The copy-before-write view `backup-vms` opens (QEMU's image
    fleecing), exported as `view` on `sock_path`."""
    q.cmd("blockdev-add", {"node-name": "tp-tmp", "driver": "file", "filename": tmp})
    q.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "tp-cbw",
                           "file": "tp-src", "target": "tp-tmp"})
    q.cmd("qom-set", {"path": "/machine/peripheral/vtp", "property": "drive", "value": "tp-cbw"})
    q.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "tp-access", "file": "tp-cbw"})
    q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock_path}}})
    q.cmd("block-export-add", {"type": "nbd", "id": "tp", "node-name": "tp-access", "name": "view"})


def section_throughput(work, rounds_n):
    with B.Scope(work, "throughput") as scope:
        disk = scope.path("tp.raw")
        tp_disk(disk)
        tmp = scope.path("cbw.tmp")
        open(tmp, "wb").truncate(TP_MIB * MiB)
        qmp, nbd = scope.sock("tp-qmp"), scope.sock("tp-nbd")
        qemu = scope.spawn("tp-vm", [
            "qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-m", "64",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-blockdev", f"driver=file,filename={disk},node-name=tp-file,cache.direct=off",
            "-blockdev", "driver=raw,file=tp-file,node-name=tp-src",
            "-device", "virtio-blk-pci,drive=tp-src,id=vtp"])
        q = Qmp(qmp)
        open_view(q, nbd, tmp)
        url = f"nbd+unix:///view?socket={nbd}"
        data_bytes = 384 * MiB
        rounds = []
        for rnd in range(rounds_n):
            arms = ["recoverfs", "qemu-img"] if rnd % 2 == 0 else ["qemu-img", "recoverfs"]
            this = {}
            # The ceiling: the disk file itself read sequentially from the device.
            B.drop_caches()
            w, _, _ = timed(["dd", f"if={disk}", "of=/dev/null", "bs=4M"])
            this["device_mb_s"] = TP_MIB / w
            for arm in arms:
                B.drop_caches()
                q0 = cpu_of(qemu.pid)
                if arm == "recoverfs":
                    repo = scope.path(f"repo-{rnd}")
                    w, cpu, err = timed([B.BIN, "backup", "--repo", repo, "--vm", "tp",
                                         "--chunk-size", "1M", url])
                    if "read in" not in err:
                        sys.exit(f"recoverfs backup failed: {err[-500:]}")
                    shutil.rmtree(repo, ignore_errors=True)
                else:
                    out = scope.path(f"out-{rnd}.raw")
                    w1, cpu, err = timed(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                          "-m", "16", "-W", url, out])
                    if not os.path.exists(out):
                        sys.exit(f"qemu-img convert failed: {err[-500:]}")
                    w2, cpu2, _ = timed(["sync", out])
                    w, cpu = w1 + w2, cpu + cpu2
                    os.unlink(out)
                server = cpu_of(qemu.pid) - q0
                this[arm] = {"wall_s": w, "cpu_s": cpu, "server_cpu_s": server,
                             "mb_s": data_bytes / MiB / w, "cpu_s_per_gib": cpu / (data_bytes / (1 << 30))}
                B.log(f"throughput round {rnd + 1}/{rounds_n}: {arm} {this[arm]['mb_s']:.0f} MiB/s, "
                      f"{this[arm]['cpu_s_per_gib']:.2f} CPU-s/GiB")
            rounds.append(this)
        q.close()
        return rounds


def med_spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, None
    return statistics.median(xs), min(xs), max(xs)


def ratios(res):
    rows = []
    o = res["order"]
    r = [x["busiest-first"]["cbw_total"] / max(x["idle-first"]["cbw_total"], 1) for x in o]
    rows.append(("copy-before-write bytes, all views", "busiest-first / idle-first", r,
                 [x["busiest-first"]["cbw_total"] / MiB for x in o], [x["idle-first"]["cbw_total"] / MiB for x in o], "MiB"))
    for vm in WRITERS:
        b = [x["busiest-first"]["vms"][vm]["write_p99_ms"] for x in o]
        i = [x["idle-first"]["vms"][vm]["write_p99_ms"] for x in o]
        rr = [bb / ii if bb and ii else None for bb, ii in zip(b, i)]
        rows.append((f"guest write p99 while its view is open: {vm}", "busiest-first / idle-first", rr, b, i, "ms"))
    t = res["throughput"]
    rows.append(("view read throughput", "recoverfs backup / qemu-img convert",
                 [x["recoverfs"]["mb_s"] / x["qemu-img"]["mb_s"] for x in t],
                 [x["recoverfs"]["mb_s"] for x in t], [x["qemu-img"]["mb_s"] for x in t], "MiB/s"))
    rows.append(("client CPU-seconds per GiB read", "recoverfs backup / qemu-img convert",
                 [x["recoverfs"]["cpu_s_per_gib"] / x["qemu-img"]["cpu_s_per_gib"] for x in t],
                 [x["recoverfs"]["cpu_s_per_gib"] for x in t], [x["qemu-img"]["cpu_s_per_gib"] for x in t], "s/GiB"))
    return rows


def render(res):
    rows = ratios(res)
    n_o, n_t = len(res["order"]), len(res["throughput"])
    lines = [HEAD.strip(), "",
             f"Run {res['when']}{' (quick)' if res['quick'] else ''}: {n_o} interleaved rounds of the "
             f"order comparison, {n_t} of the throughput comparison; median [min–max] over rounds. "
             f"Load average at the start: {res.get('loadavg_start', '?')} on {os.cpu_count()} CPUs.", "",
             "| row | ratio | median [spread] | ours | baseline | why the baseline is fair |",
             "|---|---|---|---|---|---|"]
    why = {
        "copy": "the same three VMs and writers, the same run, one backup after the other into fresh repositories; only the read order differs",
        "guest": "the same VM, writer and histogram; the window is each VM's own view lifetime in each arm",
        "view": "the same NBD export of the same view, page cache dropped before each; qemu-img reads 16 requests in flight with out-of-order writes (its fastest settings), and its output is synced so both end durable",
        "client": "the same bytes read over the same export; QEMU's own CPU for serving is the same for both (below)",
    }
    for name, what, r, ours, base, unit in rows:
        m, lo, hi = med_spread(r)
        mo, bo = med_spread(ours)[0], med_spread(base)[0]
        fair = next(v for k, v in why.items() if name.startswith(k))
        cell = f"{m:.2f} [{lo:.2f}–{hi:.2f}]" if m is not None else "n/a"
        fo = f"{mo:.1f} {unit}" if mo is not None else "n/a"
        fb = f"{bo:.1f} {unit}" if bo is not None else "n/a"
        lines.append(f"| {name} | {what} | {cell} | {fo} | {fb} | {fair} |")
    t = res["throughput"]
    srv = {a: statistics.median(x[a]["server_cpu_s"] for x in t) for a in ("recoverfs", "qemu-img")}
    dev = statistics.median(x["device_mb_s"] for x in t)
    lines += ["", f"QEMU's CPU serving the export, median per run: {srv['recoverfs']:.2f} s under recoverfs, "
              f"{srv['qemu-img']:.2f} s under qemu-img. The ceiling: the view's disk file read "
              f"sequentially from the device after dropping caches, {dev:.0f} MiB/s (whole file, "
              "holes included).", "", res.get("analysis", "")]
    return "\n".join(lines) + "\n"


def analysis(res):
    rows = ratios(res)
    cbw = med_spread(rows[0][2])[0]
    tp = med_spread(rows[-2][2])[0]
    notes = []
    if cbw is not None:
        notes.append(f"Busiest-first copied {cbw:.2f}× the bytes idle-first copied before write: the busy VM's "
                     "view is released after one VM's read instead of three.")
    if tp is not None:
        notes.append(f"Reading a view, recoverfs reached {tp:.2f}× qemu-img convert's throughput; "
                     "it keeps one NBD request in flight per disk while hashing and compressing on a "
                     "worker pool, where qemu-img keeps 16 in flight and does no hashing or compression."
                     if tp < 1 else
                     f"Reading a view, recoverfs reached {tp:.2f}× qemu-img convert's throughput.")
    return " ".join(notes)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--render-only", action="store_true")
    a = ap.parse_args()
    if a.render_only:
        res = json.load(open(OUT_JSON))
        res["analysis"] = analysis(res)
        B.replace_section(HEAD, render(res))
        return
    if os.geteuid() != 0:
        sys.exit("run as root (drop_caches)")
    if not os.path.exists(B.BIN):
        sys.exit(f"{B.BIN} not found: run `cargo build --release` first")
    rounds_n = a.rounds or (2 if a.quick else 5)
    tiny = subprocess.run([os.path.join(ROOT, "vm-images", "build.sh"), "tiny"], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    B.SOCK_DIR = tempfile.mkdtemp(prefix="/tmp/rfsv")
    work = tempfile.mkdtemp(prefix="recoverfs-vmbackup-", dir="/var/tmp")
    try:
        res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": a.quick,
               "loadavg_start": B.loadavg()}
        res["throughput"] = section_throughput(work, rounds_n)
        res["order"] = section_order(work, rounds_n, tiny)
        res["analysis"] = analysis(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(B.SOCK_DIR, ignore_errors=True)
    B.write_results(OUT_JSON, res, HEAD, render(res))


if __name__ == "__main__":
    main()
