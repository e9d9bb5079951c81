#!/usr/bin/env python3
"""Attributes perf samples to categories by their stacks: `perf script -F comm,tid,ip,sym -i perf.data | python3 scripts/bench/perf_attr.py [CPU-s per GiB]` (cpu_ab.py --perf keeps perf.data). A sample goes to the first category whose key appears anywhere in its stack. Without frame pointers user-space callers are unreliable, so kernel entry points name most categories."""
import sys, collections
CATS = [
  ("staging write (pwrite, page cache copy)", ["__x64_sys_pwrite64", "sys_pwrite"]),
  ("FUSE reply (writev to /dev/fuse)", ["fuse_dev_write", "__GI___writev", "do_writev"]),
  ("FUSE request read (/dev/fuse read)", ["fuse_dev_read", "fuse_dev_do_read"]),
  ("kernel recv (socket -> user)", ["tcp_recvmsg", "sock_recvmsg", "__x64_sys_recvfrom", "sock_read_iter"]),
  ("kernel send/other net", ["tcp_sendmsg", "__x64_sys_sendto", "__x64_sys_connect", "net_rx_action", "__do_softirq", "handle_softirqs"]),
  ("hashing (BLAKE3)", ["blake3"]),
  ("zstd", ["ZSTD_", "zstd"]),
  ("allocation / page faults", ["exc_page_fault", "asm_exc_page_fault", "malloc", "_int_free", "cfree", "__x64_sys_munmap", "__x64_sys_mmap", "__x64_sys_madvise", "malloc_trim", "realloc", "__libc_free"]),
  ("HTTP client user (hyper/reqwest/object_store/h2)", ["hyper", "reqwest", "object_store", "h2::", "http_body", "tower", "bytes::"]),
  ("scheduling / futex / epoll / wakeups", ["schedule", "futex", "epoll", "finish_task_switch", "__x64_sys_sched_yield", "do_sched_yield", "park", "Condvar", "try_to_wake_up", "crossbeam"]),
  ("tokio runtime", ["tokio::"]),
]
counts = collections.Counter(); total = 0
stack = []
def flush():
    global total
    if not stack: return
    total += 1
    # leaf-first frames; choose the first category whose key appears anywhere, in CATS priority
    text = "\n".join(stack)
    for name, keys in CATS:
        if any(k in text for k in keys):
            counts[name] += 1; break
    else:
        counts["other: " + (stack[0].split()[1] if len(stack[0].split())>1 else stack[0])[:60]] += 1
for line in sys.stdin:
    line=line.rstrip("\n")
    if not line.strip():
        flush(); stack=[]; continue
    if line.startswith("\t") or line.startswith(" "):
        stack.append(line.strip())
    else:
        stack=[]  # header line
flush()
cpu = float(sys.argv[1]) if len(sys.argv)>1 else None
print(f"| category | share of samples |" + (" CPU-s/GiB |" if cpu else ""))
print("|---|---:|" + ("---:|" if cpu else ""))
other=0
for k,v in counts.most_common():
    if k.startswith("other:") and v/total < 0.01: other+=v; continue
    print(f"| {k} | {100*v/total:.1f}% |" + (f" {cpu*v/total:.3f} |" if cpu else ""))
print(f"| other (each <1%) | {100*other/total:.1f}% |" + (f" {cpu*other/total:.3f} |" if cpu else ""))
print(f"samples {total}")
