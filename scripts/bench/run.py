#!/usr/bin/env python3
"""recoverfs benchmark harness (Python 3 standard library only).

    python3 scripts/bench/run.py [--quick] [--sections warm,cold,boot,fleet] [--keep]
    python3 scripts/bench/run.py --render-only      # docs/benchmarks.json -> .md

Writes docs/benchmarks.md (tables) and docs/benchmarks.json (raw numbers),
and docs/boot-trace.json (the guest's disk reads during the recoverfs cold
boot).  Every figure is shown next to a baseline measured in the same run,
as a ratio, because the machine is shared and noisy.

Sections (each states its baseline and why it is the fair one):
  warm  warm.py: buffered reads with a hot page cache on the FUSE disk file,
        the staging file underneath (baseline) and bindfs and
        qemu-storage-daemon FUSE exports of that file.
  cold  cold.py: first touches with one backend for everyone (one Garage
        bucket behind one latency-proxy instance per system): recoverfs vs
        nbdkit curl and QEMU http + copy-on-read, read with fio's nbd engine;
        a raw-GET ceiling and a store-independent row (--repo-delay-ms vs
        nbdkit's delay filter); CPU-seconds per GiB and bytes fetched.
  boot  QEMU's time waiting in its disk reads beyond a local copy's, at
        20 ms/request and 100 MB/s, for recoverfs and the same peers on the
        same backend; then a replay of the guest's read trace.
  fleet fleet.py: 20 VMs recovering and reading first touches at once
        vs. one alone (recover time over the control API and with CLI
        processes; each VM's read p99 pooled over rounds).
Warm, cold and fleet run at least 5 interleaved rounds (median and spread).

Needs root (drop_caches, FUSE), fio, nbdkit, nbdfuse, qemu-system-x86,
qemu-utils, strace, a release build of recoverfs and Garage
(~/.cargo/bin/garage or GARAGE_BIN).  Every process and mount it creates is
removed on exit, also on failure or Ctrl-C.
"""
import argparse
import datetime
import glob
import json
import mmap
import os
import platform
import re
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "recoverfs")
PROXY = os.path.join(ROOT, "scripts", "latency-proxy.py")
DOCS = os.path.join(ROOT, "docs")
OUT_MD = os.path.join(DOCS, "benchmarks.md")
OUT_JSON = os.path.join(DOCS, "benchmarks.json")
OUT_TRACE = os.path.join(DOCS, "boot-trace.json")

FETCH_WORKERS = 16          # recoverfs serve --fetch-workers (alias of --fetches-in-flight, default 64; 16 matches the peers' 16 in flight, and a --baseline-bin binary knows only this name)
CHUNK = 1 << 20             # recoverfs backup --chunk-size (its default)
MiB = 1 << 20
BOOT_MARKER = b"RECOVERFS-DEBIAN-UP"
BOOT_LATENCY_MS = 20
BOOT_BANDWIDTH_MBPS = 100   # MB/s, latency-proxy --bandwidth-mbps semantics

T0 = time.monotonic()
SOCK_DIR = None   # short directory for Unix sockets, made in main()
REMOVE_SCOPES = False  # run.py's main() sets it unless --keep
SOCK_SEQ = 0


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------
# Processes and mounts: every one is registered in a Scope and removed when
# the scope ends, whatever happens.
# --------------------------------------------------------------------------

def mounted(path):
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp == path:
                    return True
    except OSError:
        pass
    return False


def mounted_under(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4].startswith(path + "/") for line in f)


def unmount(path):
    if not mounted(path):
        return
    r = subprocess.run(["fusermount3", "-u", path], capture_output=True)
    if r.returncode != 0 or mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    if mounted(path):
        subprocess.run(["umount", "-l", path], capture_output=True)


def children(pid):
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def stop_process(p, timeout=10):
    if p.poll() is not None:
        return
    try:
        p.terminate()
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    except ProcessLookupError:
        pass


class Scope:
    """Processes, mounts and directories owned by one experiment."""

    def __init__(self, workdir, name):
        self.name = name
        self.dir = os.path.join(workdir, name)
        if os.path.exists(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.procs = []
        self.mounts = []
        # Staging directories of recoverfs daemons, removed at close even
        # with --keep: a stopped daemon's kept sessions would otherwise make
        # the next daemon on the same repository refuse the VM as recovered
        # elsewhere (its pin names a staging directory that still exists).
        self.stagings = []
        # Run first at close, while the daemons still serve: each discards
        # its sessions, so their pins go with them (a next daemon on a
        # fresh staging at the same path, as the next round's is, would be
        # refused for sessions the repository says are kept there).
        self.closers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def path(self, *p):
        return os.path.join(self.dir, *p)

    def sock(self, name):
        """A Unix socket path short enough for sun_path (108 bytes): work
        directory paths can be longer."""
        global SOCK_SEQ
        SOCK_SEQ += 1
        return os.path.join(SOCK_DIR, f"{SOCK_SEQ}-{name}.sock")

    def spawn(self, name, args, env=None, stdout=None):
        logf = open(self.path(f"{name}.log"), "ab")
        p = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else logf,
            stderr=logf,
            env=env,
            start_new_session=True,
        )
        logf.close()
        p.bench_name = name
        p.bench_log = self.path(f"{name}.log")
        self.procs.append(p)
        return p

    def add_mount(self, path):
        self.mounts.append(path)

    def log_tail(self, name, n=15):
        try:
            with open(self.path(f"{name}.log"), errors="replace") as f:
                return re.sub(r"\x1b\[[0-9;]*m", "", "".join(f.readlines()[-n:])).strip()
        except OSError:
            return ""

    def close(self):
        for f in reversed(self.closers):
            try:
                f()
            except Exception:
                pass
        self.closers = []
        for p in reversed(self.procs):
            try:
                stop_process(p)
            except Exception:
                pass
        for m in reversed(self.mounts):
            try:
                unmount(m)
            except Exception:
                pass
        # A process blocked on a mount that was just detached: last chance.
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        self.procs, self.mounts = [], []
        for st in self.stagings:
            if not mounted_under(st):
                shutil.rmtree(st, ignore_errors=True)
        self.stagings = []
        if REMOVE_SCOPES and not mounted_under(self.dir):
            # Staging, repositories and images of a finished experiment:
            # dozens of runs would not fit on the disk otherwise.
            shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(cond, timeout, what, proc=None, scope=None):
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            tail = scope.log_tail(proc.bench_name) if scope else ""
            raise RuntimeError(f"{what}: {proc.bench_name} exited ({proc.returncode}): {tail}")
        if time.monotonic() > deadline:
            tail = scope.log_tail(proc.bench_name) if (scope and proc is not None) else ""
            raise RuntimeError(f"{what}: timed out after {timeout}s {tail}")
        time.sleep(0.05)


def run(args, env=None, timeout=600, check=True):
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])}... failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    return r


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class DamonPaused:
    """Pauses this VM's DAMON-based reclaim for a measurement that needs a
    hot page cache: it pages out page-cache pages it finds idle, recently
    read ones included, so a file read in full just before a job is not
    hot for the job (and which system loses pages is chance). Restored on
    exit. `paused` says whether it was on and is now off."""
    STATE = "/sys/kernel/mm/damon/admin/kdamonds/0/state"

    def __enter__(self):
        self.paused = False
        try:
            with open(self.STATE) as f:
                on = f.read().strip() == "on"
            if on:
                with open(self.STATE, "w") as f:
                    f.write("off")
                self.paused = True
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        if self.paused:
            with open(self.STATE, "w") as f:
                f.write("on")


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


# --------------------------------------------------------------------------
# fio
# --------------------------------------------------------------------------

def fio_job(outdir, name, target, rw, bs, qd, runtime, direct=0, engine="libaio", numjobs=1,
            time_based=True, extra=()):
    """One fio job on a file or, for an `nbd...` URI, through fio's nbd
    engine (libnbd, one connection per job).  numjobs > 1 splits the disk
    into numjobs regions (offset_increment), so parallel jobs never read the
    same bytes.  Returns the summed read figures."""
    out = os.path.join(outdir, f"fio-{name}-{int(time.time() * 1000)}.json")
    args = ["fio", f"--name={name}", "--readonly", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={qd}", f"--runtime={runtime}", "--output-format=json", f"--output={out}"]
    if target.startswith("nbd"):
        args += ["--ioengine=nbd", f"--uri={target}"]
    else:
        args += [f"--filename={target}", f"--direct={direct}", f"--ioengine={engine}"]
    if time_based:
        args.append("--time_based")
    if numjobs > 1:
        args += [f"--numjobs={numjobs}", "--group_reporting", f"--size={100 // numjobs}%",
                 f"--offset_increment={100 // numjobs}%"]
    args += list(extra)
    r = subprocess.run(args, capture_output=True, text=True, timeout=runtime * 4 + 300)
    try:
        with open(out) as f:
            j = json.load(f)
    except (OSError, ValueError):
        raise RuntimeError(f"fio {name} on {target} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    jb = j["jobs"][0]
    if jb.get("error"):
        raise RuntimeError(f"fio {name} on {target}: error {jb['error']} {(r.stderr or '').strip()[-300:]}")
    rd = jb["read"]
    return {"iops": rd["iops"], "mb_s": rd["bw_bytes"] / 1e6, "io_bytes": rd["io_bytes"],
            "ios": rd.get("total_ios", 0), "runtime_s": rd["runtime"] / 1000.0,
            "lat_mean_us": rd.get("lat_ns", {}).get("mean", 0) / 1000.0,
            "lat_p99_us": rd.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000.0}


# --------------------------------------------------------------------------
# Cost: CPU time and bytes of the processes that serve one system
# --------------------------------------------------------------------------

def _tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cpu_seconds(pids):
    """utime + stime (all threads) of `pids` and their descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in {q for p in pids for q in _tree(p)}:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def proxy_bytes(proc):
    """Response bytes the latency proxy `proc` has passed on so far (it
    prints "bytes N" on SIGUSR1 into its log)."""
    def last():
        try:
            with open(proc.bench_log) as f:
                found = re.findall(r"^bytes (\d+)$", f.read(), re.M)
            return len(found), int(found[-1]) if found else 0
        except OSError:
            return 0, 0
    n0, _ = last()
    os.kill(proc.pid, signal.SIGUSR1)
    wait_for(lambda: last()[0] > n0, 10, "latency proxy byte count", proc)
    return last()[1]


class Meter:
    """CPU-seconds of the serving processes and bytes through a latency
    proxy (its Popen), between start() and stop().  `pids` is a list, or a
    dict {role: pid} (e.g. system, garage, proxy): then stop() also gives
    each role's own CPU-seconds in `cpu_s_by` beside the total."""

    def __init__(self, pids, proxy=None):
        roles = pids if isinstance(pids, dict) else {str(i): p for i, p in enumerate(pids)}
        self.roles, self.proxy = {r: p for r, p in roles.items() if p}, proxy
        self.by_role = isinstance(pids, dict)

    def _now(self):
        return {r: cpu_seconds([p]) for r, p in self.roles.items()}

    def start(self):
        self.cpu0 = self._now()
        self.b0 = proxy_bytes(self.proxy) if self.proxy else None
        return self

    def stop(self):
        now = self._now()
        by = {r: now[r] - self.cpu0[r] for r in self.roles}
        out = {"cpu_s": sum(by.values())}
        if self.by_role:
            out["cpu_s_by"] = by
        if self.proxy:
            out["proxy_bytes"] = proxy_bytes(self.proxy) - self.b0
        return out


def spread(values):
    """Median and spread (min, max) of a list of samples."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v), "samples": v}


def fmt_spread(s, d=0, unit=""):
    if not s:
        return "—"
    if s["n"] == 1:
        return f"{s['median']:,.{d}f}{unit}"
    return f"{s['median']:,.{d}f}{unit} ({s['min']:,.{d}f}–{s['max']:,.{d}f})"


# --------------------------------------------------------------------------
# recoverfs, Garage, latency proxy, peers
# --------------------------------------------------------------------------

class Recoverfs:
    """`recoverfs serve` in a scope. `args` are extra serve flags; the
    warm and cold sections pass --no-profile so no run is helped by a
    profile an earlier run recorded."""

    def __init__(self, scope, repo, env=None, name="recoverfs", args=(), bin=None, fetch_workers=FETCH_WORKERS):
        self.scope, self.repo, self.env, self.name = scope, repo, env, name
        self.fetch_workers = fetch_workers
        self.bin = bin or BIN
        self.args = list(args)
        self.staging = scope.path(f"{name}-staging")
        self.mount = scope.path(f"{name}-mnt")
        self.socket = scope.sock("control")
        os.makedirs(self.mount, exist_ok=True)

    def start(self):
        self.proc = self.scope.spawn(self.name, [
            self.bin, "serve", "--repo", self.repo, "--staging", self.staging,
            "--mount", self.mount, "--socket", self.socket,
            "--fetch-workers", str(self.fetch_workers)] + self.args, env=self.env)
        self.scope.add_mount(self.mount)
        self.scope.stagings.append(self.staging)
        self.scope.closers.append(self.discard_sessions)
        wait_for(lambda: os.path.exists(self.socket) and mounted(self.mount), 30,
                 "recoverfs serve", self.proc, self.scope)
        return self

    def discard_sessions(self):
        """Releases every session of a running daemon with --discard
        (its pin goes too); nothing if the daemon is gone."""
        if self.proc.poll() is not None:
            return
        r = run([self.bin, "status", "--socket", self.socket, "--json"], env=self.env, timeout=30, check=False)
        if r.returncode != 0:
            return
        for sess in json.loads(r.stdout).get("sessions", []):
            run([self.bin, "release", "--socket", self.socket, sess["vm"], "--discard"], env=self.env,
                timeout=120, check=False)

    def stop_and_drop_staging(self):
        """Stops the daemon and removes its staging (a throwaway one), so
        that a next daemon on the same repository may recover its VMs."""
        stop_process(self.proc)
        unmount(self.mount)
        if not mounted_under(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)

    def recover(self, vm, second_copy=False):
        """`second_copy`: a second daemon of the same repository serving
        the same VM at once (the repository's pin names the first)."""
        args = ["--second-copy"] if second_copy else []
        r = run([self.bin, "recover", "--socket", self.socket, vm] + args, env=self.env, timeout=120)
        disks = [l.strip() for l in r.stdout.splitlines() if l.startswith("/")]
        if not disks:
            raise RuntimeError(f"recover {vm}: no disk path in output: {r.stdout} {r.stderr}")
        return disks[0]

    def status(self, vm):
        r = run([self.bin, "status", "--socket", self.socket, "--json"], env=self.env, timeout=30)
        for s in json.loads(r.stdout)["sessions"]:
            if s["vm"] == vm:
                return s
        raise RuntimeError(f"no session for {vm}")

    def release(self, vm):
        """Ends the session; its first reads become a profile recording."""
        run([self.bin, "release", "--socket", self.socket, vm, "--discard"], env=self.env, timeout=120)

    def data_file(self, vm):
        files = glob.glob(os.path.join(self.staging, "sessions", vm, "*", "disk0.data"))
        if len(files) != 1:
            raise RuntimeError(f"staging data file not found: {files}")
        return files[0]


def backup(repo, vm, image, env=None, chunk="1M", bin=None):
    t = time.monotonic()
    r = run([bin or BIN, "backup", "--repo", repo, "--vm", vm, "--chunk-size", chunk, image],
            env=env, timeout=1800)
    return {"backup_id": r.stdout.strip().splitlines()[-1], "seconds": time.monotonic() - t,
            "summary": r.stderr.strip().splitlines()[-2:]}


def garage_bin():
    if os.environ.get("GARAGE_BIN"):
        return os.environ["GARAGE_BIN"]
    p = os.path.expanduser("~/.cargo/bin/garage")
    return p if os.path.exists(p) else "garage"


class Garage:
    """One Garage node on loopback, configured like tests/common/garage.rs."""
    BUCKET = "recoverfs-bench"

    def __init__(self, scope):
        self.scope = scope
        self.key_id = "GK" + secrets.token_hex(12)
        self.secret = secrets.token_hex(32)

    def start(self):
        d = self.scope.path("garage")
        os.makedirs(d)
        self.s3_port, rpc, admin = free_port(), free_port(), free_port()
        self.web_port = free_port()
        self.config = os.path.join(d, "garage.toml")
        with open(self.config, "w") as f:
            f.write(f'''metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secrets.token_hex(32)}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{self.s3_port}"
root_domain = ".s3.garage.localhost"
[s3_web]
bind_addr = "127.0.0.1:{self.web_port}"
root_domain = ".web.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "recoverfs-bench-admin"
''')
        env = dict(os.environ, RUST_LOG="warn")
        self.proc = self.scope.spawn("garage", [garage_bin(), "-c", self.config, "server"], env=env)
        wait_for(lambda: self.cli("status", check=False).returncode == 0, 30, "garage start",
                 self.proc, self.scope)
        node = self.cli("node", "id", "-q").stdout.strip().split("@")[0]
        self.cli("layout", "assign", "-z", "dc0", "-c", "1G", node)
        self.cli("layout", "apply", "--version", "1")
        self.cli("key", "import", "--yes", "-n", "bench", self.key_id, self.secret)
        wait_for(lambda: self.cli("bucket", "create", self.BUCKET, check=False).returncode == 0,
                 30, "garage bucket create", self.proc, self.scope)
        self.cli("bucket", "allow", "--read", "--write", "--owner", self.BUCKET, "--key", "bench")
        self.cli("bucket", "website", "--allow", self.BUCKET)
        return self

    def cli(self, *args, check=True):
        return run([garage_bin(), "-c", self.config, *args], check=check, timeout=60)

    def put_file(self, key, path):
        """Uploads `path` as one object (S3 PUT, SigV4, unsigned payload):
        the raw image the peers read with ranged GETs."""
        import hashlib
        import hmac
        import http.client
        now = datetime.datetime.now(datetime.timezone.utc)
        amz, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        host = f"127.0.0.1:{self.s3_port}"
        uri = f"/{self.BUCKET}/{key}"
        hdrs = {"host": host, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": amz}
        signed = ";".join(sorted(hdrs))
        canon = "\n".join(["PUT", uri, "", *(f"{k}:{hdrs[k]}" for k in sorted(hdrs)), "", signed,
                           "UNSIGNED-PAYLOAD"])
        scope = f"{day}/garage/s3/aws4_request"
        sts = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(canon.encode()).hexdigest()])
        k = ("AWS4" + self.secret).encode()
        for part in (day, "garage", "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
        conn = http.client.HTTPConnection("127.0.0.1", self.s3_port, timeout=600)
        with open(path, "rb") as body:
            conn.request("PUT", uri, body=body, headers={
                "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": amz,
                "Content-Length": str(os.path.getsize(path)),
                "Authorization": f"AWS4-HMAC-SHA256 Credential={self.key_id}/{scope}, "
                                 f"SignedHeaders={signed}, Signature={sig}"})
            r = conn.getresponse()
            text = r.read()
        conn.close()
        if r.status != 200:
            raise RuntimeError(f"PUT {key}: HTTP {r.status} {text[:300]!r}")

    def web_url(self, port, key):
        """Anonymous URL of `key` through Garage's web endpoint at `port`
        (a latency proxy in front of it): libcurl resolves *.localhost to
        loopback itself, and Garage picks the bucket from the Host name."""
        return f"http://{self.BUCKET}.web.localhost:{port}/{key}"

    def env(self, port=None):
        return dict(os.environ,
                    AWS_ACCESS_KEY_ID=self.key_id,
                    AWS_SECRET_ACCESS_KEY=self.secret,
                    AWS_ENDPOINT_URL=f"http://127.0.0.1:{port or self.s3_port}",
                    AWS_REGION="garage")


def start_proxy(scope, upstream_port, latency_ms, bandwidth_mbps=0, name=None):
    port = free_port()
    name = name or f"proxy-{latency_ms}ms"
    p = scope.spawn(name, [sys.executable, PROXY, "--listen", f"127.0.0.1:{port}",
                           "--upstream", f"127.0.0.1:{upstream_port}",
                           "--latency-ms", str(latency_ms),
                           "--bandwidth-mbps", str(bandwidth_mbps)])
    wait_for(lambda: "ready" in scope.log_tail(name, 5), 15, "latency proxy", p, scope)
    return port


def nbdkit_cache_peer(scope, image, latency_ms, rate_mbps=0, writable=False, url=None):
    """nbdkit file plugin + cache (on read) + delay, read through nbdfuse;
    with `url`, the curl plugin reading the raw image by ranged GETs (the
    latency is then the proxy's) + cache.  writable=True (for booting) adds
    the cow filter on top so the guest's writes never reach the image."""
    sock = scope.sock("nbdkit-cache")
    mnt = scope.path("nbd-mnt")
    os.makedirs(mnt)
    filters = ["--filter=cow"] if writable else []
    filters += ["--filter=cache"]
    params = ["cache=writeback", "cache-on-read=true"]
    if url:
        plugin = ["curl", url]
    else:
        plugin = ["file", image]
        params.append(f"delay-read={latency_ms}ms")
        if rate_mbps:
            filters.append("--filter=rate")
            params.append(f"rate={int(rate_mbps * 8)}M")
        filters.append("--filter=delay")
    env = dict(os.environ, TMPDIR=scope.dir)  # cache/cow files: fresh per scope
    p = scope.spawn("nbdkit", ["nbdkit", "-f", "-U", sock, *filters, *plugin, *params], env=env)
    wait_for(lambda: os.path.exists(sock), 15, "nbdkit", p, scope)
    args = ["nbdfuse"] + ([] if writable else ["-r"]) + [mnt, "--unix", sock]
    f = scope.spawn("nbdfuse", args)
    scope.add_mount(mnt)
    wait_for(lambda: mounted(mnt) and os.path.exists(os.path.join(mnt, "nbd")), 15, "nbdfuse", f, scope)
    return os.path.join(mnt, "nbd")


def qemu_cor_peer(scope, image, latency_ms, rate_mbps=0, writable=False, url=None):
    """nbdkit (delay only) as the backing of a qcow2 overlay with a
    copy-on-read filter, exported by qemu-storage-daemon over FUSE; with
    `url`, QEMU's own http driver reading the raw image by ranged GETs, and
    the overlay buffered (the peer at its best)."""
    if url:
        return qemu_http_cor_fuse(scope, url, os.path.getsize(image), writable)
    sock = scope.sock("nbdkit-delay")
    filters, params = [], [f"delay-read={latency_ms}ms"]
    if rate_mbps:
        filters.append("--filter=rate")
        params.append(f"rate={int(rate_mbps * 8)}M")
    filters.append("--filter=delay")
    p = scope.spawn("nbdkit", ["nbdkit", "-f", "-r", "-U", sock, *filters, "file", image, *params])
    wait_for(lambda: os.path.exists(sock), 15, "nbdkit", p, scope)
    size = os.path.getsize(image)
    ov = scope.path("ov.qcow2")
    run(["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", f"nbd+unix:///?socket={sock}",
         "-u", ov, str(size)], timeout=60)
    mnt = scope.path("qsd-mnt")
    os.makedirs(mnt)
    disk = os.path.join(mnt, "disk")
    open(disk, "w").close()
    export = f"type=fuse,id=e0,node-name=top,mountpoint={disk}"
    if writable:
        export += ",writable=on"
    q = scope.spawn("qsd", [
        "qemu-storage-daemon",
        "--blockdev", f"file,node-name=of,filename={ov},cache.direct=on",
        "--blockdev", f"nbd,node-name=bk,server.type=unix,server.path={sock},read-only=on",
        "--blockdev", "qcow2,node-name=ov,file=of,backing=bk",
        "--blockdev", "copy-on-read,node-name=top,file=ov",
        "--export", export])
    scope.add_mount(disk)
    wait_for(lambda: mounted(disk) and os.path.getsize(disk) == size, 20, "qemu-storage-daemon", q, scope)
    return disk


def qemu_http_cor_fuse(scope, url, size, writable):
    ov = scope.path("ov.qcow2")
    run(["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", url, "-u", ov, str(size)], timeout=60)
    disk = scope.path("qsd-disk")
    open(disk, "w").close()
    export = f"type=fuse,id=e0,node-name=top,mountpoint={disk}" + (",writable=on" if writable else "")
    q = scope.spawn("qsd", [
        "qemu-storage-daemon",
        "--blockdev", f"driver=http,node-name=bk,url={url},read-only=on",
        "--blockdev", f"file,node-name=of,filename={ov},cache.direct=off",
        "--blockdev", "qcow2,node-name=ov,file=of,backing=bk",
        "--blockdev", "copy-on-read,node-name=top,file=ov",
        "--export", export])
    scope.add_mount(disk)
    wait_for(lambda: mounted(disk) and os.path.getsize(disk) == size, 30, "qemu-storage-daemon", q, scope)
    return disk


# --------------------------------------------------------------------------
# Test image
# --------------------------------------------------------------------------

def make_image(path, size):
    """Random data with zero holes: every 8th MiB, and a 16 MiB hole at 1/3."""
    with open(path, "wb") as f:
        f.truncate(size)
        hole = range(size // 3 // MiB, size // 3 // MiB + 16)
        for i in range(size // MiB):
            if i % 8 == 5 or i in hole:
                continue
            f.seek(i * MiB)
            f.write(os.urandom(MiB))
    return path


# --------------------------------------------------------------------------
# Section 3+4: boot and boot-trace replay
# --------------------------------------------------------------------------

def qemu_boot(scope, disk, timeout, trace_file=None):
    """Boot with exactly the reference QEMU command line; return seconds from
    QEMU start to the console marker."""
    cmd = ["qemu-system-x86_64", "-nographic", "-m", "512", "-no-reboot",
           "-drive", f"file={disk},format=raw,if=virtio"]
    if trace_file:
        # seccomp-bpf: only the traced syscalls stop the tracee.
        cmd = ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=pread64,preadv,preadv2",
               "-T", "-tt", "-y", "-s", "0", "-o", trace_file] + cmd
    console = scope.path("console.log")
    p = scope.spawn("qemu", cmd, stdout=subprocess.PIPE)
    t0 = time.monotonic()
    buf = b""
    marker_s = None
    try:
        with open(console, "wb") as con:
            while True:
                left = timeout - (time.monotonic() - t0)
                if left <= 0:
                    break
                ready, _, _ = select.select([p.stdout], [], [], min(left, 1.0))
                if ready:
                    chunk = os.read(p.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    con.write(chunk)
                    buf = (buf + chunk)[-4096:]
                    if BOOT_MARKER in buf:
                        marker_s = time.monotonic() - t0
                        break
                elif p.poll() is not None:
                    break
    finally:
        # Stop QEMU itself (under strace, it is strace's child) so strace
        # writes out its trace and exits.
        for c in children(p.pid) if trace_file else [p.pid]:
            try:
                os.kill(c, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            stop_process(p)
        p.stdout.close()
    if marker_s is None:
        with open(console, "rb") as f:
            tail = f.read()[-600:].decode(errors="replace")
        raise RuntimeError(f"no marker within {timeout}s (qemu rc {p.returncode}); console tail: {tail!r}")
    return marker_s


TRACE_RE = re.compile(
    r"^(?P<pid>\d+)\s+(?P<ts>\d\d:\d\d:\d\d\.\d+)\s+(?P<call>pread64|preadv2|preadv)\("
    r"(?P<fd>\d+)<(?P<path>[^>]*)>,\s*(?P<rest>.*)$")
RESUMED_RE = re.compile(
    r"^(?P<pid>\d+)\s+(?P<ts>\S+)\s+<\.\.\. (?P<call>pread64|preadv2|preadv) resumed>(?P<rest>.*)$")
DONE_RE = re.compile(r"^(?P<args>.*)\)\s+=\s+(?P<ret>-?\d+)[^<]*<(?P<dur>[\d.]+)>\s*$")


def _ts(s):
    h, m, rest = s.split(":")
    return int(h) * 3600 + int(m) * 60 + float(rest)


def _finish(call, t, rest):
    """rest: the argument text after the fd up to the end of the line, e.g.
    '""..., 4096, 1048576) = 4096 <0.000012>' (strace -s 0)."""
    d = DONE_RE.match(rest)
    if not d:
        return None
    fields = [x.strip() for x in d["args"].split(",")]
    off = int(fields[-2] if call == "preadv2" else fields[-1])
    ret = int(d["ret"])
    if ret <= 0:
        return None
    return {"t": t, "offset": off, "len": ret, "dur": float(d["dur"])}


def parse_strace(trace_file, disk):
    """Reads on `disk` from `strace -f -tt -T -y -s 0` output.  With -f, a
    read that blocks is split into '<unfinished ...>' (entry time) and
    '<... resumed>' (the arguments printed at exit: buffer, size, offset)."""
    real = os.path.realpath(disk)
    pending = {}
    reads = []
    with open(trace_file, errors="replace") as f:
        for line in f:
            m = TRACE_RE.match(line)
            if m:
                if os.path.realpath(m["path"]) != real:
                    continue
                t = _ts(m["ts"])
                if "<unfinished" in m["rest"]:
                    pending[m["pid"]] = (m["call"], t)
                    continue
                try:
                    r = _finish(m["call"], t, m["rest"])
                except (ValueError, IndexError):
                    r = None
                if r:
                    reads.append(r)
                continue
            m = RESUMED_RE.match(line)
            if m and m["pid"] in pending:
                call, t = pending.pop(m["pid"])
                try:
                    r = _finish(call, t, m["rest"])
                except (ValueError, IndexError):
                    r = None
                if r:
                    reads.append(r)
    reads.sort(key=lambda r: r["t"])
    if reads:
        t0 = reads[0]["t"]
        for r in reads:
            r["t"] = round(r["t"] - t0, 6)
    return reads


def read_wait(reads):
    """Seconds QEMU spent inside its disk reads (strace -T durations)."""
    return sum(r["dur"] for r in reads)


def distinct_blocks(reads):
    blocks = set()
    for r in reads:
        blocks.update(range(r["offset"] // CHUNK, (r["offset"] + r["len"] - 1) // CHUNK + 1))
    return len(blocks)


def replay(path, reads, direct=False):
    """Issue the same reads, in the same order, one at a time, sleeping the
    trace's think time (gap between the end of a read and the start of the
    next, clamped at 0) before each."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    maxlen = max(r["len"] for r in reads)
    buf = mmap.mmap(-1, maxlen)  # page aligned, fine for O_DIRECT
    mv = memoryview(buf)
    think_total = 0.0
    read_time = 0.0
    try:
        t0 = time.monotonic()
        prev_end = None
        for r in reads:
            if prev_end is not None:
                think = max(0.0, r["t"] - prev_end)
                if think > 0:
                    time.sleep(think)
                think_total += think
            a = time.monotonic()
            n = os.preadv(fd, [mv[:r["len"]]], r["offset"])
            read_time += time.monotonic() - a
            if n < 0:
                raise RuntimeError("short read")
            prev_end = r["t"] + r["dur"]
        total = time.monotonic() - t0
    finally:
        mv.release()
        buf.close()
        os.close(fd)
    return {"seconds": total, "read_seconds": read_time, "think_seconds": think_total,
            "reads": len(reads), "bytes": sum(r["len"] for r in reads)}


# The default-profile rows recover the same image backed up under another
# VM name, whose profile is cleared after every run: the "debian" VM keeps
# the recordings the profile rows use.
NOPROFILE_VM = "debian-default"
VM_FOR_MODE = {"none": ("debian", ["--no-profile"]),
               "default": (NOPROFILE_VM, []),
               "profile": ("debian", [])}
REPLAY_ROWS = ("local", "recoverfs", "recoverfs_default", "recoverfs_profile", "nbdkit", "qemu_cor")


def profile_clear(vm, env):
    run([BIN, "profile", "clear", "--repo", f"s3://{Garage.BUCKET}/boot", vm], env=env, timeout=120)


def rfs_figures(session):
    """What a recoverfs boot/replay row reports from `status --json`."""
    st = session["disks"][0]
    p = st.get("profile", {})
    first = p.get("first_reads", 0)
    return {"fetched_bytes": st["fetched_bytes"], "fetched_blocks": st["fetched_blocks"],
            "blocks_staged": st["blocks_staged"], "blocks_total": st["blocks_total"],
            "zero_blocks": st.get("zero_blocks"), "block_size": st["block_size"],
            "fetch_latency_mean_ms": st["fetch_latency_mean_ms"],
            "profile_source": p.get("source"), "profile_blocks": p.get("blocks", 0),
            "profile_coverage": st.get("profile_coverage"),
            "first_reads": first, "first_read_hits": p.get("first_read_hits", 0),
            "staged_at_first_read": (p.get("first_read_hits", 0) / first) if first else None,
            # Prefetch must not slow the guest's own misses down.
            "on_demand_latency_mean_ms": session.get("scheduler", {}).get("on_demand_latency_mean_ms")}


def best_peer_stall(rows):
    """Adds each recoverfs row's stall as a share of the best peer's."""
    peers = [rows[k]["stall_s"] for k in ("nbdkit", "qemu_cor") if "stall_s" in rows.get(k, {})]
    if not peers or min(peers) <= 0:
        return
    for k in ("recoverfs", "recoverfs_default", "recoverfs_profile"):
        if "stall_s" in rows.get(k, {}):
            rows[k]["stall_vs_best_peer"] = rows[k]["stall_s"] / min(peers)


def section_boot(cfg, work, garage):
    res = {"latency_ms": BOOT_LATENCY_MS, "bandwidth_MBps": BOOT_BANDWIDTH_MBPS, "boots": {}, "replay": {}}
    r = run([os.path.join(ROOT, "vm-images", "build.sh"), "debian"], timeout=1800)
    image = r.stdout.strip().splitlines()[-1]
    res["image"] = image
    res["image_bytes"] = os.path.getsize(image)
    res["backup"] = backup(f"s3://{Garage.BUCKET}/boot", "debian", image, env=garage.env())
    backup(f"s3://{Garage.BUCKET}/boot", NOPROFILE_VM, image, env=garage.env())
    garage.put_file("raw/debian.raw", image)
    log(f"boot: backup of {image} done in {res['backup']['seconds']:.1f}s")
    boots = res["boots"]
    trace_reads = None
    with Scope(work, "boot-proxy") as ps:
        pport = start_proxy(ps, garage.s3_port, BOOT_LATENCY_MS, BOOT_BANDWIDTH_MBPS)
        env = garage.env(pport)
        # The peers read the same image, uploaded raw to the same bucket,
        # through their own proxy with the same latency and bandwidth.
        wport = start_proxy(ps, garage.web_port, BOOT_LATENCY_MS, BOOT_BANDWIDTH_MBPS, name="proxy-web")
        url = garage.web_url(wport, "raw/debian.raw")

        def interleaved(configs):
            """Every configuration once per round, rounds repeated: drift in
            machine load hits all of them alike.  A configuration that
            fails once is dropped with its error."""
            samples = {name: [] for name, _ in configs}
            for i in range(cfg.boot_repeats):
                for name, fn in configs:
                    if name in boots:
                        continue
                    try:
                        samples[name].append(fn())
                        log(f"boot {name} #{i + 1}: {samples[name][-1]['seconds']:.1f}s, "
                            f"read wait {samples[name][-1]['read_wait_s']:.2f}s")
                    except Exception as e:
                        boots[name] = {"error": str(e)[:500]}
                        log(f"boot {name}: FAILED {e}")
            for name, _ in configs:
                if name in boots:
                    continue
                # The first run's details with the median of all runs.
                xs = samples[name]
                b = dict(xs[0])
                b["samples_s"] = [x["seconds"] for x in xs]
                b["seconds"] = statistics.median(b["samples_s"])
                b["read_wait_samples_s"] = [x["read_wait_s"] for x in xs]
                b["read_wait_s"] = statistics.median(b["read_wait_samples_s"])
                boots[name] = b

        def boot_local():
            with Scope(work, "boot-local") as s:
                disk = s.path("disk.img")
                run(["cp", "--sparse=always", image, disk])
                drop_caches()
                tf = s.path("trace.txt")
                secs = qemu_boot(s, disk, cfg.boot_timeout, tf)
                reads = parse_strace(tf, disk)
                return {"seconds": secs, "guest_reads": len(reads), "read_wait_s": read_wait(reads),
                        "distinct_blocks_read": distinct_blocks(reads)}

        def boot_recoverfs(mode):
            """mode: "none" (no profile; its trace feeds the replay),
            "default" (no stored profile: partition tables, boot sectors and
            filesystem metadata first) or "profile" (the profile recorded by
            the earlier boots)."""
            def fn():
                nonlocal trace_reads
                vm, args = VM_FOR_MODE[mode]
                with Scope(work, f"boot-recoverfs-{mode}") as s:
                    rfs = Recoverfs(s, f"s3://{Garage.BUCKET}/boot", env=env, args=args).start()
                    t = time.monotonic()
                    disk = rfs.recover(vm)
                    recover_s = time.monotonic() - t
                    drop_caches()
                    tf = s.path("trace.txt")
                    secs = qemu_boot(s, disk, cfg.boot_timeout, tf)
                    st = rfs.status(vm)
                    reads = parse_strace(tf, disk)
                    if trace_reads is None and mode == "none":
                        trace_reads = reads
                    rfs.release(vm)
                    if mode == "default":
                        profile_clear(vm, env)
                    return dict(rfs_figures(st), seconds=secs, recover_seconds=recover_s,
                                guest_reads=len(reads), read_wait_s=read_wait(reads),
                                distinct_blocks_read=distinct_blocks(reads))
            return fn

        def boot_peer(kind):
            def fn():
                with Scope(work, f"boot-{kind}") as s:
                    fn = nbdkit_cache_peer if kind == "nbdkit" else qemu_cor_peer
                    disk = fn(s, image, BOOT_LATENCY_MS, BOOT_BANDWIDTH_MBPS, writable=True, url=url)
                    drop_caches()
                    tf = s.path("trace.txt")
                    secs = qemu_boot(s, disk, cfg.boot_timeout, tf)
                    reads = parse_strace(tf, disk)
                    return {"seconds": secs, "guest_reads": len(reads), "read_wait_s": read_wait(reads)}
            return fn

        for vm in ("debian", NOPROFILE_VM):
            profile_clear(vm, env)
        # "profile" boots after "none" in every round: the first round's
        # no-profile boot records the profile it follows.
        interleaved([("local", boot_local), ("recoverfs", boot_recoverfs("none")),
                     ("recoverfs_default", boot_recoverfs("default")),
                     ("recoverfs_profile", boot_recoverfs("profile")),
                     ("nbdkit", boot_peer("nbdkit")), ("qemu_cor", boot_peer("qemu_cor"))])
        local = boots["local"].get("seconds")
        local_wait = boots["local"].get("read_wait_s")
        if local:
            for k, b in boots.items():
                if "seconds" in b:
                    # The stall: QEMU's time waiting in its disk reads beyond
                    # the local disk's (a TCG boot's wall time is mostly noise).
                    b["stall_s"] = b["read_wait_s"] - local_wait
                    b["wall_stall_s"] = b["seconds"] - local
                    b["ratio_vs_local"] = b["seconds"] / local
        best_peer_stall(boots)

        # ---- replay ----
        if not trace_reads:
            res["replay"] = {"error": "no boot trace (recoverfs cold boot failed or strace saw no reads)"}
            return res
        with open(OUT_TRACE, "w") as f:
            json.dump({"source": "strace of qemu-system-x86_64 during the recoverfs cold boot "
                                 f"({BOOT_LATENCY_MS} ms/request, {BOOT_BANDWIDTH_MBPS} MB/s)",
                       "image": os.path.basename(image), "image_bytes": res["image_bytes"],
                       "fields": {"offset": "bytes", "len": "bytes returned", "t": "s since first read",
                                  "dur": "s the read took"},
                       "reads": [{"offset": r["offset"], "len": r["len"], "t": r["t"], "dur": r["dur"]}
                                 for r in trace_reads]}, f, separators=(",", ":"))
        rp = res["replay"]
        rp["trace_reads"] = len(trace_reads)
        rp["trace_bytes"] = sum(r["len"] for r in trace_reads)
        rp["trace_span_s"] = trace_reads[-1]["t"] + trace_reads[-1]["dur"]
        rp["mode"] = "buffered (QEMU's default cache=writeback), serial, think times = trace gaps"

        def do_replay(name, setup):
            try:
                with Scope(work, f"replay-{name}") as s:
                    path, rfs = setup(s)
                    drop_caches()
                    rp[name] = replay(path, trace_reads)
                    if rfs:
                        vm = os.path.basename(os.path.dirname(path))
                        rp[name].update(rfs_figures(rfs.status(vm)))
                        rfs.release(vm)
                        if name == "recoverfs_default":
                            profile_clear(vm, env)
                    log(f"replay {name}: {rp[name]['seconds']:.1f}s")
            except Exception as e:
                rp[name] = {"error": str(e)[:500]}
                log(f"replay {name}: FAILED {e}")

        def rfs_setup(mode):
            def setup(s):
                vm, args = VM_FOR_MODE[mode]
                rfs = Recoverfs(s, f"s3://{Garage.BUCKET}/boot", env=env, args=args).start()
                return rfs.recover(vm), rfs
            return setup

        def peer(kind):
            fn = nbdkit_cache_peer if kind == "nbdkit" else qemu_cor_peer
            return lambda s: (fn(s, image, BOOT_LATENCY_MS, BOOT_BANDWIDTH_MBPS, url=url), None)

        do_replay("local", lambda s: (image, None))  # read-only use of the cached image
        do_replay("recoverfs", rfs_setup("none"))
        do_replay("recoverfs_default", rfs_setup("default"))
        do_replay("recoverfs_profile", rfs_setup("profile"))
        if cfg.quick:
            # Keeps --quick under 5 minutes; the full run replays on the peers.
            rp["nbdkit"] = {"error": "skipped with --quick"}
            rp["qemu_cor"] = {"error": "skipped with --quick"}
        else:
            do_replay("nbdkit", peer("nbdkit"))
            do_replay("qemu_cor", peer("qemu_cor"))
        base = rp["local"].get("seconds")
        if base:
            for k in REPLAY_ROWS:
                if "seconds" in rp.get(k, {}):
                    rp[k]["stall_s"] = rp[k]["read_seconds"] - rp["local"]["read_seconds"]
                    rp[k]["ratio_vs_local"] = rp[k]["seconds"] / base
            best_peer_stall(rp)
    return res


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def fmt(v, d=0):
    if v is None:
        return "—"
    return f"{v:,.{d}f}"


def targets_summary(S):
    out = []
    if S.get("warm") and "error" not in S["warm"]:
        out += warm.targets(S["warm"])
    if S.get("cold") and "error" not in S["cold"]:
        out += cold.targets(S["cold"])
    if S.get("fleet") and "error" not in S["fleet"]:
        out += fleet.targets(S["fleet"])
    b = S.get("boot", {}).get("boots", {})
    for k, limit, label in (("recoverfs_profile", 0.05, "recorded profile"), ("recoverfs", 0.50, "no profile")):
        r = b.get(k, {})
        if "stall_vs_best_peer" in r:
            ok = r["stall_vs_best_peer"] <= limit
            out.append(f"| boot stall (QEMU's read wait beyond the local disk's), 20 ms, {label}: "
                       f"≤ {limit:.0%} of the best peer's | {r['stall_vs_best_peer']:.0%} ({r['stall_s']:.1f} s) | "
                       f"{'met' if ok else '**missed**'} |")
    if not out:
        return []
    return ["## Targets\n", "| target | measured | |", "|---|---|---|"] + out + [""]


def staged_note(r):
    """How many first reads found their block already staged."""
    if r.get("staged_at_first_read") is None:
        return "no guest reads seen"
    src = r.get("profile_source") or "none"
    lat = r.get("on_demand_latency_mean_ms")
    return (f"{r['staged_at_first_read']:.1%} of {r['first_reads']} first reads staged "
            f"(profile: {src}, {r.get('profile_blocks', 0)} blocks)"
            + (f"; on-demand fetch {lat:.1f} ms mean" if lat else ""))


def render(results):
    L = []
    meta = results["meta"]
    L.append("# recoverfs benchmarks\n")
    L.append(f"Generated by `python3 scripts/bench/run.py{' --quick' if meta['quick'] else ''}` "
             f"on {meta['date']} (git `{meta['git']}`"
             + (f", `target/release/recoverfs` built {meta['binary_built']}" if meta.get("binary_built") else "")
             + f"), {meta['cpus']} CPUs ({meta['cpu_model']}), "
             f"kernel {meta['kernel']}, total run {meta.get('total_seconds', 0):.0f} s.\n")
    L.append("**Shared machine:** another engineer may have been building and running tests at the same "
             f"time (load average at start {meta['loadavg_start']}, at end {meta.get('loadavg_end')}). "
             "Absolute numbers are noisy; read the ratios, each against a baseline measured in the same run. "
             "No KVM: QEMU runs under TCG.\n")
    loads = [x[0] for x in (meta.get("loadavg_start"), meta.get("loadavg_end")) if x]
    if loads and max(loads) > meta["cpus"]:
        L.append(f"**Contended run:** the 1-minute load average reached {max(loads):.1f} on {meta['cpus']} CPUs: "
                 "other work shared the machine, so these figures are validation figures, not the reference ones "
                 "(rerun `make bench` on a quiet machine).\n")
    S = results["sections"]
    L += targets_summary(S)

    if S.get("warm"):
        L += warm.render(S["warm"])
    if S.get("cold"):
        L += cold.render(S["cold"])

    b = S.get("boot")
    if b:
        L.append("## 3. Boot to the console marker\n")
        if "error" in b:
            L.append(f"FAILED: {b['error']}\n")
        if b.get("boots"):
            L.append(f"`debian` image ({b.get('image_bytes', 0) / MiB:.0f} MiB), repository/backing at "
                     f"{b['latency_ms']} ms per request and {b['bandwidth_MBps']} MB/s (one latency proxy per "
                     "system, all in front of the same Garage). Seconds from starting `qemu-system-x86_64 -nographic -m 512 "
                     "-no-reboot -drive file=X,format=raw,if=virtio` to `RECOVERFS-DEBIAN-UP`. Every boot runs "
                     "under the same `strace --seccomp-bpf -e trace=pread64,preadv,preadv2` (to get the read trace); "
                     "the nbdkit peer adds the cow filter so the guest can write; QEMU COR exports with writable=on. "
                     f"Median of {results['config'].get('boot_repeats', 1)} boot(s) per configuration (samples in parentheses), each from "
                     "a fresh copy/staging/cache/overlay.\n")
            L.append("**The stall is QEMU's time waiting in its disk reads beyond the local disk's**: the sum of "
                     "the durations strace records for every read on the disk (`-T`), minus the local copy's sum. "
                     "The wall time of a TCG boot on a shared machine varies by seconds between identical boots, "
                     "so it is shown for reference only. Reads QEMU issues in parallel count each their own "
                     "duration. A stall at or below zero means within the local disk's own variation. "
                     "Configurations are interleaved: every one boots once per round. **Same backend:** the peers read the same image, uploaded raw to the same Garage "
                     "bucket, by ranged GETs through Garage's web endpoint behind their own latency proxy at the "
                     "same latency and bandwidth: nbdkit = curl plugin + cache (on read) + cow filters through "
                     "nbdfuse (the curl plugin serialises requests: nbdkit 1.32 thread model "
                     "`serialize_requests`, one NBD connection); QEMU COR = QEMU's http driver as the backing of "
                     "a buffered qcow2 overlay under copy-on-read, FUSE export (QEMU 7.2 serves FUSE requests one "
                     "at a time).\n")
            L.append("| configuration | time to marker s (samples) | read wait s (samples) | stall: read wait beyond "
                     "local s | stall / best peer's | guest reads | notes |")
            L.append("|---|---:|---:|---:|---:|---:|---|")
            names = {"local": "local raw copy (baseline)",
                     "recoverfs": "recoverfs cold, no profile (`--no-profile`)",
                     "recoverfs_default": "recoverfs cold, default profile (no recording)",
                     "recoverfs_profile": "recoverfs with the profile recorded by the boots above",
                     "nbdkit": "nbdkit curl + cache peer (nbdfuse; serialises misses)",
                     "qemu_cor": "QEMU http + copy-on-read peer (FUSE export; one request at a time)"}
            for k, name in names.items():
                r = b["boots"].get(k)
                if r is None:
                    continue
                if "status" in r:
                    L.append(f"| {name} | — | — | — | — | — | {r['status']} |")
                    continue
                if "error" in r:
                    L.append(f"| {name} | FAILED | — | — | — | — | {r['error'][:200].replace('|', '/')} |")
                    continue
                notes = ""
                if k.startswith("recoverfs"):
                    notes = (f"{staged_note(r)}; fetched {r['fetched_bytes'] / MiB:.1f} MiB of "
                             f"{b['image_bytes'] / MiB:.0f} MiB ({r['fetched_blocks']} chunks); guest read "
                             f"{r['distinct_blocks_read']} distinct {CHUNK // MiB} MiB blocks; "
                             f"recover took {r['recover_seconds']:.2f} s")
                elif k == "local":
                    notes = f"guest read {r['distinct_blocks_read']} distinct 1 MiB blocks"
                samples = ", ".join(f"{x:.1f}" for x in r.get("samples_s", []))
                waits = ", ".join(f"{x:.2f}" for x in r.get("read_wait_samples_s", []))
                svp = r.get("stall_vs_best_peer")
                L.append(f"| {name} | {fmt(r['seconds'], 1)} ({samples}) | {fmt(r.get('read_wait_s'), 2)} ({waits}) | "
                         f"{fmt(r.get('stall_s'), 2)} | {f'{svp:.0%}' if svp is not None else '—'} | "
                         f"{r.get('guest_reads', '—')} | {notes} |")
            L.append("")
        rp = b.get("replay")
        if rp:
            L.append("## 4. Boot-trace replay\n")
            if "error" in rp:
                L.append(f"FAILED/skipped: {rp['error']}\n")
            else:
                L.append(f"The guest's disk reads during the recoverfs cold boot ({rp['trace_reads']} reads, "
                         f"{rp['trace_bytes'] / MiB:.1f} MiB, {rp['trace_span_s']:.1f} s span; saved as "
                         "`docs/boot-trace.json`, captured with strace on QEMU's disk fd) replayed by a Python "
                         "replayer: same offsets, sizes and order, one at a time, sleeping the trace's think time "
                         "(gap between one read's end and the next read's start) before each; buffered reads like "
                         f"QEMU's default cache mode; page cache dropped before each replay. "
                         f"Same {b['latency_ms']} ms / {b['bandwidth_MBps']} MB/s as the boot.\n")
                L.append("| target | replay time s | time waiting on reads s | stall: read wait beyond local s | time / local | "
                         "stall / best peer's | blocks staged at first read |")
                L.append("|---|---:|---:|---:|---:|---:|---|")
                names = {"local": "local raw file (baseline)", "recoverfs": "recoverfs cold, no profile",
                         "recoverfs_default": "recoverfs cold, default profile",
                         "recoverfs_profile": "recoverfs with profile",
                         "nbdkit": "nbdkit cache peer", "qemu_cor": "QEMU COR peer"}
                for k, name in names.items():
                    r = rp.get(k)
                    if r is None:
                        continue
                    if "status" in r:
                        L.append(f"| {name} | {r['status']} | | | |")
                    elif "error" in r and r["error"].startswith("skipped"):
                        L.append(f"| {name} | {r['error']} | | | |")
                    elif "error" in r:
                        L.append(f"| {name} | FAILED: {r['error'][:200].replace('|', '/')} | | | |")
                    else:
                        svp = r.get("stall_vs_best_peer")
                        L.append(f"| {name} | {r['seconds']:.2f} | {r['read_seconds']:.2f} | "
                                 f"{fmt(r.get('stall_s'), 2)} | {fmt(r.get('ratio_vs_local'), 2)}× | "
                                 f"{f'{svp:.0%}' if svp is not None else '—'} | "
                                 f"{staged_note(r) if k.startswith('recoverfs') else '—'} |")
                L.append("")
    if S.get("fleet"):
        L += fleet.render(S["fleet"])
    if results.get("skipped"):
        L.append("## Skipped\n")
        for s in results["skipped"]:
            L.append(f"* {s}")
        L.append("")
    return "\n".join(L) + "\n"


# Sections other scripts append to docs/benchmarks.md (scripts/bench/
# relocation.py adds "## Relocation"): kept when this script rewrites it.
FOREIGN_SECTIONS = ("\n## Relocation\n", "\n## Exports (NFS and NBD)\n", "\n## Placement: does it pay?\n",
                     "\n## Backups of running VMs\n")


def write_results(json_path, res, head, md):
    """Raw figures to `json_path`, the section `md` (under `head`) into
    docs/benchmarks.md, and the section to stdout."""
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    replace_section(head, md)
    print(md)


def replace_section(head, md):
    """Puts `md` (starting with `head`, e.g. "\n## Exports...\n") in
    docs/benchmarks.md in place of an earlier section under that heading,
    or at the end: the other scripts' sections stay as they are."""
    path = OUT_MD
    old = open(path).read() if os.path.exists(path) else "# recoverfs benchmarks\n"
    tail = ""
    if head in old:
        start = old.index(head)
        nxt = old.find("\n## ", start + len(head))
        tail = old[nxt:] if nxt >= 0 else ""
        old = old[:start]
    with open(path, "w") as f:
        f.write(old.rstrip() + "\n\n" + md.strip("\n") + "\n" + tail)


def write_md(text):
    tail = ""
    try:
        with open(OUT_MD) as f:
            old = f.read()
        cut = [old.index(h) for h in FOREIGN_SECTIONS if h in old]
        if cut:
            tail = old[min(cut):]
    except OSError:
        pass
    with open(OUT_MD, "w") as f:
        f.write(text.rstrip() + "\n" + tail)


def write_outputs(results):
    os.makedirs(DOCS, exist_ok=True)
    with open(OUT_JSON, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
    write_md(render(results))


def meta(quick):
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src"], capture_output=True, text=True)
    try:
        built = datetime.datetime.fromtimestamp(os.path.getmtime(BIN)).astimezone().isoformat(timespec="seconds")
    except OSError:
        built = None
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "binary_built": built,
            "git": git.stdout.strip() + ("+dirty src" if dirty.stdout.strip() else ""),
            "quick": quick, "cpus": os.cpu_count(), "cpu_model": model,
            "kernel": platform.release(), "loadavg_start": loadavg(),
            "fetch_workers": FETCH_WORKERS, "chunk_size": CHUNK}


def preflight():
    missing = [t for t in ("fio", "nbdkit", "nbdfuse", "bindfs", "qemu-img", "qemu-storage-daemon",
                           "qemu-system-x86_64", "strace", "fusermount3") if not shutil.which(t)]
    if missing:
        sys.exit(f"missing tools: {' '.join(missing)} (apt-get install -y fio nbdkit nbdfuse bindfs libnbd-bin "
                 "strace fuse3 qemu-system-x86 qemu-utils qemu-block-extra)")
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} not found: run `cargo build --release` first")
    if os.geteuid() != 0:
        sys.exit("run as root (drop_caches, FUSE mounts)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs, smaller image (< 5 min)")
    ap.add_argument("--sections", default="warm,cold,boot,fleet",
                    help="comma-separated subset of warm,cold,boot,fleet")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, traces)")
    ap.add_argument("--workdir", default=None, help="parent of the work directory (default: /var/tmp)")
    ap.add_argument("--render-only", action="store_true", help="re-render docs/benchmarks.md from the JSON")
    ap.add_argument("--baseline-bin", default=os.environ.get("BENCH_BASELINE_BIN"),
                    help="another recoverfs binary (e.g. the previous release build) measured side by side in the "
                         "cold section, for the CPU-seconds per GiB comparison (default: $BENCH_BASELINE_BIN)")
    a = ap.parse_args()
    if a.render_only:
        with open(OUT_JSON) as f:
            results = json.load(f)
        write_md(render(results))
        return
    preflight()
    cfg = argparse.Namespace(
        quick=a.quick,
        image_bytes=(512 if a.quick else 1024) * MiB,
        warm_runtime=3 if a.quick else 10,
        cold_runtime=10 if a.quick else 30,
        cold_image_bytes=(1024 if a.quick else 2048) * MiB,
        first_touches=128 if a.quick else 256,
        rounds=2 if a.quick else 5,
        fleet_image_bytes=(16 if a.quick else 64) * MiB,
        fleet_reads=16 if a.quick else 32,
        fleet_rounds=2 if a.quick else 5,
        baseline_bin=os.path.abspath(a.baseline_bin) if a.baseline_bin else None,
        latencies=[2, 20],
        boot_timeout=240 if a.quick else 360,
        boot_repeats=1 if a.quick else 5,
    )
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]

    # SIGTERM/SIGHUP unwind through every finally block like Ctrl-C does.
    def on_signal(sig, _frame):
        raise SystemExit(f"signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    results = {"meta": meta(a.quick), "config": vars(cfg), "sections": {}, "skipped": []}
    work = tempfile.mkdtemp(prefix="recoverfs-bench-", dir=a.workdir or "/var/tmp")
    global SOCK_DIR, REMOVE_SCOPES
    SOCK_DIR = tempfile.mkdtemp(prefix="rfsb-", dir="/tmp")
    REMOVE_SCOPES = not a.keep
    log(f"work directory {work}")
    top = Scope(work, "top")
    try:
        image = cold_image = None
        if "warm" in sections:
            image = make_image(os.path.join(top.dir, "image.raw"), cfg.image_bytes)
            log(f"image {cfg.image_bytes // MiB} MiB ready")
        if "cold" in sections:
            cold_image = make_image(os.path.join(top.dir, "cold.raw"), cfg.cold_image_bytes)
            log(f"cold image {cfg.cold_image_bytes // MiB} MiB ready")
        garage = None
        if "cold" in sections or "boot" in sections:
            try:
                garage = Garage(top).start()
                log("garage ready")
            except Exception as e:
                results["sections"]["garage_error"] = str(e)
                log(f"garage FAILED: {e}")
        for name in sections:
            try:
                if name == "warm":
                    results["sections"]["warm"] = warm.section_warm(cfg, work, image)
                elif name == "cold":
                    if garage is None:
                        raise RuntimeError("Garage did not start")
                    results["sections"]["cold"] = cold.section_cold(cfg, work, cold_image, garage)
                elif name == "fleet":
                    results["sections"]["fleet"] = fleet.section_fleet(cfg, work)
                elif name == "boot":
                    if garage is None:
                        raise RuntimeError("Garage did not start")
                    results["sections"]["boot"] = section_boot(cfg, work, garage)
                else:
                    results["skipped"].append(f"unknown section {name}")
            except Exception as e:
                traceback.print_exc()
                results["sections"][name] = {"error": f"{type(e).__name__}: {e}"[:800]}
            results["meta"]["total_seconds"] = time.monotonic() - T0
            results["meta"]["loadavg_end"] = loadavg()
            write_outputs(results)
    finally:
        top.close()
        # Anything left mounted under the work directory (should be nothing).
        with open("/proc/self/mountinfo") as f:
            left = [l.split()[4] for l in f if l.split()[4].startswith(work)]
        for m in left:
            unmount(m)
        shutil.rmtree(SOCK_DIR, ignore_errors=True)
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.monotonic() - T0:.0f}s: {OUT_MD}, {OUT_JSON}")


# The section modules import this one as `run`: when it runs as a script,
# they must share this copy (its SOCK_DIR, T0) rather than load a second.
sys.modules.setdefault("run", sys.modules[__name__])
import cold  # noqa: E402
import fleet  # noqa: E402
import warm  # noqa: E402

if __name__ == "__main__":
    main()
