#!/usr/bin/env python3
"""Does placement pay? New recoveries placed by the policy against
round-robin, on the same skewed load, in interleaved rounds.

    python3 scripts/bench/placement.py [--quick] [--rounds N]

Three export points (`a`, `b`, `c`) on 198.18.250.11-13 (on the root namespace's
loopback link), one daemon per run with a fresh staging, the
repository a local directory behind the same `--repo-delay-ms` for every
chunk read (a remote, deduplicating repository), each point's I/O queue at
`max-inflight=8`.

The skewed load comes from a "load" hypervisor host (a network namespace):
relocations of two VMs (one on `a`, one on `b`) and a busy random reader
on `a` (fio's libnbd engine, 4 KiB random reads, 32 in flight, over NBD).
After a warm-up, 4 new VMs are recovered for a second host ("new", another
namespace) one after another, placed by

* **policy**: `recover VM --host NEW` (auto), the daemon's defaults
  (`--max-connections-per-host 4`);
* **policy, 2 connections per host**: the same with
  `--max-connections-per-host 2`, where the host's connection budget no
  longer forces it to spread over every point;
* **round-robin**: `--export-point` a, b, c, a in turn (`--force`).

Each new VM then boots the `tiny` image from its disk0 over NFS (QEMU's
nfs:// driver, in the new host's namespace) while a prober reads 4 KiB at
random offsets of its disk1 (qemu-io over nfs://, one request at a time).
Reported: the probers' p99 latency (all 4 VMs' probes together) and the
median boot time of the 4, each as policy / round-robin, with the spread
over rounds. The arms run in rotating order within every round.

Writes docs/benchmarks-placement.json and the "## Placement" section of
docs/benchmarks.md. Needs root, iproute2, fio, qemu-utils,
qemu-block-extra, qemu-system-x86 and the tiny image
(`vm-images/build.sh tiny`).
"""
import argparse
import json
import os
import random
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402  (the shared harness: scopes, processes, mounts)

ROOT = B.ROOT
OUT_JSON = os.path.join(ROOT, "docs", "benchmarks-placement.json")
MiB = 1 << 20
POINTS = {"a": "198.18.250.11", "b": "198.18.250.12", "c": "198.18.250.13"}
HOSTS = {"load": 251, "new": 252}   # 198.18.N.2 inside, .1 outside
TINY_MARKER = b"RECOVERFS-TINY-UP"
DELAY_MS = 20
ROUND_ROBIN = ["a", "b", "c", "a"]
ARMS = {
    "policy": {"max_conn": 4, "label": "policy (auto, 4 connections per host: the default)"},
    "policy-2": {"max_conn": 2, "label": "policy (auto, 2 connections per host)"},
    "round-robin": {"max_conn": 4, "label": "round-robin (a, b, c, a)"},
}


def ns_name(h):
    return f"rfsb-{h}"


def host_addr(h):
    return f"198.18.{HOSTS[h]}.2"


def ip(*args, check=True):
    return B.run(["ip", *args], check=check)


def net_up():
    net_down()
    # No dummy links in this kernel: the points' addresses go on lo.
    for a in POINTS.values():
        ip("addr", "add", f"{a}/32", "dev", "lo")
    for h, n in HOSTS.items():
        ns, o, i = ns_name(h), f"rfsb{n}o", f"rfsb{n}i"
        ip("netns", "add", ns)
        ip("link", "add", o, "type", "veth", "peer", "name", i)
        ip("link", "set", i, "netns", ns)
        ip("addr", "add", f"198.18.{n}.1/24", "dev", o)
        ip("link", "set", o, "up")
        ip("-n", ns, "addr", "add", f"198.18.{n}.2/24", "dev", i)
        ip("-n", ns, "link", "set", i, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        # The export points are local addresses of the root namespace.
        ip("-n", ns, "route", "add", "default", "via", f"198.18.{n}.1")


def net_down():
    for h in HOSTS:
        subprocess.run(["ip", "netns", "del", ns_name(h)], capture_output=True)
    for a in POINTS.values():
        subprocess.run(["ip", "addr", "del", f"{a}/32", "dev", "lo"], capture_output=True)


def in_ns(h, args):
    return ["ip", "netns", "exec", ns_name(h)] + args


def repeating_image(path, size, seed):
    """One random MiB over and over: every 64 KiB block is data the
    repository must serve, while the backup stores 16 chunks."""
    unit = random.Random(seed).randbytes(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(unit)
    return path


def backup(repo, vm, images):
    B.run([B.BIN, "backup", "--repo", repo, "--vm", vm, "--chunk-size", "64K", *images], timeout=1800)


def tiny_image():
    img = os.path.join(ROOT, "vm-images", "out", "tiny.img")
    if not os.path.exists(img):
        B.log("building the tiny image")
        B.run([os.path.join(ROOT, "vm-images", "build.sh"), "tiny"], timeout=1800)
    return img


def cli(d, *args, timeout=120):
    return B.run([B.BIN, *args, "--socket", d.socket], timeout=timeout)


def start_load(scope, d, targets):
    """Relocations on a and b, the busy reader on a; all for the load host."""
    load = host_addr("load")
    for vm, p in (("reloc1", "a"), ("reloc2", "b"), ("reader", "a")):
        cli(d, "recover", vm, "--host", load, "--export-point", p, "--json")
    for vm in ("reloc1", "reloc2"):
        cli(d, "relocate", vm, "--to", targets)
    uri = f"nbd://{POINTS['a']}:10809/reader/disk0"
    return scope.spawn("fio-reader", in_ns("load", [
        "fio", "--name=busy", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
        "--iodepth=32", "--time_based", "--runtime=3600", "--size=100%", "--norandommap",
        "--randrepeat=0", "--output-format=terse"]))


def point_loads(d):
    r = cli(d, "export-points", "--json")
    out = {}
    for p in json.loads(r.stdout)["export_points"]:
        q = p["queue"]
        out[p["name"]] = {"sessions": p["sessions"], "queued_bytes": q["queued_bytes"],
                          "inflight_bytes": q["inflight_bytes"], "service_ms": q["service_ms"],
                          "drain_mb_s": q["drain_bytes_per_s"] / 1e6, "async_share": q["async_share"],
                          "predicted_ms": p["predicted"]["latency_ms"],
                          "relocations": [round(x["progress"], 3) for x in p["relocations"]]}
    return out


def place(d, arm, k):
    vm = f"new{k}"
    args = ["recover", vm, "--host", host_addr("new"), "--json", "--explain"]
    if arm == "round-robin":
        args += ["--export-point", ROUND_ROBIN[k - 1], "--force"]
    r = json.loads(cli(d, *args).stdout)
    return vm, r["export_point"], (r.get("placement") or {}).get("rule")


def boot(scope, vm, point, timeout):
    """Seconds from QEMU start to the tiny image's marker."""
    url = f"nfs://{POINTS[point]}/{vm}/disk0.raw"
    p = scope.spawn(f"qemu-{vm}", in_ns("new", [
        "qemu-system-x86_64", "-nographic", "-m", "256", "-no-reboot",
        "-drive", f"file={url},format=raw,if=virtio"]), stdout=subprocess.PIPE)
    t0 = time.monotonic()
    buf = b""
    try:
        while time.monotonic() - t0 < timeout:
            ready, _, _ = select.select([p.stdout], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            buf = (buf + chunk)[-8192:]
            if TINY_MARKER in buf:
                return time.monotonic() - t0
    finally:
        B.stop_process(p)
        p.stdout.close()
    raise RuntimeError(f"{vm}: no boot marker within {timeout}s (console tail {buf[-300:]!r})")


OPS_RE = re.compile(r"and ([0-9.]+) ops/sec")


def probe(vm, point, n, disk_bytes, seed):
    """n 4 KiB reads at random offsets, one at a time: latencies in ms."""
    rng = random.Random(seed)
    cmds = []
    for _ in range(n):
        off = rng.randrange(disk_bytes // 4096) * 4096
        cmds += ["-c", f"read {off} 4096"]
    url = f"nfs://{POINTS[point]}/{vm}/disk1.raw"
    r = B.run(in_ns("new", ["qemu-io", "-r", "-f", "raw", *cmds, url]), timeout=1800)
    lat = [1000.0 / float(m) for m in OPS_RE.findall(r.stdout)]
    if len(lat) != n:
        raise RuntimeError(f"prober {vm}: {len(lat)} of {n} reads timed: {r.stdout[-400:]}")
    return lat


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def run_arm(work, arm, rnd, cfg):
    """One arm of one round: fresh daemon, load, 4 placements, boots and
    probers. Returns its figures."""
    with B.Scope(work, f"{arm}-{rnd}") as scope:
        args = ["--repo-delay-ms", str(DELAY_MS), "--nfs-allow", "198.18.0.0/15",
                "--nfs-no-root-squash", "--max-connections-per-host", str(ARMS[arm]["max_conn"])]
        for name, addr in POINTS.items():
            args += ["--export-point", f"{name},listen={addr},max-inflight=8"]
        d = B.Recoverfs(scope, cfg["repo"], name="rfs", args=args).start()
        targets = scope.path("primary")
        os.makedirs(targets)
        start_load(scope, d, targets)
        time.sleep(cfg["warmup_s"])
        before = point_loads(d)
        placed = [place(d, arm, k) for k in range(1, 5)]
        results = {}
        errors = []

        def one(vm, point, k):
            try:
                res = {}
                t = threading.Thread(target=lambda: res.update(
                    probes=probe(vm, point, cfg["probes"], cfg["prober_bytes"], rnd * 10 + k)))
                t.start()
                res["boot_s"] = boot(scope, vm, point, cfg["boot_timeout"])
                t.join()
                if "probes" not in res:
                    raise RuntimeError(f"prober {vm} failed: see {scope.dir}")
                results[vm] = res
            except Exception as e:  # reported below, the arm fails
                errors.append(f"{vm}: {e}")

        threads = [threading.Thread(target=one, args=(vm, p, k)) for k, (vm, p, _) in enumerate(placed, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = point_loads(d)
        if errors:
            raise RuntimeError("; ".join(errors))
        probes = [x for r in results.values() for x in r["probes"]]
        boots = [r["boot_s"] for r in results.values()]
        out = {"placed": [{"vm": vm, "point": p, "rule": rule} for vm, p, rule in placed],
                "p99_ms": p99(probes), "median_ms": statistics.median(probes),
                "per_vm_p99_ms": {vm: p99(r["probes"]) for vm, r in results.items()},
                "boot_s": statistics.median(boots), "boots_s": boots,
                "loads_before": before, "loads_after": after}
    if not cfg["keep"]:
        # Relocation targets and staging: gigabytes per arm.
        shutil.rmtree(os.path.join(work, f"{arm}-{rnd}"), ignore_errors=True)
    return out


def setup(work, quick):
    repo = os.path.join(work, "repo")
    img = lambda n: os.path.join(work, n)  # noqa: E731
    gib = 1 << 30
    B.log("making images and backups")
    repeating_image(img("reloc.img"), (1 if quick else 2) * gib, 1)
    repeating_image(img("reader.img"), (2 if quick else 4) * gib, 2)
    prober_bytes = 512 * MiB
    repeating_image(img("prober.img"), prober_bytes, 3)
    backup(repo, "reloc1", [img("reloc.img")])
    backup(repo, "reloc2", [img("reloc.img")])
    backup(repo, "reader", [img("reader.img")])
    for k in range(1, 5):
        backup(repo, f"new{k}", [tiny_image(), img("prober.img")])
    for n in ("reloc.img", "reader.img", "prober.img"):
        os.unlink(img(n))
    return {"repo": repo, "prober_bytes": prober_bytes, "probes": 100 if quick else 200,
            "warmup_s": 8 if quick else 12, "boot_timeout": 300}


def ratio_rows(rounds):
    """Per round, each policy arm over round-robin; median and spread."""
    out = {}
    for arm in ("policy", "policy-2"):
        p99 = [r[arm]["p99_ms"] / r["round-robin"]["p99_ms"] for r in rounds]
        boot = [r[arm]["boot_s"] / r["round-robin"]["boot_s"] for r in rounds]
        out[arm] = {"p99_ratio": statistics.median(p99), "p99_ratio_min": min(p99),
                    "p99_ratio_max": max(p99), "boot_ratio": statistics.median(boot),
                    "boot_ratio_min": min(boot), "boot_ratio_max": max(boot)}
    return out


def render(res):
    rounds, ratios = res["rounds"], res["ratios"]
    med = lambda arm, k: statistics.median(r[arm][k] for r in rounds)  # noqa: E731
    spread = lambda arm, k, f: f"{f(min(r[arm][k] for r in rounds))}..{f(max(r[arm][k] for r in rounds))}"  # noqa: E731
    L = ["", "## Placement: does it pay?", "",
         f"`scripts/bench/placement.py`, {res['when']}, {len(rounds)} interleaved rounds (the arms' "
         "order rotates every round). Three export points, `max-inflight=8` each; the repository a local "
         f"directory with {DELAY_MS} ms before every chunk read for every arm. Skewed load from one "
         "hypervisor host: relocations of a 2 GiB VM on `a` and on `b`, and a busy random reader (fio "
         "libnbd engine, 4 KiB, 32 in flight) on `a`. Then 4 new VMs for another host, placed one "
         "after another; each boots `tiny` from disk0 over NFS (QEMU nfs://) while a prober reads 4 KiB "
         f"at random offsets of its 512 MiB disk1 (qemu-io over nfs://, one at a time, {res['probes']} "
         "reads per VM). Fresh daemon and staging for every arm of every round.", "",
         "Fair because every arm gets the same daemon build and flags apart from the placement, the same "
         "repository and delay, the same load started the same way and the same warm-up, the same "
         "clients in the same namespaces; only where the 4 new VMs go differs. Every read the probers "
         "time is the same kind of request in every arm (mostly a first touch of its 64 KiB block, so a "
         "repository fetch).", "",
         "| arm | where the 4 VMs went (usually) | prober p99 (median, spread) | p99 vs round-robin (median, spread) | median boot (median, spread) | boot vs round-robin |",
         "|---|---|---|---|---|---|"]
    for arm in ("policy", "policy-2", "round-robin"):
        places = [",".join(p["point"] for p in r[arm]["placed"]) for r in rounds]
        usual = max(set(places), key=places.count)
        if arm == "round-robin":
            vs_p99 = vs_boot = "1 (baseline)"
        else:
            q = ratios[arm]
            vs_p99 = f"{q['p99_ratio']:.2f}x ({q['p99_ratio_min']:.2f}..{q['p99_ratio_max']:.2f})"
            vs_boot = f"{q['boot_ratio']:.2f}x ({q['boot_ratio_min']:.2f}..{q['boot_ratio_max']:.2f})"
        L.append(f"| {ARMS[arm]['label']} | {usual} | {med(arm, 'p99_ms'):.1f} ms "
                 f"({spread(arm, 'p99_ms', lambda v: f'{v:.1f}')}) | {vs_p99} | "
                 f"{med(arm, 'boot_s'):.1f} s ({spread(arm, 'boot_s', lambda v: f'{v:.1f}')}) | {vs_boot} |")
    L.append("")
    for arm in ("policy", "policy-2"):
        q = ratios[arm]
        ok_p99 = q["p99_ratio"] <= 0.7
        ok_boot = q["boot_ratio"] <= 1.05
        L.append(f"Target for {ARMS[arm]['label']}: p99 ≤ 0.7× round-robin — "
                 f"{'met' if ok_p99 else 'missed'} ({q['p99_ratio']:.2f}x); boot no slower — "
                 f"{'met' if ok_boot else 'missed'} ({q['boot_ratio']:.2f}x).")
        L.append("")
    L.append(res.get("analysis", ""))
    L.append("")
    L.append("Raw figures per round (placements, rules, per-VM p99, boots, every point's queue figures "
             "before and after): `docs/benchmarks-placement.json`.")
    return "\n".join(L) + "\n"


def analysis(res):
    """Why the figures are what they are, from the figures."""
    rounds = res["rounds"]
    lines = []
    a_share = {}
    for arm in ARMS:
        n = sum(sum(1 for p in r[arm]["placed"] if p["point"] == "a") for r in rounds)
        a_share[arm] = n / (4 * len(rounds))
    lines.append("New VMs placed on the loaded point `a`: " + ", ".join(
        f"{arm} {a_share[arm] * 100:.0f} %" for arm in ARMS) + ".")
    pv = [v for r in rounds for arm in ARMS for vm, v in r[arm]["per_vm_p99_ms"].items()
          if any(p["vm"] == vm and p["point"] == "a" for p in r[arm]["placed"])]
    po = [v for r in rounds for arm in ARMS for vm, v in r[arm]["per_vm_p99_ms"].items()
          if any(p["vm"] == vm and p["point"] != "a" for p in r[arm]["placed"])]
    # The worst round of each policy arm, and whether VMs away from `a`
    # were slow in it too (then the whole machine stalled, not placement).
    for arm in ("policy", "policy-2"):
        worst = max(range(len(rounds)), key=lambda i: rounds[i][arm]["p99_ms"])
        r = rounds[worst][arm]
        off_a = [r["per_vm_p99_ms"][p["vm"]] for p in r["placed"] if p["point"] != "a"]
        if off_a and min(off_a) > 3 * statistics.median(po or [1e9]):
            lines.append(f"The worst {arm} round (round {worst + 1}, p99 {r['p99_ms']:.0f} ms) had every VM "
                         f"slow, none on `a` (even the fastest VM away from `a` had a p99 of {min(off_a):.0f} ms): the whole "
                         "machine stalled then, whatever the placement; the median discounts it, the spread "
                         "shows it.")
    if pv and po:
        lines.append(f"Per-VM prober p99 on `a`: median {statistics.median(pv):.1f} ms; elsewhere "
                     f"{statistics.median(po):.1f} ms. The combined p99 of 4 VMs is the tail of whichever "
                     "VM is worst, so one VM on `a` costs as much as two.")
    return " ".join(lines)


HEAD = "\n## Placement: does it pay?\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--keep", action="store_true", help="keep the work directory and its logs")
    ap.add_argument("--render-only", action="store_true", help="re-render docs from the JSON")
    a = ap.parse_args()
    if a.render_only:
        res = json.load(open(OUT_JSON))
        res["analysis"] = analysis(res)
        B.replace_section(HEAD, render(res))
        return
    rounds_n = a.rounds or (2 if a.quick else 5)
    B.SOCK_DIR = tempfile.mkdtemp(prefix="/tmp/rfsp")
    work = tempfile.mkdtemp(prefix="recoverfs-placement-", dir="/var/tmp")
    try:
        net_up()
        cfg = setup(work, a.quick)
        # Let the setup's gigabytes of dirty pages reach the disk before the
        # first measurement, not during it.
        os.sync()
        time.sleep(5)
        cfg["keep"] = a.keep
        order = list(ARMS)
        rounds = []
        for rnd in range(rounds_n):
            this = {}
            for arm in order[rnd % 3:] + order[:rnd % 3]:
                B.log(f"round {rnd + 1}/{rounds_n}: {arm}")
                this[arm] = run_arm(work, arm, rnd, cfg)
                B.log(f"  {arm}: placed {[p['point'] for p in this[arm]['placed']]}, "
                      f"p99 {this[arm]['p99_ms']:.1f} ms, boot {this[arm]['boot_s']:.1f} s")
            rounds.append(this)
        res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": a.quick,
               "probes": cfg["probes"], "delay_ms": DELAY_MS, "rounds": rounds,
               "ratios": ratio_rows(rounds)}
        res["analysis"] = analysis(res)
    finally:
        net_down()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(B.SOCK_DIR, ignore_errors=True)
    B.write_results(OUT_JSON, res, HEAD, render(res))


if __name__ == "__main__":
    main()
