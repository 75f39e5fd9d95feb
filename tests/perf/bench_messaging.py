"""NATS messaging benchmark (a script, not a test): starts its own nats-server and prints

  * request/reply latency p50/p99 over N sequential requests (one responder, one client),
  * concurrent request throughput,
  * streaming throughput (frames/s and MB/s) for one stream of M frames.

Run: .venv/bin/python tests/perf/bench_messaging.py [--requests 2000] [--frames 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.messaging import Messenger, StreamContext  # noqa: E402
from tests.support.servers import start_nats  # noqa: E402


async def echo(data: bytes) -> bytes:
    return data


async def frames(data: bytes, ctx: StreamContext) -> AsyncIterator[bytes]:
    count, size = (int(x) for x in data.split(b","))
    chunk = b"t" * size
    for _ in range(count):
        yield chunk


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_latency(client: Messenger, n: int, payload: bytes) -> None:
    for _ in range(50):  # warm-up
        await client.request("bench.echo", payload, timeout=5)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.request("bench.echo", payload, timeout=5)
        lat.append((time.perf_counter() - t0) * 1e6)
    print(f"request/reply ({n} sequential, {len(payload)} B): p50 {percentile(lat, 0.5):.0f} us, "
          f"p99 {percentile(lat, 0.99):.0f} us, mean {statistics.fmean(lat):.0f} us")


async def bench_concurrent(client: Messenger, n: int, payload: bytes) -> None:
    t0 = time.perf_counter()
    await asyncio.gather(*(client.request("bench.echo", payload, timeout=30) for _ in range(n)))
    dt = time.perf_counter() - t0
    print(f"request/reply ({n} concurrent): {n / dt:,.0f} req/s")


async def bench_stream(client: Messenger, count: int, size: int) -> None:
    t0 = time.perf_counter()
    received = 0
    async with client.stream("bench.frames", f"{count},{size}".encode(), timeout=10) as s:
        async for chunk in s:
            received += len(chunk)
    dt = time.perf_counter() - t0
    print(f"stream ({count} frames of {size} B): {count / dt:,.0f} frames/s, "
          f"{received / dt / 1e6:.1f} MB/s, {dt * 1e3:.0f} ms total")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, start_nats(tmp) as server:
        worker = await Messenger.connect(server.url, name="bench-worker")
        client = await Messenger.connect(server.url, name="bench-client")
        try:
            await worker.serve_unary("bench.echo", echo, queue="bench")
            await worker.serve_stream("bench.frames", frames)
            await bench_latency(client, args.requests, b"x" * 256)
            await bench_concurrent(client, args.concurrent, b"x" * 256)
            await bench_stream(client, args.frames, 32)
            await bench_stream(client, max(1, args.frames // 10), 4096)
        finally:
            await client.close()
            await worker.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrent", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=50_000)
    asyncio.run(main(parser.parse_args()))
