"""The application's parts, wired once in create_app and reached by handlers through an AppKey."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from condaproxy.auth import ClientAuth
from condaproxy.catalog import Catalog
from condaproxy.config import Config
from condaproxy.fetch import Fetcher
from condaproxy.inflight import InflightTable
from condaproxy.metrics import Metrics
from condaproxy.persist import PersistQueue
from condaproxy.store import BlobStore
from condaproxy.upstream import Upstream


@dataclass(eq=False)
class Services:
    """Everything a handler needs; built and torn down by the app's cleanup context."""

    config: Config
    catalog: Catalog
    store: BlobStore
    upstream: Upstream
    inflight: InflightTable
    persist: PersistQueue
    fetcher: Fetcher
    metrics: Metrics
    auth: ClientAuth


SERVICES = web.AppKey("services", Services)
