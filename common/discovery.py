"""Service discovery on etcd: who is serving what, and the model cards.

Keys (DESIGN section 3):
  <namespace>/instances/<role>/<instance_id> -> InstanceRecord JSON, bound to the worker's lease
  <namespace>/models/<name>                  -> ModelCard JSON

This is the only module that imports the etcd client (etcd3aio), so the client can be swapped.

Failure handling, in short:
  * A registration keeps its lease alive from a background task. When etcd is unreachable it
    retries quickly; when the lease is gone (expired while we were cut off, or etcd lost its data)
    it grants a new lease and writes the record (and attached keys) again.
  * A watcher lists, then watches from the listed revision. A health probe notices an etcd restart
    (the raft term or cluster id changes) or a lost connection coming back; the watcher then
    re-lists, reports the difference as events and watches again, so ``snapshot()`` is right.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import grpc
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end

from common.protocol import InstanceRecord, ModelCard, ProtocolError, Role

log = logging.getLogger(__name__)

# Errors an etcd call raises when the server is away: retried, never fatal to a background task.
_ETCD_DOWN = (EtcdError, grpc.aio.AioRpcError, asyncio.TimeoutError, OSError)
_RPC_TIMEOUT_S = 2.0
_PROBE_INTERVAL_S = 0.5
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


class DiscoveryError(Exception):
    """etcd could not be reached, or gave an answer discovery cannot use."""


def _etcd_errors(what: str) -> Callable[[_F], _F]:
    """Raise the client library's errors as DiscoveryError, so callers never see etcd3aio types."""
    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        async def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except _ETCD_DOWN as exc:
                raise DiscoveryError(f"{what} failed: etcd unreachable or refused ({exc})") from exc
        return inner  # type: ignore[return-value]
    return wrap


def _endpoint_list(endpoints: str) -> list[str]:
    """'http://h1:2379,http://h2:2379' -> ['h1:2379', 'h2:2379'] (bare host:port also accepted)."""
    out = []
    for entry in (e.strip() for e in endpoints.split(",")):
        if not entry:
            continue
        url = urlparse(entry if "://" in entry else f"http://{entry}")
        if not url.hostname or url.port is None:
            raise DiscoveryError(f"etcd endpoint {entry!r} is not like http://HOST:PORT")
        out.append(f"{url.hostname}:{url.port}")
    if not out:
        raise DiscoveryError("no etcd endpoints given; pass e.g. http://127.0.0.1:2379")
    return out


@dataclass(frozen=True)
class InstanceEvent:
    """One change seen by a watcher. ``record`` is the new record (put) or the last one (delete)."""

    type: str  # "put" | "delete"
    instance_id: str
    record: InstanceRecord


class Discovery:
    """An etcd connection scoped to one namespace."""

    def __init__(self, client: Etcd3Client, endpoints: str, namespace: str) -> None:
        self._client = client
        self.endpoints = endpoints
        self.namespace = namespace
        self._registrations: set[Registration] = set()
        self._watchers: set[InstanceWatcher] = set()

    @classmethod
    async def connect(cls, endpoints: str, namespace: str = "triad",
                      timeout: float = 5.0) -> Discovery:
        """Connect and check that etcd answers within ``timeout`` seconds."""
        client = Etcd3Client(_endpoint_list(endpoints), watch_reconnect_backoff_seconds=0.1,
                             watch_max_reconnect_backoff_seconds=1.0)
        await client.connect()
        try:
            await client.ping(write_check=False, timeout=timeout)
        except (*_ETCD_DOWN, TimeoutError) as exc:
            await client.close()
            raise DiscoveryError(f"etcd at {endpoints} did not answer within {timeout} s: {exc}") from exc
        return cls(client, endpoints, namespace)

    # ------------------------------------------------------------------ keys

    def instances_prefix(self, role: Role | None = None) -> str:
        base = f"{self.namespace}/instances/"
        return base if role is None else f"{base}{Role(role).value}/"

    def instance_key(self, record: InstanceRecord) -> str:
        return f"{self.instances_prefix(record.role)}{record.instance_id}"

    def model_key(self, name: str) -> str:
        return f"{self.namespace}/models/{name}"

    # ------------------------------------------------------------------ low-level calls (etcd3aio)

    async def _put(self, key: str, value: bytes, lease: int = 0) -> None:
        await self._client.kv.put(key, value, lease=lease, timeout=_RPC_TIMEOUT_S)

    async def _get_prefix(self, prefix: str) -> tuple[int, Any, list[tuple[str, bytes]]]:
        """(revision, response header, [(key, value)]) of every key under ``prefix``."""
        resp = await self._client.kv.get(prefix, range_end=prefix_range_end(prefix), timeout=_RPC_TIMEOUT_S)
        return resp.header.revision, resp.header, [(kv.key.decode(), kv.value) for kv in resp.kvs]

    async def _grant(self, ttl: float) -> int:
        resp = await self._client.lease.grant(max(2, math.ceil(ttl)), timeout=_RPC_TIMEOUT_S)
        return resp.ID

    async def _keepalive_once(self, lease_id: int, timeout: float) -> bool:
        """Refresh ``lease_id`` once; False when etcd says the lease no longer exists."""
        stream = self._client.lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(timeout):
                async for resp in stream:
                    return resp.TTL > 0
        finally:
            stream.cancel()
        raise DiscoveryError("keepalive stream closed without an answer")

    async def _revoke(self, lease_id: int) -> None:
        await self._client.lease.revoke(lease_id, timeout=_RPC_TIMEOUT_S)

    async def _delete(self, key: str) -> None:
        await self._client.kv.delete(key, timeout=_RPC_TIMEOUT_S)

    async def _probe(self) -> tuple[int, int, int]:
        """(cluster id, raft term, revision): a restart bumps the term; a wiped or replaced etcd
        shows another cluster id or a revision that went backwards."""
        resp = await self._client.kv.get(f"{self.namespace}/", count_only=True,
                                         timeout=1.0, max_attempts=1)
        h = resp.header
        return h.cluster_id, h.raft_term, h.revision

    def _watch_stream(self, prefix: str, start_revision: int) -> AsyncIterator[Any]:
        return self._client.watch.watch(prefix, range_end=prefix_range_end(prefix),
                                        start_revision=start_revision)

    # ------------------------------------------------------------------ instances

    @_etcd_errors("register")
    async def register(self, record: InstanceRecord, ttl: float = 10.0) -> Registration:
        """Write ``record`` under a new lease and keep it alive until ``deregister()``."""
        reg = Registration(self, record, ttl)
        await reg._register()
        reg._start()
        self._registrations.add(reg)
        return reg

    @_etcd_errors("list_instances")
    async def list_instances(self, role: Role | None = None,
                             model: str | None = None) -> list[InstanceRecord]:
        """Every registered instance (of ``role`` / serving ``model`` when given)."""
        _, _, items = await self._get_prefix(self.instances_prefix(role))
        records = (_parse_record(k, v) for k, v in items)
        return [r for r in records if r is not None and (model is None or r.model == model)]

    def watch_instances(self, role: Role | None = None, model: str | None = None) -> InstanceWatcher:
        """An async context manager keeping a live view of the matching instances."""
        return InstanceWatcher(self, role, model)

    # ------------------------------------------------------------------ model cards

    @_etcd_errors("put_model_card")
    async def put_model_card(self, card: ModelCard, lease_of: Registration | None = None) -> None:
        """Publish ``card``; with ``lease_of`` it lives (and is re-written) with that registration."""
        key, value = self.model_key(card.name), card.model_dump_json().encode()
        if lease_of is None:
            await self._put(key, value)
        else:
            await lease_of.attach(key, value)

    @_etcd_errors("get_model_card")
    async def get_model_card(self, name: str) -> ModelCard | None:
        resp = await self._client.kv.get(self.model_key(name), timeout=_RPC_TIMEOUT_S)
        return ModelCard.model_validate_json(resp.kvs[0].value) if resp.kvs else None

    @_etcd_errors("list_model_cards")
    async def list_model_cards(self) -> list[ModelCard]:
        _, _, items = await self._get_prefix(f"{self.namespace}/models/")
        return [ModelCard.model_validate_json(v) for _, v in items]

    async def close(self) -> None:
        """Stop watchers, deregister what is still registered, close the connection."""
        for watcher in list(self._watchers):
            await watcher.close()
        for reg in list(self._registrations):
            await reg.deregister()
        await self._client.close()


def _parse_record(key: str, value: bytes) -> InstanceRecord | None:
    """A record from etcd; a malformed one (another writer, an old version) is skipped, not fatal."""
    try:
        return InstanceRecord.model_validate_json(value)
    except (ValueError, ProtocolError) as exc:
        log.warning("ignoring malformed instance record at %s: %s", key, exc)
        return None


class Registration:
    """A record held under a lease by a background keepalive task."""

    def __init__(self, disc: Discovery, record: InstanceRecord, ttl: float) -> None:
        if ttl < 2:
            raise ValueError(f"lease ttl must be at least 2 s (etcd's minimum), got {ttl}")
        self._disc = disc
        self.record = record
        self.ttl = ttl
        self.key = disc.instance_key(record)
        self.lease_id = 0
        self.reregistrations = 0  # how often a lost lease was replaced (visible for tests/metrics)
        self._attached: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None

    async def _register(self) -> None:
        """New lease; write the record and every attached key under it."""
        self.lease_id = await self._disc._grant(self.ttl)
        await self._disc._put(self.key, self.record.model_dump_json().encode(), self.lease_id)
        for key, value in self._attached.items():
            await self._disc._put(key, value, self.lease_id)

    async def attach(self, key: str, value: bytes) -> None:
        """Bind another key to this lease (re-written on re-registration)."""
        self._attached[key] = value
        await self._disc._put(key, value, self.lease_id)

    def _start(self) -> None:
        self._task = asyncio.create_task(self._keepalive_loop(), name=f"lease-{self.key}")

    async def _keepalive_loop(self) -> None:
        period = self.ttl / 3  # three chances to refresh before the lease runs out
        while True:
            ok = await self._refresh(timeout=period)
            await asyncio.sleep(period if ok else min(period, 0.25))

    async def _refresh(self, timeout: float) -> bool:
        """One keepalive; on a lost lease register anew. False while etcd is unreachable."""
        try:
            if not await self._disc._keepalive_once(self.lease_id, timeout):
                log.warning("lease of %s was lost; registering again", self.key)
                await self._register()
                self.reregistrations += 1
            return True
        except (*_ETCD_DOWN, DiscoveryError) as exc:
            log.info("keepalive for %s failed (%s); retrying", self.key, type(exc).__name__)
            return False

    async def deregister(self) -> None:
        """Stop the keepalive, delete the record now and revoke the lease (best effort)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._disc._registrations.discard(self)
        try:
            await self._disc._delete(self.key)
            await self._disc._revoke(self.lease_id)
        except _ETCD_DOWN as exc:  # etcd away: the lease expires by itself within ttl
            log.warning("could not deregister %s (%s); its lease will expire", self.key, exc)


_MAX_QUEUED_EVENTS = 4096


class InstanceWatcher:
    """Live view of the instances under one prefix; see the module docstring for recovery."""

    def __init__(self, disc: Discovery, role: Role | None, model: str | None) -> None:
        self._disc = disc
        self._prefix = disc.instances_prefix(role)
        self._model = model
        self._snapshot: dict[str, InstanceRecord] = {}
        self._events: asyncio.Queue[InstanceEvent] = asyncio.Queue(maxsize=_MAX_QUEUED_EVENTS)
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._epoch: tuple[int, int] = (0, 0)  # (cluster id, raft term) of the last list
        self._revision = 0  # last revision seen (list or watch)
        self.resyncs = 0  # how often the view was rebuilt from a fresh list

    @_etcd_errors("watch_instances")
    async def __aenter__(self) -> InstanceWatcher:
        revision = await self._resync()
        self._task = asyncio.create_task(self._run(revision), name=f"watch-{self._prefix}")
        self._disc._watchers.add(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._disc._watchers.discard(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def snapshot(self) -> dict[str, InstanceRecord]:
        """instance_id -> record, as of the last event applied."""
        return dict(self._snapshot)

    async def events(self) -> AsyncIterator[InstanceEvent]:
        """Changes in the order they were applied (one consumer; the oldest are dropped past
        _MAX_QUEUED_EVENTS unread, so a watcher read only through snapshot() stays bounded)."""
        while True:
            yield await self._events.get()

    async def wait_for(self, predicate: Callable[[dict[str, InstanceRecord]], bool],
                       timeout: float) -> dict[str, InstanceRecord]:
        """Wait until ``predicate(snapshot)`` holds; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.snapshot()))
        return self.snapshot()

    # ------------------------------------------------------------------ applying changes

    async def _apply(self, kind: str, key: str, value: bytes | None) -> None:
        instance_id = key.rsplit("/", 1)[-1]
        record = _parse_record(key, value) if value is not None else None
        if record is not None and self._model is not None and record.model != self._model:
            record = None  # a record that stopped matching counts as gone
        if kind == "put" and record is not None:
            self._snapshot[instance_id] = record
            self._emit(InstanceEvent("put", instance_id, record))
        elif instance_id in self._snapshot:
            old = self._snapshot.pop(instance_id)
            self._emit(InstanceEvent("delete", instance_id, old))
        async with self._changed:
            self._changed.notify_all()

    def _emit(self, event: InstanceEvent) -> None:
        # A watcher nobody iterates (the frontend only reads snapshots) must not grow without bound.
        if self._events.full():
            self._events.get_nowait()
        self._events.put_nowait(event)

    async def _resync(self) -> int:
        """Re-list; turn the difference from the current view into events. Returns the revision."""
        revision, header, items = await self._disc._get_prefix(self._prefix)
        self._epoch = (header.cluster_id, header.raft_term)
        self._revision = revision
        fresh = {key.rsplit("/", 1)[-1]: (key, value) for key, value in items}
        for instance_id in list(self._snapshot):
            if instance_id not in fresh:
                await self._apply("delete", f"{self._prefix}{instance_id}", None)
        for key, value in fresh.values():
            current = self._snapshot.get(key.rsplit("/", 1)[-1])
            if current is None or current.model_dump_json().encode() != value:
                await self._apply("put", key, value)
        self.resyncs += 1
        return revision

    # ------------------------------------------------------------------ background

    async def _run(self, revision: int) -> None:
        while True:
            watch = asyncio.create_task(self._consume(revision + 1))
            probe = asyncio.create_task(self._until_disrupted())
            await asyncio.wait({watch, probe}, return_when=asyncio.FIRST_COMPLETED)
            for task in (watch, probe):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, *_ETCD_DOWN):
                    await task
            revision = await self._resync_until_ok()

    async def _resync_until_ok(self) -> int:
        while True:
            try:
                return await self._resync()
            except _ETCD_DOWN:
                await asyncio.sleep(_PROBE_INTERVAL_S)

    async def _consume(self, start_revision: int) -> None:
        async for resp in self._disc._watch_stream(self._prefix, start_revision):
            if resp.compact_revision > 0 or resp.canceled:
                return  # history gone: rebuild from a fresh list
            self._revision = max(self._revision, resp.header.revision)
            for ev in resp.events:
                # etcd event type 0 = PUT, 1 = DELETE
                kind = "delete" if ev.type == 1 else "put"
                await self._apply(kind, ev.kv.key.decode(), ev.kv.value if kind == "put" else None)

    async def _until_disrupted(self) -> None:
        """Return once etcd was unreachable and is back, or restarted (term/cluster changed)."""
        lost = False
        while True:
            await asyncio.sleep(_PROBE_INTERVAL_S)
            try:
                cluster_id, term, revision = await self._disc._probe()
            except _ETCD_DOWN:
                lost = True
                continue
            if lost or (cluster_id, term) != self._epoch or revision < self._revision:
                return
