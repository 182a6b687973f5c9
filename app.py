"""`create_app()`: the process's services, lifespan, middleware, problem+json errors, routers.

Nothing here runs on import: `channelgate serve` hands uvicorn the factory (`app:create_app`).
"""

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from types import FrameType
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import analytics
import contract
import partitions
import policy
from auth import AuthState, client_address
from db import Database, Listener, failure, migrate, schema_head
from feed import Feed
from metrics import Metrics
from ratelimit import Limiter, TooManyRequests
from routes import bot, dashboard, live, service
from settings import Settings, get_settings

log = logging.getLogger("channelgate")
access_log = logging.getLogger("channelgate.access")

BODY_LIMIT = 1024 * 1024
BULK_BODY_LIMIT = 8 * 1024 * 1024
BULK_PATHS = frozenset({"/api/v1/bot/verifications"})
# An answer given before the body was read (a 413, 401, 404...) first reads and drops the
# rest of it, up to this much in all and for at most this long (Replay.drain).
DRAIN_LIMIT = 2 * BULK_BODY_LIMIT
DRAIN_SECONDS = 5.0
FOLD_STOP_SECONDS = 5.0  # how long a stopping app waits for the folder's pass in flight
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


@dataclass
class Services:
    """Everything the process holds while it serves: built with the app, started and
    stopped by its lifespan. Each module reads its own part through one typed accessor
    (db.database, auth.auth_state, policy.policies, feed.feed_of, metrics.metrics_of)."""

    settings: Settings
    http: httpx.AsyncClient
    db: Database
    auth: AuthState
    policies: policy.Policies
    feed: Feed
    metrics: Metrics
    limiter: Limiter
    listener: asyncio.Task[None] | None = field(default=None)
    folder: asyncio.Task[None] | None = field(default=None)
    keeper: asyncio.Task[None] | None = field(default=None)
    announcer: asyncio.Task[None] | None = field(default=None)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def build(cls, settings: Settings) -> "Services":
        http = httpx.AsyncClient(timeout=5.0)
        db = Database(settings)
        metrics = Metrics()
        metrics.watch_pool(db.engine)
        limiter = Limiter(settings.rate_limits, settings.rate_limit_storage_url)
        return cls(
            settings=settings,
            http=http,
            db=db,
            auth=AuthState(settings, http, db, limiter),
            limiter=limiter,
            policies=policy.Policies(db),
            feed=Feed(db, metrics),
            metrics=metrics,
        )

    async def start(self) -> None:
        configure_logging(self.settings.log_level)
        log.info("token checks: %s", self.auth.describe())
        schema_head()  # read migrations/ once, not on the first /readyz
        await self.limiter.start()
        if self.settings.should_auto_migrate:
            await migrate(self.db)
        if self.db.is_postgres:
            self.db.listener = Listener(
                self.settings, self.db, on_linked=self.linked, on_unlinked=self.unlinked
            )
            self.listener = asyncio.create_task(self.db.listener.run(), name="channelgate-listener")
            self.announcer = asyncio.create_task(
                self.db.announcer(self.stopping), name="channelgate-announcer"
            )
        self.folder = asyncio.create_task(
            analytics.folder(self.db, self.settings.fold_interval_seconds, self.stopping),
            name="channelgate-folder",
        )
        if self.db.is_postgres:
            self.keeper = asyncio.create_task(
                partitions.keeper(self.db, self.settings.retention_days, self.stopping),
                name="channelgate-partitions",
            )
        drain_on_signal(self.feed)

    def linked(self) -> None:
        """Back in touch with the other replicas: whatever they changed meanwhile is lost,
        so every cache starts afresh."""
        self.policies.link(True)
        self.auth.bot_keys.clear()

    def unlinked(self) -> None:
        self.policies.link(False)

    async def stop(self) -> None:
        self.feed.drain()
        DRAINING.discard(self.feed)
        self.stopping.set()
        self.db.later_queued.set()  # the announcer sends what is queued and ends
        for task in (self.folder, self.keeper, self.announcer):  # after the pass in flight
            if task is not None and not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(task, FOLD_STOP_SECONDS)
        if self.listener is not None:
            self.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.listener
        await self.limiter.stop()
        await self.http.aclose()
        await self.db.dispose()
        self.metrics.process_exited()


DRAINING: set[Feed] = set()  # the feeds of this process's running apps


def drain_on_signal(feed: Feed) -> None:
    """On SIGTERM or SIGINT, end the live-feed streams, then chain on to the server's own
    handler (uvicorn's: stop accepting, wait for in-flight requests within its graceful
    timeout, then the lifespan closes the pool). Without this an open stream would hold
    the shutdown until that timeout and then be cut off mid-stream."""
    DRAINING.add(feed)
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach the main thread only
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if getattr(previous, "drains", False):
            continue

        def handler(number: int, frame: FrameType | None, previous: Any = previous) -> None:
            for each in list(DRAINING):
                each.drain()
            if callable(previous):
                previous(number, frame)
            else:  # the default action, or none if ignored
                signal.signal(number, previous)
                signal.raise_signal(number)

        handler.drains = True  # pyrefly: ignore[missing-attribute]
        signal.signal(sig, handler)


class RequestIds:
    """Unique request ids without a urandom call per request: a random per-process prefix
    and a counter (a forked worker draws its own prefix). Hand-written: a uuid4 per request
    was measurable on the policy route."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = RequestIds()
CONFLICT_RETRIES = 3  # replays of a request whose transaction hit a deadlock or serialization


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
    return JSONResponse(
        problem_body(status, detail, request.scope["state"].get("request_id"), slug, **extra),
        status_code=status,
        headers=headers,
        media_type="application/problem+json",
    )


SLUGS = {
    409: "conflict",
    412: "stale-version",
    413: "too-large",
    415: "not-json",
    429: "rate-limited",
}


async def http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    status, headers = error.status_code, dict(error.headers or {})
    detail = error.detail if isinstance(error.detail, str) else HTTPStatus(status).phrase
    slug = SLUGS.get(status)
    if status == 404 and detail == "Not Found":
        detail = f"no route for {request.url.path}"
    elif status == 405:
        # Starlette names only the methods of the first route that matched the path.
        headers["Allow"] = ", ".join(sorted(allowed_methods(request)))
        detail = f"{request.method} is not allowed here; Allow lists what is"
    elif status == 400 and detail == "There was an error parsing the body":
        detail, slug = "the body is not valid JSON", "malformed"  # e.g. not UTF-8
    return problem(request, status, detail, headers=headers, slug=slug)


def allowed_methods(request: Request) -> set[str]:
    """Every method some route serves at the request's path."""
    allowed: set[str] = set()
    for context in iter_route_contexts(request.app.router.routes):
        match, _ = context.route.matches(request.scope)
        if match is not Match.NONE:
            allowed |= context.methods or set()
    return allowed


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


class BodyTooLarge(HTTPException):
    """Raised from `receive` (FastAPI passes HTTPExceptions raised while reading through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body exceeds {limit} bytes")


DB_DOWN = "the database is unavailable; retry shortly"
RETRY_AFTER = "2"  # seconds


GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, ClientDisconnect)


def client_gone(error: BaseException) -> bool:
    """Whether a streamed answer failed only because its client went away (a live-feed
    keep-alive sent into a closed stream, say): nothing to report as a bug."""
    if isinstance(error, BaseExceptionGroup):
        return all(client_gone(inner) for inner in error.exceptions)
    return isinstance(error, GONE)


class Replay:
    """The request's `receive`, keeping what the app read so that a replay reads it again,
    and counting body bytes against `limit` (413 past it)."""

    __slots__ = ("limit", "more", "read", "received", "replayed", "source")

    def __init__(self, source: Receive, more: bool) -> None:
        self.source = source
        self.limit: int | None = None
        self.read: list[Message] = []
        self.replayed = 0
        self.received = 0
        self.more = more  # whether the client has body left to send

    async def receive(self) -> Message:
        if self.replayed < len(self.read):
            self.replayed += 1
            return self.read[self.replayed - 1]
        message = await self.source()
        if message["type"] == "http.request":
            self.read.append(message)
            self.replayed += 1
            self.received += len(message.get("body", b""))
            self.more = message.get("more_body", False)
            if self.limit is not None and self.received > self.limit:
                raise BodyTooLarge(self.limit)
        else:
            self.more = False
        return message

    async def drain(self) -> None:
        """Read and drop the body left unread, as nginx's lingering close does: a client sends
        its whole body before it reads the answer, and a socket closed with unread data in it
        is reset, so the client would see a reset, not the answer (Granian closes at once;
        uvicorn reads on by itself). Bounded in bytes and time; past either, the reset."""
        self.more = False
        with anyio.move_on_after(DRAIN_SECONDS):
            while self.received < DRAIN_LIMIT:
                message = await self.source()
                self.received += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return

    def rewind(self) -> None:
        self.replayed = 0


class Gate:
    """One pure-ASGI layer for every request: request id, body limits, JSON-only bodies,
    the per-address limit outside /api/, security headers, access log, metrics; and the one
    place database failures are answered (db.failure): conflicts replayed, a lost database
    a 503, anything else a problem+json 500 that never leaks a stack trace."""

    def __init__(
        self, app: ASGIApp, limiter: Limiter | None = None, metrics: Metrics | None = None
    ) -> None:
        self.app = app
        self.limiter = limiter
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
        status = 0
        streamed = False  # an answer without Content-Length is a stream, not one piece
        if path.startswith("/api/v1/bot/"):
            security_headers = BOT_HEADERS
        elif path.startswith(("/docs", "/redoc")):
            security_headers = DOCS_HEADERS
        else:
            security_headers = API_HEADERS
        extra_headers = [(b"x-request-id", request_id.encode()), *security_headers]
        replay = Replay(receive, more=(length is not None and length != b"0") or chunked)

        async def send_with_headers(message: Message) -> None:
            nonlocal status, streamed
            if message["type"] == "http.response.start":
                if replay.more:
                    await replay.drain()
                headers = message.get("headers", ())
                status = message["status"]
                if self.metrics is not None:
                    streamed = b"content-length" not in {name.lower() for name, _ in headers}
                message["headers"] = [*headers, *extra_headers]
            await send(message)

        async def reject(
            status: int,
            detail: str,
            slug: str | None = None,
            extra: Mapping[str, str] | None = None,
        ) -> None:
            body = json.dumps(problem_body(status, detail, request_id, slug)).encode()
            headers = [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in (extra or {}).items()),
            ]
            await send_with_headers(
                {"type": "http.response.start", "status": status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": body})

        limit = BULK_BODY_LIMIT if path in BULK_PATHS else BODY_LIMIT
        try:
            if self.limiter is not None and not path.startswith("/api/"):
                # Everything outside /api/ answers without credentials: limited per address.
                try:
                    self.limiter.hit("anonymous", client_address(scope))
                except TooManyRequests as refusal:
                    await reject(429, str(refusal.detail), "rate-limited", refusal.headers)
                    return
            if replay.more:
                if scope["method"] in ("POST", "PUT", "PATCH"):
                    media = (content_type or b"").split(b";")[0].strip().lower()
                    if media != b"application/json" and not media.endswith(b"+json"):
                        await reject(415, "request bodies must be application/json", "not-json")
                        return
                if length is not None and (not length.isdigit() or int(length) > limit):
                    replay.more = length.isdigit() and int(length) <= DRAIN_LIMIT
                    await reject(413, f"the body exceeds {limit} bytes", "too-large")
                    return
                replay.limit = limit
            for attempt in range(1, CONFLICT_RETRIES + 2):
                try:
                    await self.app(scope, replay.receive, send_with_headers)
                    return
                except Exception as error:
                    # A deadlock or serialization failure rolled the whole transaction
                    # back: the request can run again, as long as nothing was sent.
                    if status or attempt > CONFLICT_RETRIES or failure(error) != "conflict":
                        raise
                    log.info("replaying request %s after a conflict: %r", request_id, error)
                    replay.rewind()
                    await asyncio.sleep(random.uniform(0.005, 0.05) * attempt)  # noqa: S311
        except BodyTooLarge:
            if not status:
                await reject(413, f"the body exceeds {limit} bytes", "too-large")
        except Exception as error:
            if (kind := failure(error)) is not None:
                log.warning("database %s in %s %s (request %s): %r",
                            kind, scope["method"], path, request_id, error)  # fmt: skip
                if not status:
                    await reject(503, DB_DOWN, "database-unavailable", {"Retry-After": RETRY_AFTER})
            elif status and client_gone(error):
                log.info("client went away during %s %s (request %s)",
                         scope["method"], path, request_id)  # fmt: skip
            else:
                log.exception(
                    "unhandled error in %s %s (request %s)", scope["method"], path, request_id
                )
                if not status:
                    await reject(500, "internal error; quote the request id when reporting it")
        finally:
            if self.metrics is not None or access_log.isEnabledFor(logging.INFO):
                self.finished(scope, request_id, status or 500, streamed, started)

    def finished(
        self, scope: Scope, request_id: str, status: int, streamed: bool, started: float
    ) -> None:
        """Count and log the request (skipped when neither metrics nor the access log is on:
        this runs on the hot path)."""
        route = getattr(scope.get("route"), "path", None)
        if self.metrics is not None:
            label = route or "unmatched"
            self.metrics.requests.labels(scope["method"], label, status).inc()
            if not streamed:
                seconds = time.perf_counter() - started
                self.metrics.latency.labels(scope["method"], label).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            seconds = time.perf_counter() - started
            access_log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],  # never the query string: it may carry access_token
                    "route": route,
                    "status": status,
                    "ms": round(seconds * 1000, 2),
                    "request_id": request_id,
                },
            )


class JSONLogFormatter(logging.Formatter):
    FIELDS = ("method", "path", "route", "status", "ms", "request_id")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_config(level: str) -> dict[str, Any]:
    """logging.config's dictionary for the server: uvicorn's or Granian's own loggers write
    the same JSON lines as channelgate's (either server applies it in every worker)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JSONLogFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json"}},
        "loggers": {
            name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
            for name in (
                "uvicorn",
                "uvicorn.error",
                "uvicorn.access",
                "_granian",
                "granian.access",
                "channelgate",
            )
        },
    }


def configure_logging(level: str) -> None:
    root = logging.getLogger("channelgate")
    if not any(isinstance(h.formatter, JSONLogFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JSONLogFormatter())
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level.upper())


def operation_id(route: APIRoute) -> str:
    """`<tag>-<function>` with the tag's own words dropped from the function's name, so a
    generated client reads `groupsList`, `groupsLinkChannel`, `botKeysRevoke`."""
    if not route.tags:
        return route.name
    tag = str(route.tags[0]).replace(" ", "_")
    noise = {word for part in tag.split("_") for word in (part, part.removesuffix("s"))}
    words = [word for word in route.name.split("_") if word not in noise] or [route.name]
    return f"{tag}-{'_'.join(words)}"


class App(FastAPI):
    """FastAPI, but `GET /api/v1/bot/groups/{chat_id}/policy` goes straight to `direct`
    (policy.Endpoint behind the Gate): the layers FastAPI and Starlette put around every
    route (error and telemetry middlewares, body limit, exit stack, router) were ~13 % of
    the policy route's time under Granian (py-spy, bench/README.md)."""

    direct: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.direct is not None
            and scope["type"] == "http"
            and scope["method"] == "GET"
            and (match := policy.PATH_RE.match(scope["path"]))
        ):
            scope["app"] = self
            scope["path_params"] = match.groupdict()
            await self.direct(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


class Rendered:
    """An ASGI app whose HTTP and validation errors are answered by the app's handlers, as
    Starlette's ExceptionMiddleware answers the routes' (before anything was sent)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except StarletteHTTPException as error:
            await (await http_error(Request(scope, receive), error))(scope, receive, send)
        except RequestValidationError as error:
            await (await validation_error(Request(scope, receive), error))(scope, receive, send)


def create_app(settings: Settings | None = None) -> App:
    settings = settings or get_settings()
    services = Services.build(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.start()
        try:
            yield
        finally:
            await services.stop()

    app = App(
        title="channelgate",
        version="0.1.0",
        summary="Join-the-channel-before-you-talk: groups, policies, verifications.",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        generate_unique_id_function=operation_id,
        # FastAPI's built-in OpenTelemetry hooks cost every request, and nothing here reads
        # them: channelgate has its own access log and /metrics.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.services = services
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(bot)  # first: routes are matched in order, and the bot's are hot
    app.include_router(service)
    app.include_router(dashboard)
    app.include_router(live)
    metrics = services.metrics if settings.metrics_enabled else None
    # The policy read, called for every message, skips FastAPI's stack (App.__call__) but
    # not what every answer gets: the Gate, CORS, and the app's own error handlers.
    direct: ASGIApp = Rendered(policy.Endpoint(services.auth, services.policies))
    if settings.cors_origins:
        cors = {
            "allow_origins": settings.cors_origins,
            "allow_methods": ["GET", "POST", "PUT", "PATCH", "DELETE"],
            "allow_headers": [
                "Authorization", "Content-Type", "If-Match", "If-None-Match", "X-Request-ID"
            ],
            "expose_headers": ["ETag", "X-Request-ID", "Retry-After"],
            "max_age": 600,
        }  # fmt: skip
        app.add_middleware(CORSMiddleware, **cors)  # pyrefly: ignore[bad-argument-type]
        direct = CORSMiddleware(direct, **cors)  # pyrefly: ignore[bad-argument-type]
    app.add_middleware(Gate, limiter=services.limiter, metrics=metrics)
    app.direct = Gate(direct, limiter=services.limiter, metrics=metrics)
    app.openapi = lambda: contract.document(app)  # pyrefly: ignore[bad-assignment]
    return app
