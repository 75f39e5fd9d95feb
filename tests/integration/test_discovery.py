"""Discovery against a real etcd: registration, leases, watchers, model cards, etcd restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from common.discovery import Discovery, DiscoveryError, InstanceEvent, InstanceWatcher
from common.protocol import InstanceRecord, ModelCard, Role, instance_prefix
from tests.support.servers import ServerProc, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TTL = 2.0

# A worker stand-in run as its own process: registers with a short lease, says READY, then idles
# until it is killed (SIGKILL: no chance to deregister) or told to stop (SIGTERM: deregisters).
WORKER_SCRIPT = """
import asyncio, signal, sys
from common.discovery import Discovery
from common.protocol import InstanceRecord, Role

async def main(endpoints, namespace, instance_id, ttl):
    disc = await Discovery.connect(endpoints, namespace)
    rec = InstanceRecord(instance_id=instance_id, role=Role.DECODE, model="m",
                         subject=f"{namespace}.inst.{instance_id}")
    reg = await disc.register(rec, ttl=float(ttl))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await reg.deregister()
    await disc.close()

asyncio.run(main(*sys.argv[1:]))
"""


def record(instance_id: str, ns: str, role: Role = Role.DECODE, model: str = "m") -> InstanceRecord:
    return InstanceRecord(instance_id=instance_id, role=role, model=model,
                          subject=instance_prefix(ns, instance_id), pid=os.getpid())


class WorkerProc:
    """The worker script as a child process, stopped by PID."""

    def __init__(self, endpoints: str, namespace: str, instance_id: str, ttl: float = TTL) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, endpoints, namespace, instance_id, str(ttl)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
        line = self.proc.stdout.readline() if self.proc.stdout else b""
        if line.strip() != b"READY":
            self.stop()
            raise RuntimeError(f"worker did not start: {line!r} {self.proc.stderr.read()!r}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10)


@pytest.fixture
def workers() -> Iterator[list[WorkerProc]]:
    started: list[WorkerProc] = []
    yield started
    for w in started:
        w.stop()


@pytest.fixture
async def disc(etcd_server: ServerProc, namespace: str) -> AsyncIterator[Discovery]:
    d = await Discovery.connect(etcd_server.url, namespace)
    yield d
    await d.close()


async def next_event(watcher: InstanceWatcher, timeout: float) -> InstanceEvent:
    async with asyncio.timeout(timeout):
        async for ev in watcher.events():
            return ev
    raise AssertionError("unreachable")


async def until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_connect_to_nothing_fails_clearly() -> None:
    with pytest.raises(DiscoveryError, match="did not answer"):
        await Discovery.connect(f"http://127.0.0.1:{free_port()}", timeout=1.0)


async def test_register_list_filter_and_deregister(disc: Discovery) -> None:
    regs = [await disc.register(record("d1", disc.namespace), ttl=TTL),
            await disc.register(record("d2", disc.namespace, model="other"), ttl=TTL),
            await disc.register(record("p1", disc.namespace, role=Role.PREFILL), ttl=TTL)]
    everything = {r.instance_id for r in await disc.list_instances()}
    assert everything == {"d1", "d2", "p1"}
    assert {r.instance_id for r in await disc.list_instances(role=Role.DECODE)} == {"d1", "d2"}
    assert [r.instance_id for r in await disc.list_instances(Role.DECODE, model="m")] == ["d1"]
    assert [r.instance_id for r in await disc.list_instances(model="m")] == ["d1", "p1"]
    got = (await disc.list_instances(role=Role.PREFILL))[0]
    assert got == record("p1", disc.namespace, role=Role.PREFILL)
    for reg in regs:
        await reg.deregister()
    assert await disc.list_instances() == []


async def test_keepalive_holds_registration_past_ttl(disc: Discovery) -> None:
    reg = await disc.register(record("w", disc.namespace), ttl=TTL)
    await asyncio.sleep(TTL * 2)
    assert [r.instance_id for r in await disc.list_instances()] == ["w"]
    assert reg.reregistrations == 0
    await reg.deregister()


async def test_clean_shutdown_deregisters_at_once(disc: Discovery, workers: list[WorkerProc],
                                                  etcd_server: ServerProc) -> None:
    async with disc.watch_instances(role=Role.DECODE) as watcher:
        workers.append(WorkerProc(etcd_server.url, disc.namespace, "clean", ttl=10.0))
        await watcher.wait_for(lambda s: "clean" in s, timeout=5)
        t0 = time.monotonic()
        workers[0].signal(signal.SIGTERM)
        await watcher.wait_for(lambda s: "clean" not in s, timeout=3)
        # Far below the 10 s lease: the record was deleted, not left to expire.
        assert time.monotonic() - t0 < 3
    assert workers[0].proc.wait(5) == 0


async def test_killed_worker_vanishes_within_ttl(disc: Discovery, workers: list[WorkerProc],
                                                etcd_server: ServerProc) -> None:
    async with disc.watch_instances(role=Role.DECODE, model="m") as watcher:
        workers.append(WorkerProc(etcd_server.url, disc.namespace, "doomed"))
        ev = await next_event(watcher, timeout=5)
        assert (ev.type, ev.instance_id, ev.record.model) == ("put", "doomed", "m")
        t0 = time.monotonic()
        workers[0].signal(signal.SIGKILL)
        ev = await next_event(watcher, timeout=TTL + 2)
        elapsed = time.monotonic() - t0
        assert (ev.type, ev.instance_id) == ("delete", "doomed")
        assert elapsed <= TTL + 2
        assert watcher.snapshot() == {}
    assert await disc.list_instances() == []


async def test_lost_lease_is_replaced(disc: Discovery) -> None:
    reg = await disc.register(record("w", disc.namespace), ttl=TTL)
    old_lease = reg.lease_id
    async with disc.watch_instances() as watcher:
        await disc._revoke(old_lease)  # what etcd does when a lease runs out while we were cut off
        await watcher.wait_for(lambda s: "w" not in s, timeout=2)
        await watcher.wait_for(lambda s: "w" in s, timeout=TTL + 2)
    await until(lambda: reg.reregistrations == 1, timeout=1)
    assert reg.lease_id != old_lease
    await reg.deregister()


async def test_model_cards(disc: Discovery) -> None:
    card = ModelCard(name="qwen/tiny", path="/models/tiny", context_length=4096,
                     image_token_id=7, eos_token_ids=(2, 3))
    assert await disc.get_model_card("qwen/tiny") is None
    await disc.put_model_card(card)
    assert await disc.get_model_card("qwen/tiny") == card
    reg = await disc.register(record("w", disc.namespace), ttl=TTL)
    leased = ModelCard(name="leased", path="/m", context_length=128)
    await disc.put_model_card(leased, lease_of=reg)
    assert sorted(c.name for c in await disc.list_model_cards()) == ["leased", "qwen/tiny"]
    await reg.deregister()  # the leased card goes with its registration
    assert await disc.list_model_cards() == [card]


async def test_watch_ignores_other_models_and_malformed_records(disc: Discovery) -> None:
    async with disc.watch_instances(model="m") as watcher:
        await disc._put(f"{disc.instances_prefix(Role.DECODE)}junk", b"{not json")
        other = await disc.register(record("o", disc.namespace, model="other"), ttl=TTL)
        mine = await disc.register(record("x", disc.namespace), ttl=TTL)
        ev = await next_event(watcher, timeout=3)
        assert (ev.type, ev.instance_id) == ("put", "x")
        assert set(watcher.snapshot()) == {"x"}
        await other.deregister()
        await mine.deregister()
        ev = await next_event(watcher, timeout=3)
        assert (ev.type, ev.instance_id) == ("delete", "x")


async def test_survives_etcd_restart(own_etcd: ServerProc, namespace: str,
                                     workers: list[WorkerProc]) -> None:
    disc = await Discovery.connect(own_etcd.url, namespace)
    try:
        reg = await disc.register(record("stay", namespace), ttl=TTL)
        workers.append(WorkerProc(own_etcd.url, namespace, "dies-while-down"))
        async with disc.watch_instances() as watcher:
            await watcher.wait_for(lambda s: set(s) == {"stay", "dies-while-down"}, timeout=5)
            resyncs = watcher.resyncs
            own_etcd.stop()
            workers[0].signal(signal.SIGKILL)  # its lease can only expire once etcd is back
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own_etcd.start)
            await watcher.wait_for(lambda s: set(s) == {"stay"}, timeout=TTL + 6)
            late = await disc.register(record("late", namespace), ttl=TTL)
            await watcher.wait_for(lambda s: set(s) == {"stay", "late"}, timeout=3)
            assert watcher.resyncs > resyncs
            await asyncio.sleep(TTL * 1.5)  # keepalive works again: nothing expires
            assert {r.instance_id for r in await disc.list_instances()} == {"stay", "late"}
            await late.deregister()
        await reg.deregister()
    finally:
        await disc.close()


async def test_survives_etcd_losing_its_data(own_etcd: ServerProc, namespace: str) -> None:
    disc = await Discovery.connect(own_etcd.url, namespace)
    try:
        reg = await disc.register(record("w", namespace), ttl=TTL)
        await disc.put_model_card(ModelCard(name="m", path="/m", context_length=64), lease_of=reg)
        async with disc.watch_instances() as watcher:
            await asyncio.to_thread(own_etcd.restart, wipe=True)
            # The old lease is unknown to the new etcd: the registration writes itself again,
            # and the watcher (whose revision is now in the future) re-lists.
            await until(lambda: reg.reregistrations >= 1, timeout=TTL + 4)
            await watcher.wait_for(lambda s: "w" in s, timeout=3)
            assert [c.name for c in await disc.list_model_cards()] == ["m"]
            await reg.deregister()
            await watcher.wait_for(lambda s: s == {}, timeout=3)
    finally:
        await disc.close()
