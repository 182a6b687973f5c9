"""Prometheus metrics, through prometheus-client.

`channelgate serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before its workers
start: each worker then writes its samples there, and whichever worker answers a scrape
reads them all, so `--workers N` exposes one consistent set of counters (no resets, no
worker counting alone). Without that variable (tests, an app embedded elsewhere) each app
counts in a registry of its own.
"""

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool
from starlette.requests import HTTPConnection

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        registry = None if self.multiprocess else CollectorRegistry()
        self.registry = registry
        self.requests = Counter(
            "channelgate_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "channelgate_request_seconds",
            "Time to answer a request, by method and route template (streamed answers, such"
            " as the live feed and CSV exports, are counted but not timed)",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.pool = Gauge(
            "channelgate_db_pool_connections",
            "Database connections in this process's pool, by state",
            ["state"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.ingested = Counter(
            "channelgate_ingested_events",
            "Verification events stored (duplicates not counted)",
            registry=registry,
        )
        self.feed_dropped = Counter(
            "channelgate_feed_dropped",
            "Live-feed events lost by subscribers that could not keep up",
            registry=registry,
        )
        self.feed_subscribers = Gauge(
            "channelgate_feed_subscribers",
            "Open live-feed streams",
            multiprocess_mode="livesum",
            registry=registry,
        )
        for state in ("checked_out", "idle"):
            self.pool.labels(state).set(0)

    def watch_pool(self, engine: AsyncEngine) -> None:
        """Keep the pool gauges current as connections are checked out and in."""
        pool = engine.sync_engine.pool
        assert isinstance(pool, QueuePool)  # the pool both dialects use here

        def sample(*_: object) -> None:
            self.pool.labels("checked_out").set(pool.checkedout())
            self.pool.labels("idle").set(pool.checkedin())

        for name in ("checkout", "checkin", "connect", "close"):
            event.listen(engine.sync_engine, name, sample)

    def exposition(self) -> bytes:
        """The Prometheus text format: every worker's samples in multiprocess mode."""
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def process_exited(self) -> None:
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


def metrics_of(connection: HTTPConnection) -> Metrics:
    return connection.app.state.services.metrics
