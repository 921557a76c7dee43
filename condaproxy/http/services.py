"""The application's parts, wired once in create_app and reached by handlers through an AppKey."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.download import Fetcher
from condaproxy.cache.inflight import InflightTable
from condaproxy.cache.persist import PersistQueue
from condaproxy.cache.policies import Clock, PolicyBook
from condaproxy.cache.private import LearnedPrivate
from condaproxy.cache.troubles import Troubles
from condaproxy.config.model import Config
from condaproxy.http.budget import ColdFetches
from condaproxy.http.hot import HotBlobs
from condaproxy.metrics import Metrics
from condaproxy.store.blobstore import BlobStore
from condaproxy.upstream.admission import ClientAuth
from condaproxy.upstream.client import Upstream


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
    cold: ColdFetches
    policies: PolicyBook
    clock: Clock = field(default=time.time)
    hot: HotBlobs = field(default_factory=HotBlobs)  # small blobs served from memory
    private: LearnedPrivate | None = None  # channels learned to be private (None: never learned)
    troubles: Troubles = field(default_factory=Troubles)  # for the notices (CEP-6)


SERVICES = web.AppKey("services", Services)
