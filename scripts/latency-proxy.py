#!/usr/bin/env python3
"""A TCP proxy that makes a loopback object store behave like a remote one.

This machine has no `tc netem`, so remote latency is added in user space:
every request/response exchange on a connection waits LATENCY before the
first byte of the response is passed back (one round trip per request, as
on a real network), and responses can share a bandwidth cap.

    scripts/latency-proxy.py --listen 127.0.0.1:9000 --upstream 127.0.0.1:3900 \
        --latency-ms 20 [--bandwidth-mbps 100] [--rate 2]

--bandwidth-mbps caps responses only (downloads); --rate caps both
directions, each with its own cap (a slow link: uploads too).

Point AWS_ENDPOINT_URL at the --listen address. Prints "ready" on stdout
once listening, and "bytes N" (response bytes passed on so far) on each
SIGUSR1: what the benchmarks count as bytes fetched. Stops on
SIGINT/SIGTERM.
"""
import argparse
import asyncio
import signal
import time

RESPONSE_BYTES = [0]


class Bucket:
    """Token bucket shared by all connections (bytes per second)."""

    def __init__(self, rate):
        self.rate = rate
        self.tokens = rate / 10
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n):
        if not self.rate:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.rate / 10, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= n or self.tokens >= self.rate / 10:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


async def pipe_requests(reader, writer, state, bucket):
    while data := await reader.read(1 << 16):
        state["pending"] = True
        await bucket.take(len(data))
        writer.write(data)
        await writer.drain()
    writer.close()


async def pipe_responses(reader, writer, state, latency, bucket):
    while data := await reader.read(1 << 16):
        if state["pending"]:
            # First bytes of a response: one network round trip.
            state["pending"] = False
            await asyncio.sleep(latency)
        await bucket.take(len(data))
        RESPONSE_BYTES[0] += len(data)
        writer.write(data)
        await writer.drain()
    writer.close()


async def handle(client_r, client_w, upstream, latency, bucket, up_bucket):
    host, port = upstream
    try:
        up_r, up_w = await asyncio.open_connection(host, port)
    except OSError:
        client_w.close()
        return
    state = {"pending": False}
    try:
        await asyncio.gather(
            pipe_requests(client_r, up_w, state, up_bucket),
            pipe_responses(up_r, client_w, state, latency, bucket),
        )
    except (ConnectionError, OSError):
        pass
    finally:
        client_w.close()
        up_w.close()


def hostport(s):
    host, _, port = s.rpartition(":")
    return host, int(port)


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, type=hostport)
    ap.add_argument("--upstream", required=True, type=hostport)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--bandwidth-mbps", type=float, default=0.0, help="MB/s cap on responses; 0 = none")
    ap.add_argument("--rate", type=float, default=0.0, help="MB/s cap on each direction; 0 = none")
    a = ap.parse_args()
    bucket = Bucket((a.rate or a.bandwidth_mbps) * 1e6)
    up_bucket = Bucket(a.rate * 1e6)
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, a.upstream, a.latency_ms / 1000.0, bucket, up_bucket), a.listen[0], a.listen[1]
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"bytes {RESPONSE_BYTES[0]}", flush=True))
    print("ready", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
