"""Cold section of scripts/bench/run.py: first touches from a slow store.

One backend for everyone: the image is backed up into a Garage bucket (for
recoverfs) and uploaded to the same bucket as one raw object (for the
peers, which read it with ranged GETs through Garage's web endpoint).  Every
system reaches Garage through its own instance of the same latency proxy at
the same latency, so each pays the same per-request delay and the same
Garage on the same two cores.

Cases:
  seq          1 MiB sequential, 16 in flight, one pass (capped), 20 ms
  first_touch  4 KiB random reads aligned to 1 MiB (`blockalign`): every
               read is the first touch of its chunk; a fixed number of
               reads on a disk several times larger, 2 ms
Each case runs on the Garage backend (recoverfs FUSE and NBD; nbdkit curl
plugin; QEMU http driver under a buffered copy-on-read overlay, NBD export)
and on a store-independent backend (recoverfs on a local repository with
`serve --repo-delay-ms`, nbdkit file plugin with its delay filter).  A
raw-GET ceiling row measures the store itself: 16 ranged 1 MiB GETs in
flight straight at the proxy.

Systems are interleaved within each round; the report gives median and
spread over the rounds, CPU-seconds per GiB read of the system's own
process and, beside it, of Garage and the proxy (which serve only that
system during its run), and bytes passed by the proxy per byte read.  The
CPU target compares recoverfs's own process with the `--baseline-bin`
binary's own in the same rounds.
"""
import os
import time

import run as B

MiB = B.MiB
GiB = 1 << 30
INFLIGHT = 16
RAW_KEY = "raw/cold.raw"
NBDKIT_CONNS = 16  # the curl plugin serialises requests per connection

CASES = {
    # name: (rw, bs, latency ms, title, unit)
    "seq": ("read", "1M", 20, "1 MiB sequential, 16 in flight, 20 ms", "MB/s"),
    "first_touch": ("randread", "4k", 2, "4 KiB random first touches, 16 in flight, 2 ms", "first touches/s"),
}
GARAGE_SYSTEMS = ("recoverfs_fuse", "recoverfs_nbd", "recoverfs_fuse_64k", "nbdkit_curl", "qemu_http_cor")
# The chunk size is the backup's choice: 1 MiB (the default) fetches 256×
# a 4 KiB first touch, 64 KiB 16× but needs 16× the GETs per MiB streamed.
SMALL_CHUNK = "64K"
# Ranged GET sizes of the first-touch ceiling rows (4 KiB: what a first
# touch needs; 64 KiB: the small-chunk backup's GET).
SMALL_RANGES = (4 << 10, 64 << 10)
RECOVERFS_1M = ("recoverfs_fuse", "recoverfs_nbd")
LOCAL_SYSTEMS = ("recoverfs_fuse", "nbdkit_delay")
NAMES = {
    "recoverfs_fuse": "recoverfs FUSE (O_DIRECT, libaio QD16)",
    "recoverfs_nbd": "recoverfs NBD (fio nbd engine, QD16)",
    "recoverfs_fuse_64k": f"recoverfs FUSE, a backup of the same image with {SMALL_CHUNK}iB chunks "
                          "(O_DIRECT, libaio QD16)",
    "nbdkit_curl": f"nbdkit curl plugin (fio nbd engine, {NBDKIT_CONNS} connections × QD1; "
                   "serialises requests per connection)",
    "qemu_http_cor": "QEMU http driver → qcow2 overlay (buffered) + copy-on-read, NBD export "
                     "(fio nbd engine, QD16; the http driver keeps at most 8 requests in flight)",
    "nbdkit_delay": "nbdkit file plugin + delay filter (fio nbd engine, QD16)",
    "recoverfs_baseline": "baseline recoverfs binary (`--baseline-bin`), FUSE (O_DIRECT, libaio QD16)",
}


def fio_case(s, case, target, first_touches, runtime, conns=1, fuse=False):
    rw, bs, _, _, _ = CASES[case]
    qd = 1 if conns > 1 else INFLIGHT
    extra = []
    if case == "first_touch":
        # fio drops its random map with blockalign, so a few offsets can
        # repeat (about n²/2m of n reads over m chunks; the report says so).
        extra = ["--blockalign=1M", "--norandommap", f"--number_ios={max(1, first_touches // conns)}"]
    return B.fio_job(s.dir, f"{case}", target, rw, bs, qd, runtime, direct=1 if fuse else 0,
                     engine="libaio", numjobs=conns, time_based=False, extra=extra)


def recoverfs_system(s, repo, env, args, nbd, bin=None):
    sock = s.sock("rfs-nbd")
    rfs = B.Recoverfs(s, repo, env=env, args=["--no-profile"] + args + (["--nbd", f"unix:{sock}"] if nbd else []),
                      bin=bin).start()
    disk = rfs.recover("bench")
    if nbd:
        return rfs, f"nbd+unix:///bench/disk0?socket={sock}"
    return rfs, disk


def nbdkit_curl(s, url):
    sock = s.sock("nbdkit-curl")
    p = s.spawn("nbdkit-curl", ["nbdkit", "-f", "-r", "-U", sock, "curl", url])
    B.wait_for(lambda: os.path.exists(sock), 15, "nbdkit", p, s)
    return p, f"nbd+unix:///?socket={sock}"


def nbdkit_delay(s, image, latency_ms):
    sock = s.sock("nbdkit-delay")
    p = s.spawn("nbdkit-delay", ["nbdkit", "-f", "-r", "-U", sock, "--filter=delay", "file", image,
                                 f"delay-read={latency_ms}ms"])
    B.wait_for(lambda: os.path.exists(sock), 15, "nbdkit", p, s)
    return p, f"nbd+unix:///?socket={sock}"


def qemu_http_cor(s, url, size):
    ov = s.path("ov.qcow2")
    B.run(["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", url, "-u", ov, str(size)], timeout=60)
    sock = s.sock("qsd-nbd")
    p = s.spawn("qsd-cold", [
        "qemu-storage-daemon",
        "--blockdev", f"driver=http,node-name=bk,url={url},read-only=on",
        "--blockdev", f"file,node-name=of,filename={ov},cache.direct=off",
        "--blockdev", "qcow2,node-name=ov,file=of,backing=bk",
        "--blockdev", "copy-on-read,node-name=top,file=ov",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=top,name=disk0,writable=off"])
    B.wait_for(lambda: os.path.exists(sock), 30, "qemu-storage-daemon", p, s)
    return p, f"nbd+unix:///disk0?socket={sock}"


def raw_get_ceiling(workdir, url, size, n_requests, length=MiB, align=MiB):
    """`curl --parallel` (one C event loop) keeping INFLIGHT ranged GETs of
    `length` bytes of the raw object in flight straight at the proxy, each
    at a different `align`-aligned offset (1 MiB: like the first touches)."""
    cfg = os.path.join(workdir, "ceiling.curl")
    with open(cfg, "w") as f:
        for i in range(n_requests):
            off = (i * 7919 % (size // align)) * align
            f.write(f'url = "{url}"\nrange = "{off}-{off + length - 1}"\noutput = "/dev/null"\n')
    t = time.monotonic()
    r = B.run(["curl", "-s", "-f", "--parallel", "--parallel-immediate", "--parallel-max", str(INFLIGHT),
               "-w", "%{http_code} %{size_download}\\n", "-K", cfg], timeout=600, check=False)
    secs = time.monotonic() - t
    got = [line.split() for line in r.stdout.splitlines() if line.strip()]
    bad = [g for g in got if g[0] != "206" or int(g[1]) != length]
    if r.returncode != 0 or len(got) != n_requests or bad:
        raise RuntimeError(f"raw GET ceiling: curl rc {r.returncode}, {len(got)} replies, {len(bad)} bad: "
                           f"{(r.stderr or str(bad[:2]))[-200:]}")
    return {"mb_s": n_requests * length / secs / 1e6, "requests_per_s": n_requests / secs, "seconds": secs}


def one_run(cfg, work, ctx, backend, system, case):
    lat = CASES[case][2]
    px = ctx["proxies"][lat]
    with B.Scope(work, f"cold-{backend}-{system}-{case}") as s:
        rfs = None
        if backend == "garage" and system.startswith("recoverfs"):
            prefix = {"recoverfs_fuse_64k": "cold-small", "recoverfs_baseline": "cold-baseline"}.get(system, "cold")
            rfs, target = recoverfs_system(s, f"s3://{B.Garage.BUCKET}/{prefix}", ctx["garage"].env(px["s3"]), [],
                                           system == "recoverfs_nbd",
                                           cfg.baseline_bin if system == "recoverfs_baseline" else None)
            proxy = px["s3_proc"]
            pids = {"system": rfs.proc.pid, "garage": ctx["garage"].proc.pid, "proxy": proxy.pid}
        elif backend == "local":
            if system == "recoverfs_fuse":
                rfs, target = recoverfs_system(s, ctx["local_repo"], None, ["--repo-delay-ms", str(lat)], False)
                pids = {"system": rfs.proc.pid}
            else:
                p, target = nbdkit_delay(s, ctx["image"], lat)
                pids = {"system": p.pid}
            proxy = None
        else:
            url = ctx["garage"].web_url(px["web"], RAW_KEY)
            if system == "nbdkit_curl":
                p, target = nbdkit_curl(s, url)
            else:
                p, target = qemu_http_cor(s, url, ctx["image_bytes"])
            proxy = px["web_proc"]
            pids = {"system": p.pid, "garage": ctx["garage"].proc.pid, "proxy": proxy.pid}
        B.drop_caches()
        m = B.Meter(pids, proxy).start()
        r = fio_case(s, case, target, cfg.first_touches, cfg.cold_runtime,
                     conns=NBDKIT_CONNS if system == "nbdkit_curl" else 1,
                     # The baseline binary is read exactly like recoverfs_fuse (O_DIRECT): buffered
                     # reads would reach it as 256 KiB kernel-readahead requests, other work.
                     fuse=system in ("recoverfs_fuse", "recoverfs_fuse_64k", "recoverfs_baseline"))
        r.update(m.stop())
        r["value"] = r["mb_s"] if case == "seq" else r["iops"]
        gib = r["io_bytes"] / GiB
        r["cpu_s_per_gib"] = r["cpu_s"] / gib if gib else None
        # The system's own processes, and the store's (Garage + proxy) beside.
        by = r["cpu_s_by"]
        r["own_cpu_s_per_gib"] = by["system"] / gib if gib else None
        store = by.get("garage", 0) + by.get("proxy", 0)
        r["store_cpu_s_per_gib"] = store / gib if gib and "garage" in by else None
        r["cpu_ms_per_read"] = r["cpu_s"] * 1000 / r["ios"] if r.get("ios") else None
        if "proxy_bytes" in r and r["io_bytes"]:
            r["fetched_per_read_byte"] = r["proxy_bytes"] / r["io_bytes"]
        if rfs:
            st = rfs.status("bench")["disks"][0]
            r.update({k: st.get(k) for k in ("fetched_bytes", "reads", "read_hits",
                                             "fetch_latency_mean_ms", "fetch_latency_p99_ms")})
            if r["io_bytes"] and proxy is None:
                r["fetched_per_read_byte"] = st["fetched_bytes"] / r["io_bytes"]
        return r


def section_cold(cfg, work, image, garage):
    res = {"runtime_s": cfg.cold_runtime, "rounds": cfg.rounds, "image_bytes": os.path.getsize(image),
           "first_touches": cfg.first_touches, "inflight": INFLIGHT, "chunk": B.CHUNK,
           "runs": {}, "errors": {}, "ceiling": {}, "small_ceiling": {}}
    ctx = {"garage": garage, "image": image, "image_bytes": os.path.getsize(image), "proxies": {}}
    t = time.monotonic()
    res["backup"] = B.backup(f"s3://{B.Garage.BUCKET}/cold", "bench", image, env=garage.env())
    res["backup_small"] = B.backup(f"s3://{B.Garage.BUCKET}/cold-small", "bench", image, env=garage.env(),
                                   chunk=SMALL_CHUNK)
    if cfg.baseline_bin:
        # Each binary reads a backup it wrote itself: the chunks' stored form
        # is the writer's (since the raw form for incompressible chunks, the
        # baseline could not read this binary's backup, nor would it be the
        # same work).
        res["backup_baseline"] = B.backup(f"s3://{B.Garage.BUCKET}/cold-baseline", "bench", image,
                                          env=garage.env(), bin=cfg.baseline_bin)
    garage.put_file(RAW_KEY, image)
    top = B.Scope(work, "cold-top")
    try:
        ctx["local_repo"] = top.path("local-repo")
        B.backup(ctx["local_repo"], "bench", image)
        B.log(f"cold: backups and raw upload done in {time.monotonic() - t:.0f}s")
        for lat in sorted({c[2] for c in CASES.values()}):
            s3 = B.start_proxy(top, garage.s3_port, lat, name=f"proxy-s3-{lat}ms")
            s3_proc = top.procs[-1]
            web = B.start_proxy(top, garage.web_port, lat, name=f"proxy-web-{lat}ms")
            ctx["proxies"][lat] = {"s3": s3, "s3_proc": s3_proc, "web": web, "web_proc": top.procs[-1]}
        gsys = GARAGE_SYSTEMS + (("recoverfs_baseline",) if cfg.baseline_bin else ())
        combos = [("garage", sy, c) for c in CASES for sy in gsys] + \
                 [("local", sy, c) for c in CASES for sy in LOCAL_SYSTEMS]
        for rnd in range(cfg.rounds):
            for case in CASES:
                lat = CASES[case][2]
                px = ctx["proxies"][lat]
                try:
                    B.drop_caches()
                    c = raw_get_ceiling(top.dir, garage.web_url(px["web"], RAW_KEY), ctx["image_bytes"],
                                        INFLIGHT * (8 if cfg.quick else 16))
                    res["ceiling"].setdefault(str(lat), []).append(c)
                except Exception as e:
                    res["errors"][f"ceiling/{lat}"] = str(e)[:300]
                if case != "first_touch":
                    continue
                # What the store serves one GET per first touch, at the
                # sizes a first touch can fetch: the bound of any system.
                for length in SMALL_RANGES:
                    try:
                        B.drop_caches()
                        c = raw_get_ceiling(top.dir, garage.web_url(px["web"], RAW_KEY), ctx["image_bytes"],
                                            INFLIGHT * (8 if cfg.quick else 16), length)
                        res["small_ceiling"].setdefault(str(length), []).append(c)
                    except Exception as e:
                        res["errors"][f"ceiling/{lat}/{length}"] = str(e)[:300]
            # Interleave: every system of every case once per round, order rotated.
            order = combos[rnd % len(combos):] + combos[:rnd % len(combos)]
            for backend, system, case in order:
                key = f"{backend}/{case}/{system}"
                try:
                    r = one_run(cfg, work, ctx, backend, system, case)
                    res["runs"].setdefault(key, []).append(r)
                    B.log(f"cold round {rnd + 1} {key}: {r['value']:.0f} {CASES[case][4]}, "
                          f"cpu {r['cpu_s']:.2f}s (own {r['cpu_s_by']['system']:.2f}s), fetched/read {r.get('fetched_per_read_byte', 0):.1f}")
                except Exception as e:
                    res["errors"][key] = str(e)[:300]
                    B.log(f"cold {key}: FAILED {e}")
    finally:
        top.close()
    summarise(res)
    return res


def summarise(res):
    sm = {}
    for key, runs in res["runs"].items():
        sm[key] = {f: B.spread([r.get(f) for r in runs])
                   for f in ("value", "cpu_s_per_gib", "own_cpu_s_per_gib", "store_cpu_s_per_gib",
                             "cpu_ms_per_read", "fetched_per_read_byte")}
        if any(r.get("reads") for r in runs):
            sm[key]["waited"] = B.spread([(r["reads"] - r["read_hits"]) / r["reads"] for r in runs if r.get("reads")])
    res["summary"] = sm
    res["ceiling_summary"] = {lat: {"mb_s": B.spread([c["mb_s"] for c in cs]),
                                    "requests_per_s": B.spread([c["requests_per_s"] for c in cs])}
                              for lat, cs in res["ceiling"].items()}
    res["small_ceiling_summary"] = {n: {"mb_s": B.spread([c["mb_s"] for c in cs]),
                                        "requests_per_s": B.spread([c["requests_per_s"] for c in cs])}
                                    for n, cs in res.get("small_ceiling", {}).items()}
    res["verdicts"] = {}
    # The target compares the daemon's own CPU with the baseline binary's
    # own (same backend, same work, same rounds); Garage and the proxy are
    # the store's cost, compared beside it.
    for field, out in (("own_cpu_s_per_gib", "cpu_vs_baseline"), ("cpu_s_per_gib", "cpu_total_vs_baseline")):
        new = sm.get("garage/seq/recoverfs_fuse", {}).get(field)
        old = sm.get("garage/seq/recoverfs_baseline", {}).get(field)
        if new and old and old["median"]:
            res[out] = new["median"] / old["median"]
            res[out + "_figures"] = {"recoverfs": new["median"], "baseline": old["median"]}
    for backend, systems, peers in (("garage", GARAGE_SYSTEMS, ("nbdkit_curl", "qemu_http_cor")),
                                    ("local", LOCAL_SYSTEMS, ("nbdkit_delay",))):
        for case in CASES:
            med = {sy: sm[f"{backend}/{case}/{sy}"]["value"]["median"]
                   for sy in systems if sm.get(f"{backend}/{case}/{sy}", {}).get("value")}
            best_peer = max((med[p] for p in peers if p in med), default=None)
            best_rfs = max((med[x] for x in med if x in RECOVERFS_1M), default=None)
            small = med.get("recoverfs_fuse_64k")
            v = {"best_peer": best_peer, "recoverfs": best_rfs,
                 "ratio_vs_best_peer": best_rfs / best_peer if best_rfs and best_peer else None,
                 "recoverfs_small_chunks": small,
                 "small_vs_best_peer": small / best_peer if small and best_peer else None}
            if case == "first_touch" and backend == "garage":
                four = res["small_ceiling_summary"].get(str(4 << 10), {}).get("requests_per_s")
                if four:
                    v.update(ceiling_4k_per_s=four["median"],
                             target_per_s=2 * best_peer if best_peer else None)
            if case == "seq":
                lat = CASES[case][2]
                little = INFLIGHT * B.CHUNK / (lat / 1000) / 1e6
                # The raw-GET ceiling is Garage's: it bounds the Garage rows only.
                ceil = res["ceiling_summary"].get(str(lat), {}).get("mb_s") if backend == "garage" else None
                bound = min(little, ceil["median"]) if ceil else little
                v.update(little_mb_s=little, ceiling_mb_s=ceil["median"] if ceil else None, bound_mb_s=bound,
                         ratio_vs_bound=best_rfs / bound if best_rfs else None)
            res["verdicts"][f"{backend}/{case}"] = v


def targets(c):
    out = []
    if c.get("cpu_vs_baseline") is not None:
        r, f = c["cpu_vs_baseline"], c.get("cpu_vs_baseline_figures")
        tot = c.get("cpu_total_vs_baseline")
        beside = f"; with Garage + proxy {tot:.2f}×" if tot is not None else ""
        # Results from before the per-process split measured the sum only.
        what = "the daemon's own process" if f else "recoverfs + Garage + proxy"
        figs = f" ({f['recoverfs']:.2f} vs {f['baseline']:.2f} CPU-s/GiB{beside})" if f else ""
        out.append(f"| CPU-seconds per cold GiB (sequential FUSE, {what}) ≤ 0.6× the baseline binary's, side by "
                   f"side | {r:.2f}×{figs} | {'met' if r <= 0.6 else '**missed**'} |")
    else:
        out.append("| CPU-seconds per cold GiB ≤ 0.6× today's binary | not measured: run with `--baseline-bin` "
                   "(the older binary) | — |")
    v = c.get("verdicts", {}).get("garage/seq")
    if v and v.get("ratio_vs_best_peer") is not None:
        ok = v["ratio_vs_best_peer"] >= 3 and (v.get("ratio_vs_bound") or 0) >= 0.8
        out.append(f"| cold sequential, 20 ms, same Garage backend: ≥ 3× best peer, ≥ 80% of "
                   f"min(16 × 1 MiB ÷ 20 ms, raw-GET ceiling) | {v['ratio_vs_best_peer']:.2f}× best peer, "
                   f"{v['ratio_vs_bound']:.0%} of {v['bound_mb_s']:,.0f} MB/s | {'met' if ok else '**missed**'} |")
    v = c.get("verdicts", {}).get("garage/first_touch")
    if v and v.get("ratio_vs_best_peer") is not None:
        ok = v["ratio_vs_best_peer"] >= 2
        small = ""
        if v.get("small_vs_best_peer") is not None:
            small = (f"; a {SMALL_CHUNK}iB-chunk backup: {v['small_vs_best_peer']:.2f}× "
                     f"({v['recoverfs_small_chunks']:,.0f}/s)")
            ok_small = "met" if v["small_vs_best_peer"] >= 2 else "missed"
            small_verdict = f"; {ok_small} with {SMALL_CHUNK}iB chunks"
        else:
            small_verdict = ""
        out.append(f"| cold 4 KiB random first touches, 2 ms: ≥ 2× best peer | 1 MiB chunks (default): "
                   f"{v['ratio_vs_best_peer']:.2f}× ({v['recoverfs']:,.0f} vs {v['best_peer']:,.0f}/s){small} | "
                   f"{'met' if ok else '**missed**'} with 1 MiB chunks{small_verdict} |")
    return out


def render(c):
    L = ["## 2. Cold reads: first touches, one backend for everyone\n"]
    if "error" in c:
        return L + [f"FAILED: {c['error']}\n"]
    L.append(
        f"{c['image_bytes'] / MiB:.0f} MiB random image with zero holes. **Garage backend:** recoverfs reads its "
        f"backup (1 MiB chunks, `--fetch-workers {INFLIGHT}`, `--no-profile`, fresh staging per run) through the "
        "S3 API; the peers read the same image uploaded to the same bucket as one raw object, by ranged GETs "
        "through Garage's web endpoint. Each system has its own `scripts/latency-proxy.py` at the same latency "
        "in front of the same Garage, so all pay the same per-request delay and the same store on the same cores. "
        "**Store-independent backend:** recoverfs on a local repository with `serve --repo-delay-ms L` (a sleep "
        "before every chunk read) vs nbdkit's file plugin with `--filter=delay delay-read=L` (a sleep before "
        "every read, in parallel threads). Page cache dropped before every run. "
        f"{c['rounds']} rounds, every system once per round in rotated order; median (min–max).\n")
    L.append(
        f"**Sequential:** one pass (capped at {c['runtime_s']} s), 16 requests in flight. **First touches:** "
        f"{c['first_touches']} 4 KiB reads at random 1 MiB-aligned offsets (fio `blockalign=1M`), so every read "
        "is the first touch of its 1 MiB chunk on a disk "
        f"{c['image_bytes'] // MiB // max(1, c['first_touches'])}× larger than what the run touches, except "
        "repeats: fio has no random map with `blockalign`, so about n²/2m of n reads over m chunks "
        f"(≈ {c['first_touches'] ** 2 / 2 / (c['image_bytes'] // MiB) / c['first_touches']:.0%}) hit a chunk "
        "read before. "
        "**Peers at their best:** fio's `nbd` engine straight on their NBD exports (no FUSE bridge) at the same "
        f"requests in flight; the nbdkit curl plugin serialises requests per connection (thread model "
        f"`serialize_requests` in nbdkit 1.32), so it is read over {NBDKIT_CONNS} connections × QD1; the QEMU "
        "overlay is buffered (`cache.direct=off`). **Raw-GET ceiling:** `curl --parallel --parallel-max 16` keeping 16 "
        "ranged 1 MiB GETs of the raw object in flight straight at the proxy: what the store delivers at this "
        "concurrency. recoverfs does not fetch the image's zero chunks (every 8th MiB and a 16 MiB hole), the "
        "peers read them from the store like any other range, so recoverfs's sequential MB/s can exceed the "
        "ceiling. **Cost:** CPU-seconds (user+system, `/proc/PID/stat`, every thread) of the system's own "
        "process (\"own\"), of Garage and the proxy, which serve only that system during its run (\"store\"), "
        "and their sum (\"total\"); bytes fetched per byte read from the bytes "
        "the proxy passed on (its response-byte count), on the store-independent backend recoverfs's `status` fetched bytes.\n")
    for lat, cs in c.get("ceiling_summary", {}).items():
        L.append(f"Raw-GET ceiling at {lat} ms, 16 × 1 MiB in flight: {B.fmt_spread(cs['mb_s'])} MB/s, "
                 f"{B.fmt_spread(cs['requests_per_s'])} GETs/s (Little's law bound: "
                 f"{INFLIGHT / (int(lat) / 1000):,.0f} GETs/s).\n")
    ft = CASES["first_touch"][2]
    for n, cs in sorted(c.get("small_ceiling_summary", {}).items(), key=lambda kv: int(kv[0])):
        L.append(f"Raw-GET ceiling at {ft} ms, 16 × {int(n) >> 10} KiB in flight (1 MiB-aligned offsets, like the "
                 f"first touches): {B.fmt_spread(cs['requests_per_s'])} GETs/s, {B.fmt_spread(cs['mb_s'])} MB/s.\n")
    L.append("| backend | case | system | value | own CPU-s / GiB read | store CPU-s / GiB | total CPU-s / GiB | "
             "total CPU ms / read | bytes fetched / byte read | reads that waited |")
    L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for backend, systems in (("garage", GARAGE_SYSTEMS + ("recoverfs_baseline",)), ("local", LOCAL_SYSTEMS)):
        for case in CASES:
            for sy in systems:
                key = f"{backend}/{case}/{sy}"
                sm = c.get("summary", {}).get(key)
                if not sm:
                    err = c.get("errors", {}).get(key)
                    if err:
                        L.append(f"| {backend} | {CASES[case][3]} | {NAMES[sy]} | FAILED: "
                                 f"{err[:160].replace('|', '/')} | | | | | | |")
                    continue
                w = sm.get("waited")
                waited = f"{w['median']:.0%}" if w else "—"
                L.append(f"| {backend} | {CASES[case][3]} | {NAMES[sy]} | {B.fmt_spread(sm['value'])} "
                         f"{CASES[case][4]} | {B.fmt_spread(sm.get('own_cpu_s_per_gib'), 2)} | "
                         f"{B.fmt_spread(sm.get('store_cpu_s_per_gib'), 2)} | {B.fmt_spread(sm['cpu_s_per_gib'], 2)} | "
                         f"{B.fmt_spread(sm['cpu_ms_per_read'], 2)} | {B.fmt_spread(sm['fetched_per_read_byte'], 1)} | "
                         f"{waited} |")
    L.append("")
    L.append("| backend | case | best recoverfs / best peer | bound | recoverfs / bound |")
    L.append("|---|---|---:|---:|---:|")
    for key, v in c.get("verdicts", {}).items():
        backend, case = key.split("/")
        L.append(f"| {backend} | {CASES[case][3]} | {B.fmt(v.get('ratio_vs_best_peer'), 2)}× | "
                 f"{B.fmt(v.get('bound_mb_s'))}{' MB/s' if v.get('bound_mb_s') else ''} | "
                 f"{B.fmt((v.get('ratio_vs_bound') or 0) * 100) + '%' if v.get('ratio_vs_bound') else '—'} |")
    L.append("")
    v = c.get("verdicts", {}).get("garage/first_touch", {})
    ceil = c.get("ceiling_summary", {}).get(str(CASES["first_touch"][2]), {}).get("requests_per_s")
    if v.get("ratio_vs_best_peer") is not None and v["ratio_vs_best_peer"] < 2 and ceil:
        L.append(f"First touches missed: each first touch costs recoverfs a whole {B.CHUNK // MiB} MiB chunk "
                 "(bytes fetched per byte read above), so its first-touch rate is bounded by the store's 1 MiB GET "
                 f"rate at 16 in flight, {ceil['median']:,.0f} GETs/s in the ceiling row, while the peers fetch "
                 "4–256 KiB ranges.\n")
    small = {int(n): cs["requests_per_s"]["median"] for n, cs in c.get("small_ceiling_summary", {}).items()
             if cs.get("requests_per_s")}
    if v.get("target_per_s") and small:
        best_len = max(small, key=small.get)
        fastest = max(small[best_len], ceil["median"] if ceil else 0)
        sizes = ", ".join(f"{n >> 10} KiB {r:,.0f}/s" for n, r in sorted(small.items()))
        L.append(f"The target, 2× the best peer, is {v['target_per_s']:,.0f} first touches/s. At 16 in flight the "
                 f"store serves ranged GETs at {sizes} and 1 MiB {ceil['median'] if ceil else 0:,.0f}/s (the ceiling "
                 "rows above; Garage answers ranges under 64 KiB slowest, also without the proxy in between). "
                 + ("A system making one GET per first touch could reach the target only at the fastest size."
                    if v["target_per_s"] <= fastest else
                    f"Even a system making one GET per first touch, at the store's fastest size, would get at most "
                    f"{fastest:,.0f}/s: the target is above what this store serves any system at this "
                    "concurrency.") + "\n")
    v = c.get("verdicts", {}).get("garage/seq", {})
    if v.get("ratio_vs_best_peer") is not None and v["ratio_vs_best_peer"] < 3 and v.get("bound_mb_s"):
        L.append(f"Sequential missed ≥ 3× best peer: the bound is min(16 × 1 MiB ÷ 20 ms = "
                 f"{v['little_mb_s']:,.0f} MB/s, raw-GET ceiling {B.fmt(v.get('ceiling_mb_s'))} MB/s) = "
                 f"{v['bound_mb_s']:,.0f} MB/s; the best peer already reaches "
                 f"{B.fmt(v['best_peer'] / v['bound_mb_s'] * 100 if v.get('best_peer') else None)}% of it, so "
                 "3× the best peer would be more than the store delivers here.\n")
    for k, e in c.get("errors", {}).items():
        if k.startswith("ceiling"):
            L.append(f"* {k} FAILED: {e.replace('|', '/')}")
    L.append("")
    return L
