"""`create_app()`: lifespan, middleware, problem+json errors, routers. `app = create_app()`."""

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
from alembic import command
from alembic.config import Config
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from auth import BOT_KEY_SCHEME, AuthState
from db import POLICY_CHANNEL, Database, Listener
from feed import FEED_CHANNEL, Feed
from models import VerificationBatch
from routes import Counter, PolicyCache, PolicyEndpoint, bot, dashboard, service
from settings import Settings, get_settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("channelgate")
access_log = logging.getLogger("channelgate.access")

BODY_LIMIT = 1024 * 1024
BULK_BODY_LIMIT = 8 * 1024 * 1024
BULK_PATHS = frozenset({"/api/v1/bot/verifications"})
REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:-]{1,64}$")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
API_HEADERS = (
    *SECURITY_HEADERS,
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)
DOCS_HEADERS = tuple(SECURITY_HEADERS)  # the docs page loads its scripts from a CDN
# Bots are not browsers: framing, referrer and CSP headers protect nothing there, and every
# header costs uvicorn time on the hot path.
BOT_HEADERS = ((b"x-content-type-options", b"nosniff"),)


class RequestIds:
    """Unique request ids without a urandom call per request: a random per-process prefix
    and a counter (a forked worker draws its own prefix)."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = RequestIds()
DB_UNAVAILABLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)


def problem_body(
    status: int, detail: str, request_id: str | None, slug: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "type": f"https://channelgate.dev/problems/{slug}" if slug else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "request_id": request_id,
        **extra,
    }


def problem(
    request: Request,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
    slug: str | None = None,
    **extra: Any,
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse(
        problem_body(status, detail, request_id, slug, **extra),
        status_code=status,
        headers=headers,
        media_type="application/problem+json",
    )


SLUGS = {409: "conflict", 412: "stale-version", 413: "too-large", 415: "not-json"}


async def http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    detail = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
    if error.status_code == 404 and detail == "Not Found":
        detail = f"no route for {request.url.path}"
    return problem(
        request,
        error.status_code,
        detail,
        headers=dict(error.headers or {}),
        slug=SLUGS.get(error.status_code),
    )


async def validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in error.errors()
    ]
    if any(e["type"] == "json_invalid" for e in errors):
        return problem(request, 400, "the body is not valid JSON", slug="malformed")
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return problem(request, 422, f"{where}: {first['msg']}{more}", slug="validation", errors=errors)


async def database_unavailable(request: Request, error: Exception) -> JSONResponse:
    log.error("database unavailable: %r", error)
    return problem(
        request, 503, "the database is unavailable; retry shortly", headers={"Retry-After": "5"}
    )


class Metrics:
    """Request counts and latency histograms by route template, in Prometheus text format."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], list[float]] = {}  # bucket counts, then sum

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        series = self.latency.setdefault((method, route), [0.0] * (len(self.BUCKETS) + 2))
        for i, edge in enumerate(self.BUCKETS):
            if seconds <= edge:
                series[i] += 1
        series[-2] += 1  # +Inf
        series[-1] += seconds

    def render(self, app: FastAPI) -> str:
        lines = [
            "# TYPE channelgate_requests_total counter",
            *(
                f'channelgate_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}'
                for (m, r, s), n in sorted(self.requests.items())
            ),
            "# TYPE channelgate_request_seconds histogram",
        ]
        for (m, r), series in sorted(self.latency.items()):
            labels = f'method="{m}",route="{r}"'
            for edge, count in zip((*self.BUCKETS, "+Inf"), series[:-1], strict=True):
                lines.append(
                    f'channelgate_request_seconds_bucket{{{labels},le="{edge}"}} {count:g}'
                )
            lines.append(f"channelgate_request_seconds_count{{{labels}}} {series[-2]:g}")
            lines.append(f"channelgate_request_seconds_sum{{{labels}}} {series[-1]:.6f}")
        pool = app.state.db.engine.pool
        lines += [
            "# TYPE channelgate_db_pool_connections gauge",
            f'channelgate_db_pool_connections{{state="checked_out"}} {pool.checkedout()}',
            f'channelgate_db_pool_connections{{state="idle"}} {pool.checkedin()}',
            "# TYPE channelgate_ingested_events_total counter",
            f"channelgate_ingested_events_total {app.state.ingested.total}",
            "# TYPE channelgate_feed_dropped_total counter",
            f"channelgate_feed_dropped_total {app.state.feed.dropped}",
            "# TYPE channelgate_feed_subscribers gauge",
            f"channelgate_feed_subscribers {len(app.state.feed.subscribers)}",
        ]
        return "\n".join(lines) + "\n"


class BodyTooLarge(HTTPException):
    """Raised from `receive` (FastAPI passes HTTPExceptions raised while reading through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body exceeds {limit} bytes")


class Gate:
    """One pure-ASGI layer for every request: request id, body limits, JSON-only bodies,
    security headers, access log, and a problem+json 500 that never leaks a stack trace."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        sent_id = b""
        length = content_type = None
        chunked = False
        for name, value in scope["headers"]:  # one pass, no dict: this runs on every request
            if name == b"x-request-id":
                sent_id = value
            elif name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"transfer-encoding":
                chunked = True
        request_id = (
            sent_id.decode("latin-1") if REQUEST_ID_RE.fullmatch(sent_id) else new_request_id()
        )
        scope.setdefault("state", {})["request_id"] = request_id
        path: str = scope["path"]
        status_holder = [0]
        if path.startswith("/api/v1/bot/"):
            security_headers = BOT_HEADERS
        elif path.startswith(("/docs", "/redoc")):
            security_headers = DOCS_HEADERS
        else:
            security_headers = API_HEADERS
        extra_headers = [(b"x-request-id", request_id.encode()), *security_headers]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra_headers]
            await send(message)

        async def reject(status: int, detail: str, slug: str | None = None) -> None:
            body = json.dumps(problem_body(status, detail, request_id, slug)).encode()
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/problem+json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})

        limit = BULK_BODY_LIMIT if path in BULK_PATHS else BODY_LIMIT
        try:
            if (length is None or length == b"0") and not chunked:
                await self.app(scope, receive, send_with_headers)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                media = (content_type or b"").split(b";")[0].strip().lower()
                if media != b"application/json" and not media.endswith(b"+json"):
                    await reject(415, "request bodies must be application/json", "not-json")
                    return
            if length is not None and (not length.isdigit() or int(length) > limit):
                await reject(413, f"the body exceeds {limit} bytes", "too-large")
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                return message

            await self.app(scope, limited_receive, send_with_headers)
        except BodyTooLarge:
            if not status_holder[0]:
                await reject(413, f"the body exceeds {limit} bytes", "too-large")
        except Exception:
            log.exception(
                "unhandled error in %s %s (request %s)", scope["method"], path, request_id
            )
            if not status_holder[0]:
                await reject(500, "internal error; quote the request id when reporting it")
        finally:
            route = scope.get("route")
            if self.metrics is not None:
                self.metrics.observe(
                    scope["method"],
                    getattr(route, "path", "unmatched"),
                    status_holder[0] or 500,
                    time.perf_counter() - started,
                )
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": path,  # never the query string: it may carry access_token
                        "route": getattr(route, "path", None),
                        "status": status_holder[0] or 500,
                        "ms": round((time.perf_counter() - started) * 1000, 2),
                        "request_id": request_id,
                    },
                )


class JSONLogFormatter(logging.Formatter):
    FIELDS = ("method", "path", "route", "status", "ms", "request_id")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    root = logging.getLogger("channelgate")
    if not any(isinstance(h.formatter, JSONLogFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JSONLogFormatter())
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level.upper())


def alembic_config(database_url: str | None = None) -> Config:
    config = Config(str(Path(__file__).with_name("alembic.ini")))
    config.attributes["configure_logging"] = False
    if database_url:
        config.attributes["database_url"] = database_url
    return config


async def migrate(db: Database) -> None:
    """alembic upgrade head on the app's own engine."""

    def upgrade(connection: Any) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with db.engine.begin() as connection:
        await connection.run_sync(upgrade)


def parse_ids(payload: str) -> list[int]:
    return [int(part) for part in payload.split(",") if part.lstrip("-").isdigit()]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level)
        db = Database(settings)
        if settings.should_auto_migrate:
            await migrate(db)
        policies = PolicyCache()
        feed = Feed(db)
        db.sessionmaker.configure(info={"feed": feed})
        listener_task = None
        if db.is_postgres:
            listener = Listener(
                settings.database_url,
                {
                    POLICY_CHANNEL: lambda payload: policies.invalidate(*parse_ids(payload)),
                    FEED_CHANNEL: feed.announced,
                },
                on_reconnect=policies.clear,
            )
            listener_task = asyncio.create_task(listener.run(), name="channelgate-listener")
        async with httpx.AsyncClient(timeout=5.0) as http:
            app.state.db = db
            app.state.auth = AuthState(settings, http)
            app.state.policies = policies
            app.state.feed = feed
            app.state.ingested = Counter()
            try:
                yield
            finally:
                if listener_task is not None:
                    listener_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await listener_task
                await db.dispose()

    app = FastAPI(
        title="channelgate",
        version="0.1.0",
        summary="Join-the-channel-before-you-talk: groups, policies, verifications.",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        # FastAPI's built-in OpenTelemetry hooks cost every request, and nothing here reads
        # them: channelgate has its own access log and /metrics.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    for error_type in DB_UNAVAILABLE:
        app.add_exception_handler(error_type, database_unavailable)
    app.include_router(bot)  # first: routes are matched in order, and the bot's are hot
    # The policy read is the one route called for every message: serve it as a plain
    # Starlette route ahead of its documented FastAPI twin (measured: bench/README.md).
    app.router.routes.insert(
        0, Route("/api/v1/bot/groups/{chat_id}/policy", PolicyEndpoint(), methods=["GET"])
    )
    app.include_router(service)
    app.include_router(dashboard)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "If-Match",
                "If-None-Match",
                "X-Request-ID",
            ],
            expose_headers=["ETag", "X-Request-ID", "Retry-After"],
            max_age=600,
        )
    metrics = Metrics() if settings.metrics_enabled else None
    app.add_middleware(Gate, metrics=metrics)
    if metrics is not None:

        @app.get("/metrics", include_in_schema=True, tags=["service"])
        async def read_metrics() -> PlainTextResponse:
            """Prometheus metrics (METRICS_ENABLED=true)."""
            return PlainTextResponse(metrics.render(app), media_type="text/plain; version=0.0.4")

    app.openapi = lambda: openapi_with_bot_security(app)  # pyrefly: ignore[bad-assignment]
    return app


def openapi_with_bot_security(app: FastAPI) -> dict[str, Any]:
    """The bot routes check their key without a security dependency (see auth.bot_caller), so
    the BotKey scheme is declared on them here."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
        )
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["BotKey"] = BOT_KEY_SCHEME
        # POST /bot/verifications parses its body itself (routes.ingest_verifications).
        batch = VerificationBatch.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = components.setdefault("schemas", {})
        schemas.update(batch.pop("$defs", {}))
        schemas["VerificationBatch"] = batch
        for path, operations in schema["paths"].items():
            if path.startswith("/api/v1/bot/"):
                for operation in operations.values():
                    operation["security"] = [{"BotKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema


app = create_app()
