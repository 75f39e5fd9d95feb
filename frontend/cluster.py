"""The frontend's connections: etcd (model cards, a live instance watcher) and NATS."""

from __future__ import annotations

import logging

from common.config import ClusterConfig
from common.discovery import Discovery, InstanceWatcher
from common.messaging import Messenger
from common.protocol import InstanceRecord, ModelCard

log = logging.getLogger(__name__)


class Cluster:
    """Discovery + one watcher over every instance of the namespace + a Messenger."""

    def __init__(self, discovery: Discovery, watcher: InstanceWatcher, messenger: Messenger) -> None:
        self.discovery = discovery
        self.watcher = watcher
        self.messenger = messenger

    @classmethod
    async def connect(cls, config: ClusterConfig) -> "Cluster":
        """Connect to etcd and NATS; raises with the endpoint named when one is unreachable."""
        try:
            disc = await Discovery.connect(config.etcd_endpoints, config.namespace)
        except Exception as exc:
            raise RuntimeError(f"cannot reach etcd at {config.etcd_endpoints}: {exc}") from exc
        try:
            watcher = await disc.watch_instances().__aenter__()
            messenger = await Messenger.connect(config.nats_server, name="triad-frontend")
        except Exception as exc:
            await disc.close()
            raise RuntimeError(f"cannot start the frontend's cluster view (NATS {config.nats_server}): {exc}") from exc
        return cls(disc, watcher, messenger)

    def snapshot(self) -> list[InstanceRecord]:
        return list(self.watcher.snapshot().values())

    async def list_cards(self) -> list[ModelCard]:
        return await self.discovery.list_model_cards()

    async def get_card(self, name: str) -> ModelCard | None:
        return await self.discovery.get_model_card(name)

    async def close(self) -> None:
        await self.messenger.close()
        await self.watcher.close()
        await self.discovery.close()
