"""Gated parts for the in-process proxy: a blob store whose puts and a catalog whose reads wait
on a test's gate, to force one interleaving of the proxy's own steps (no sleeps, no patching).

    proxy = await proxy_factory(parts=GATED)
    gate = proxy.services.store.hold_put()   # the next put waits at the gate
    ...; await gate.reached.wait(); ...; gate.release()
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite

from condaproxy.app import Parts
from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import UnitKey
from condaproxy.store.filesystem import FilesystemStore


class Gate:
    """One step of the proxy waits here: ``reached`` once it arrives, until ``release()``."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.released = asyncio.Event()

    def release(self) -> None:
        """Let the held step go on."""
        self.released.set()

    async def pass_through(self) -> None:
        self.reached.set()
        await self.released.wait()


class GatedStore(FilesystemStore):
    """A filesystem store whose next puts wait at gates the test holds."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._puts: list[Gate] = []

    def hold_put(self) -> Gate:
        """The next put waits at the returned gate (before anything is written)."""
        gate = Gate()
        self._puts.append(gate)
        return gate

    async def put(self, key: str, src: Path) -> None:
        if self._puts:
            await self._puts.pop(0).pass_through()
        await super().put(key, src)


class GatedCatalog(Catalog):
    """The catalog, whose next look-up of a given unit waits at a gate the test holds."""

    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path) -> None:
        super().__init__(db, reader, path)
        self._gets: dict[UnitKey, Gate] = {}

    def hold_get(self, key: UnitKey) -> Gate:
        """The next get(key) waits at the returned gate."""
        gate = self._gets[key] = Gate()
        return gate

    async def get(self, key: UnitKey) -> Unit | None:
        if (gate := self._gets.pop(key, None)) is not None:
            await gate.pass_through()
        return await super().get(key)


GATED = Parts(catalog=GatedCatalog, store=GatedStore)
