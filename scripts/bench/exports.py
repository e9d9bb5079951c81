#!/usr/bin/env python3
"""The NFS and NBD exports next to FUSE, same work, same run.

    python3 scripts/bench/exports.py [--quick]

Every system is read by the same client, `qemu-img bench` (QEMU's block
layer: its file, nbd and nfs drivers), with 16 requests in flight, in
interleaved rounds; the tables give medians, the spread (min..max) and CPU
seconds per GiB of the serving process and of the client.

Warm: the disk is fully staged and the staging file is hot in the page cache.
Baseline: the staging file read the same way the daemon reads it (buffered,
hot). Peers export *the same staged file*: qemu-storage-daemon (NBD export,
cache.direct=off) and nbdkit's file plugin (NBD), nfs-ganesha (VFS FSAL) for
NFS if it runs here. The FUSE row uses O_DIRECT so that every read reaches
the daemon (a buffered FUSE read would be served by the kernel's page cache
and measure nothing of ours).

Cold: fresh staging every round, the repository a local directory with the
same 2 ms delay before every chunk read (`serve --repo-delay-ms`); the peer is
nbdkit exporting the raw image through its cache filter (1 MiB blocks, the
chunk size) over its delay filter at the same 2 ms per read, its best
configuration for this. Reads are first touches of their chunk.

Writes docs/benchmarks-exports.json and the "## Exports" section of
docs/benchmarks.md (replacing an earlier one). Needs root, qemu-utils,
qemu-block-extra, nbdkit, qemu-storage-daemon; installs nothing.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402  (the shared harness: scopes, processes, mounts)

ROOT = B.ROOT
OUT_JSON = os.path.join(ROOT, "docs", "benchmarks-exports.json")
MiB = 1 << 20
HOST = "127.0.0.61"           # the daemon's NFS and NBD address
NBD_PORT = 10809
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of a process and its threads."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return 0.0


def children_cpu():
    r = os.times()
    return r.children_user + r.children_system


def bench(target, fmt_args, size, step, count, depth=16, cache="writeback", netns=None):
    """One qemu-img bench read run: (seconds, client CPU seconds)."""
    args = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth),
            "-s", str(size), "-S", str(step), "-t", cache, "-i", "threads"] + fmt_args + [target]
    if netns:
        args = ["ip", "netns", "exec", netns] + args
    c0 = children_cpu()
    r = B.run(args, timeout=900)
    m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    if not m:
        raise RuntimeError(f"qemu-img bench: no timing in {r.stdout!r}")
    return float(m.group(1)), children_cpu() - c0


WORKLOADS = {
    # name: (request size, stride, passes over the disk, label)
    "seq": (MiB, MiB, 2, "sequential 1 MiB reads, 16 in flight"),
    "rand": (4096, 64 << 10 | 4096, 8, "4 KiB reads at a 68 KiB stride (qemu-img bench has no random pattern), 16 in flight"),
    "seq-cold": (MiB, MiB, 1, "sequential 1 MiB reads, one pass, 16 in flight"),
    "rand-cold": (4096, 1 << 20 | 4096, 1, "4 KiB reads, each the first touch of its chunk (stride 1 MiB + 4 KiB), 16 in flight"),
}


def counts(disk_bytes, name):
    """Requests of a run; qemu-img bench wraps around at the end."""
    size, step, passes, _ = WORKLOADS[name]
    return max(16, passes * ((disk_bytes - size) // step))


class System:
    """Something that serves a disk to qemu-img bench."""

    def __init__(self, name, target, pid_fn, cache="writeback", netns=None, note=""):
        self.name, self.target, self.pid_fn = name, target, pid_fn
        self.cache, self.netns, self.note = cache, netns, note

    def measure(self, name, disk_bytes):
        size, step, _, _ = WORKLOADS[name]
        n = counts(disk_bytes, name)
        pid = self.pid_fn() if self.pid_fn else None
        s0 = cpu_seconds(pid) if pid else 0.0
        secs, client = bench(self.target, [], size, step, n, cache=self.cache, netns=self.netns)
        server = (cpu_seconds(pid) - s0) if pid else 0.0
        gib = n * size / (1 << 30)
        return {"seconds": secs, "mb_s": n * size / secs / 1e6, "iops": n / secs,
                "server_cpu_s_per_gib": server / gib if pid else None,
                "client_cpu_s_per_gib": client / gib}


def summarize(samples):
    v = sorted(x["mb_s"] for x in samples)
    iops = sorted(x["iops"] for x in samples)
    def med(key):
        vals = [x[key] for x in samples if x.get(key) is not None]
        return statistics.median(vals) if vals else None
    return {"mb_s": statistics.median(v), "min_mb_s": v[0], "max_mb_s": v[-1],
            "iops": statistics.median(iops), "rounds": len(samples),
            "server_cpu_s_per_gib": med("server_cpu_s_per_gib"),
            "client_cpu_s_per_gib": med("client_cpu_s_per_gib"),
            "samples": samples}


def start_daemon(scope, repo, name, extra=()):
    sock = scope.sock("nbd")
    d = B.Recoverfs(scope, repo, name=name, args=[
        "--no-profile", "--no-default-profile", "--nfs", HOST,
        "--nbd", f"{HOST}:{NBD_PORT}", "--nbd", f"unix:{sock}", *extra]).start()
    d.nbd_sock = sock
    return d


def recoverfs_systems(d, vm):
    fuse = d.recover(vm)
    pid = lambda: d.proc.pid  # noqa: E731
    return [
        System("recoverfs FUSE (O_DIRECT)", fuse, pid, cache="none"),
        System("recoverfs NFS", f"nfs://{HOST}/{vm}/disk0.raw", pid),
        System("recoverfs NBD (TCP)", f"nbd://{HOST}:{NBD_PORT}/{vm}/disk0", pid),
        System("recoverfs NBD (Unix socket)", f"nbd+unix:///{vm}/disk0?socket={d.nbd_sock}", pid),
    ]


def socket_ready(path):
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# QEMU 7.2's NBD server does not set TCP_NODELAY: at 16 requests in flight
# its TCP replies wait for delayed ACKs (about 370 4 KiB reads/s here). The
# peers are measured over Unix sockets, their best configuration.
QSD_NAME = "qemu-storage-daemon NBD, Unix socket (same staged file)"


def qsd_peer(scope, path):
    sock = scope.sock("qsd")
    p = scope.spawn("qsd", ["qemu-storage-daemon",
                            "--blockdev", f"driver=file,node-name=f,filename={path},cache.direct=off,aio=threads",
                            "--nbd-server", f"addr.type=unix,addr.path={sock}",
                            "--export", "type=nbd,id=e,node-name=f,name=disk0,writable=off"])
    B.wait_for(lambda: socket_ready(sock), 20, "qemu-storage-daemon", p, scope)
    return System(QSD_NAME, f"nbd+unix:///disk0?socket={sock}", lambda: p.pid)


def nbdkit_file_peer(scope, path):
    sock = scope.sock("nbdkit")
    p = scope.spawn("nbdkit-file", ["nbdkit", "-f", "-r", "-U", sock, "file", path])
    B.wait_for(lambda: socket_ready(sock), 20, "nbdkit", p, scope)
    return System("nbdkit file plugin NBD, Unix socket (same staged file)", f"nbd+unix:///?socket={sock}",
                  lambda: p.pid)


COLD_PEER = "nbdkit cache+delay NBD, Unix socket (raw image, 1 MiB cache blocks)"


def nbdkit_cold_peer(scope, image, delay_ms):
    sock = scope.sock("nbdkit-cold")
    p = scope.spawn("nbdkit-cold", ["nbdkit", "-f", "-r", "-U", sock,
                                     "--filter=cache", "--filter=delay", "file", image,
                                     f"rdelay={delay_ms}ms", "cache-min-block-size=1M"])
    B.wait_for(lambda: socket_ready(sock), 20, "nbdkit", p, scope)
    return System(COLD_PEER, f"nbd+unix:///?socket={sock}", lambda: p.pid)


def ganesha_peer(scope, session_dir):
    """nfs-ganesha (VFS FSAL) exporting the staging session directory, in a
    network namespace of its own (it needs its own rpcbind on port 111).
    Returns a System, or the reason it cannot run here."""
    if not shutil.which("ganesha.nfsd") or not shutil.which("rpcbind"):
        return "nfs-ganesha or rpcbind is not installed (Debian packages nfs-ganesha, nfs-ganesha-vfs, rpcbind)"
    ns = f"rfsg{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    B.run(["ip", "netns", "add", ns])
    scope.netns = ns
    B.run(["ip", "-n", ns, "link", "set", "lo", "up"])
    conf = scope.path("ganesha.conf")
    with open(conf, "w") as f:
        f.write(f"""NFS_CORE_PARAM {{ Protocols = 3; Enable_NLM = false; Enable_RQUOTA = false; }}
NFSV4 {{ Graceless = true; }}
EXPORT {{ Export_Id = 1; Path = {session_dir}; Pseudo = /x; Access_Type = RO; Squash = No_Root_Squash;
         Protocols = 3; Transports = TCP; SecType = sys; FSAL {{ Name = VFS; }} }}
LOG {{ Default_Log_Level = WARN; }}
""")
    scope.spawn("rpcbind", ["ip", "netns", "exec", ns, "rpcbind", "-f", "-w"])
    time.sleep(0.5)
    g = scope.spawn("ganesha", ["ip", "netns", "exec", ns, "ganesha.nfsd", "-F", "-f", conf,
                                "-L", scope.path("ganesha-own.log"), "-p", scope.path("ganesha.pid")])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = subprocess.run(["ip", "netns", "exec", ns, "nfs-ls", f"nfs://127.0.0.1{session_dir}"],
                           capture_output=True, text=True)
        if r.returncode == 0 and "disk0.data" in r.stdout:
            pid = lambda: int(open(scope.path("ganesha.pid")).read().strip())  # noqa: E731
            return System("nfs-ganesha NFS (same staged file)", f"nfs://127.0.0.1{session_dir}/disk0.data",
                          pid, netns=ns)
        if g.poll() is not None:
            break
        time.sleep(0.5)
    return "nfs-ganesha did not serve here: " + (scope.log_tail("ganesha", 4) or "no answer within 30 s")


def interleave(systems, work, rounds, disk_bytes, before=None):
    out = {s.name: {w: [] for w in work} for s in systems}
    for r in range(rounds):
        for w in work:
            for s in systems:
                if before:
                    before(s, w)
                out[s.name][w].append(s.measure(w, disk_bytes))
        B.log(f"round {r + 1}/{rounds} done")
    return {name: {w: summarize(v) for w, v in per.items()} for name, per in out.items()}


def section_warm(work, rounds, disk_mib):
    B.log("warm: staging the whole disk")
    with B.Scope(work, "exports-warm") as scope:
        scope.netns = None
        image = B.make_image(scope.path("disk.raw"), disk_mib * MiB)
        repo = scope.path("repo")
        B.backup(repo, "vm", image)
        d = start_daemon(scope, repo, "recoverfs")
        systems = recoverfs_systems(d, "vm")
        fuse = systems[0].target
        with open(fuse, "rb") as f:
            while f.read(8 * MiB):
                pass
        B.run([B.BIN, "status", "--socket", d.socket])
        data = d.data_file("vm")
        subprocess.run(["cat", data], stdout=subprocess.DEVNULL)
        base = System("staging file read directly (buffered, hot)", data, None)
        peers = [qsd_peer(scope, data), nbdkit_file_peer(scope, data)]
        ganesha = ganesha_peer(scope, os.path.dirname(data))
        if isinstance(ganesha, System):
            peers.append(ganesha)
        all_systems = [base] + systems + peers
        res = interleave(all_systems, ["seq", "rand"], rounds, disk_mib * MiB)
        if scope.netns:
            subprocess.run(["ip", "netns", "del", scope.netns], capture_output=True)
        return {"results": res, "baseline": base.name, "systems": [s.name for s in all_systems],
                "ganesha": None if isinstance(ganesha, System) else ganesha, "disk_mib": disk_mib}


def section_cold(work, rounds, disk_mib, delay_ms):
    B.log("cold: fresh staging every round")
    with B.Scope(work, "exports-cold") as scope:
        image = B.make_image(scope.path("disk.raw"), disk_mib * MiB)
        repo = scope.path("repo")
        B.backup(repo, "vm", image)
        state = {}

        def fresh(s, w):
            """Every recoverfs measurement starts from empty staging; the
            peer from an empty cache."""
            if s.name.startswith("recoverfs"):
                if "d" in state:
                    state["d"].stop_and_drop_staging()
                n = state.get("n", 0) + 1
                state["n"] = n
                d = start_daemon(scope, repo, f"rfs{n}", extra=["--repo-delay-ms", str(delay_ms)])
                state["d"] = d
                targets = {x.name: x.target for x in recoverfs_systems(d, "vm")}
                s.target = targets[s.name]
                s.pid_fn = lambda: state["d"].proc.pid
            else:
                if "peer" in state:
                    B.stop_process(state["peer"])
                p = nbdkit_cold_peer(scope, image, delay_ms)
                state["peer"] = scope.procs[-1]
                s.pid_fn, s.target = p.pid_fn, p.target

        systems = [System(n, "", None, cache=("none" if "FUSE" in n else "writeback"))
                   for n in ("recoverfs FUSE (O_DIRECT)", "recoverfs NFS", "recoverfs NBD (TCP)",
                             "recoverfs NBD (Unix socket)")]
        systems.append(System(COLD_PEER, "", None))
        res = interleave(systems, ["seq-cold", "rand-cold"], rounds, disk_mib * MiB, before=fresh)
        return {"results": res, "baseline": "recoverfs FUSE (O_DIRECT)", "systems": [s.name for s in systems],
                "delay_ms": delay_ms, "disk_mib": disk_mib}


def table(sec, title, baseline_note, peer_prefixes, work):
    L = [f"### {title}", "", baseline_note, ""]
    base = sec["baseline"]
    for w in work:
        L.append(f"**{WORKLOADS[w][3]}** ({sec['results'][base][w]['rounds']} interleaved rounds)")
        L.append("")
        L.append("| system | median | spread (min..max) | vs baseline | vs best peer of its protocol | server CPU s/GiB | client CPU s/GiB |")
        L.append("|---|---|---|---|---|---|---|")
        b = sec["results"][base][w]["mb_s"]
        # A frontend is compared with the peers speaking its protocol.
        def proto(n):
            return "NFS" if " NFS" in n else "NBD" if " NBD" in n else "FUSE" if "FUSE" in n else "file"
        best = {}
        for n, r in sec["results"].items():
            if n.startswith(peer_prefixes):
                best[proto(n)] = max(best.get(proto(n), 0), r[w]["mb_s"])
        for name in sec["systems"]:
            r = sec["results"][name][w]
            seq = w.startswith("seq")
            val = f"{r['mb_s']:.0f} MB/s" if seq else f"{r['iops']:.0f} IOPS"
            spread = (f"{r['min_mb_s']:.0f}..{r['max_mb_s']:.0f} MB/s" if seq
                      else f"{r['min_mb_s'] * 1e6 / 4096:.0f}..{r['max_mb_s'] * 1e6 / 4096:.0f} IOPS")
            peer = best.get(proto(name))
            vs_best = f"{r['mb_s'] / peer:.2f}x" if peer and name.startswith("recoverfs") else ""
            cpu = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
            L.append(f"| {name} | {val} | {spread} | {r['mb_s'] / b:.2f}x | {vs_best} | "
                     f"{cpu(r['server_cpu_s_per_gib'])} | {cpu(r['client_cpu_s_per_gib'])} |")
        L.append("")
    return L


def render(res):
    w, c = res["warm"], res["cold"]
    L = ["", "## Exports (NFS and NBD)", "",
         f"`scripts/bench/exports.py`, {res['when']}. Every system is read by the same client, "
         "`qemu-img bench` (QEMU's file, nbd and nfs drivers), with 16 requests in flight; systems "
         "are interleaved within each round. Medians; the spread is the min..max over rounds. CPU "
         "is user+system seconds per GiB read, of the serving process (for recoverfs: the whole "
         "daemon) and of the client.", ""]
    L += table(w, f"Warm: {w['disk_mib']} MiB disk, fully staged, staging file hot in the page cache",
               "Baseline: the staging file read with the same client, buffered, hot: what every server "
               "here reads, the same way. Peers export the same staged file. Fair because every system "
               "serves the same bytes from the same page cache to the same client; only the serving "
               "path differs. The FUSE row reads with O_DIRECT so that every request reaches the daemon. "
               "The NBD peers are read over Unix sockets, their best configuration: QEMU 7.2's NBD server "
               "does not set TCP_NODELAY, and over TCP at 16 requests in flight it managed about 370 "
               "4 KiB reads/s here (delayed ACKs).",
               ("qemu-storage-daemon", "nbdkit", "nfs-ganesha"), ("seq", "rand"))
    if w.get("ganesha"):
        L.append(f"nfs-ganesha: not run — {w['ganesha']}")
        L.append("")
    L += table(c, f"Cold: {c['disk_mib']} MiB disk, fresh staging every round, {c['delay_ms']} ms per repository read",
               f"Baseline: recoverfs over FUSE with the same repository. The peer exports the raw image "
               f"through nbdkit's cache filter over its delay filter at the same {c['delay_ms']} ms per read, "
               "cache blocks the size of our chunks: the same backend latency and the same fetch size, "
               "its best configuration. Every read is the first touch of its chunk (the 4 KiB row), or "
               "part of a sequential first pass.",
               ("nbdkit",), ("seq-cold", "rand-cold"))
    L.append("Raw figures: `docs/benchmarks-exports.json`.")
    return "\n".join(L) + "\n"


HEAD = "\n## Exports (NFS and NBD)\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    B.SOCK_DIR = tempfile.mkdtemp(prefix="/tmp/rfsx")
    work = tempfile.mkdtemp(prefix="recoverfs-exports-", dir="/var/tmp")
    rounds = 3 if a.quick else 5
    try:
        res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "warm": section_warm(work, rounds, 256 if a.quick else 512),
               "cold": section_cold(work, 3, 512 if a.quick else 1024, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(B.SOCK_DIR, ignore_errors=True)
    B.write_results(OUT_JSON, res, HEAD, render(res))


if __name__ == "__main__":
    main()
