"""Served models: the model cards workers publish in etcd, each with its tokenizer loaded.

Cards are re-listed every ``refresh_s`` seconds, and a request naming a model the frontend has not
seen yet reads that one card at once, so a model appears as soon as its first worker registers it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.protocol import ModelCard
from frontend.errors import APIError
from frontend.preprocess import ChatTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    card: ModelCard
    tokenizer: ChatTokenizer
    created: int  # unix time the frontend first saw it (for /v1/models)


class ModelRegistry:
    """name -> ServedModel, kept in step with the cards listed by ``list_cards``."""

    def __init__(self, list_cards: Callable[[], Awaitable[list[ModelCard]]],
                 get_card: Callable[[str], Awaitable[ModelCard | None]], refresh_s: float = 2.0,
                 has_instances: Callable[[str], bool] = lambda name: False) -> None:
        self._list_cards = list_cards
        self._get_card = get_card
        self._has_instances = has_instances
        self.refresh_s = refresh_s
        self._models: dict[str, ServedModel] = {}
        self._failed: dict[str, tuple[ModelCard, str]] = {}  # name -> (card, why its tokenizer did not load)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def names(self) -> list[str]:
        return sorted(self._models)

    def models(self) -> list[ServedModel]:
        return [self._models[n] for n in self.names()]

    async def get(self, name: str) -> ServedModel:
        """The model, re-listing cards once if unknown; 404 that lists the served models otherwise."""
        if name not in self._models:
            await self._fetch(name)
        served = self._models.get(name)
        if served is not None:
            return served
        if name in self._failed:
            raise APIError(503, f"model {name!r} is registered but cannot be served: {self._failed[name][1]}")
        listed = ", ".join(repr(n) for n in self.names()) or "none yet (no worker has registered a model)"
        raise APIError(404, f"model {name!r} is not served here; served models: {listed}", param="model",
                       code="model_not_found")

    async def _fetch(self, name: str) -> None:
        """One key read for a name we do not know (cheaper than re-listing every card)."""
        try:
            card = await self._get_card(name)
        except Exception as exc:  # noqa: BLE001 (etcd down: answer from what we know)
            log.warning("could not read the model card of %s: %s", name, exc)
            return
        if card is not None:
            async with self._lock:
                if name not in self._models:
                    await self._load(card)

    async def refresh(self) -> None:
        async with self._lock:
            try:
                cards = await self._list_cards()
            except Exception as exc:  # noqa: BLE001 (etcd down: keep serving what we know)
                log.warning("could not list model cards: %s", exc)
                return
            await self._apply(cards)

    async def _apply(self, cards: list[ModelCard]) -> None:
        current = {c.name: c for c in cards}
        for name in list(self._models):
            # Workers re-write a card whose writer's lease expired; until then live instances keep it.
            if name not in current and not self._has_instances(name):
                log.info("model %s is no longer registered", name)
                del self._models[name]
        for name in list(self._failed):
            if name not in current:
                del self._failed[name]
        for name, card in current.items():
            known = self._models.get(name)
            failed = self._failed.get(name)
            if (known is None or known.card != card) and (failed is None or failed[0] != card):
                await self._load(card)

    async def _load(self, card: ModelCard) -> None:
        try:
            tok = await asyncio.to_thread(ChatTokenizer, card.path)
        except Exception as exc:  # noqa: BLE001 (a bad model dir must not stop the other models)
            self._failed[card.name] = (card, f"{type(exc).__name__}: {exc}")
            log.error("cannot load tokenizer of %s from %s: %s", card.name, card.path, exc)
            return
        self._failed.pop(card.name, None)
        self._models[card.name] = ServedModel(card, tok, int(time.time()))
        log.info("serving model %s (%s)", card.name, card.path)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
