"""Who is calling, and what they did: Supabase access tokens for the dashboard, bot API keys
for the bot, and the audit trail every write leaves in its own transaction.

Dependencies: `CurrentStaff` (any staff; the dashboard router's default), `FeedStaff` (the
same, with the token also accepted in `?access_token=`), `Editor`, `Owner`, `BotCaller`
(the bot router's default).
"""

import asyncio
import functools
import hashlib
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import jwt
from fastapi import Depends, HTTPException, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select
from starlette.requests import HTTPConnection

from db import AUDIT, BOT_KEY, Database, SessionDep, announce
from models import ROLE_RANK, AuditLog, BotKey, BotKeyCreated, Role, Staff, utcnow
from ratelimit import Limiter
from settings import BOT_KEY_RE, Settings

log = logging.getLogger("channelgate.auth")

ASYMMETRIC_ALGORITHMS = ("ES256", "RS256")
LEEWAY_SECONDS = 30
JWKS_MAX_AGE = 600.0
JWKS_MIN_REFETCH_INTERVAL = 30.0
BOT_KEY_TTL = 5.0
BOT_KEY_CACHE_MAX = 10_000


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class JWKSUnavailable(Exception):
    """The JWKS endpoint has never answered, so no asymmetric token can be checked."""


class JWKS:
    """Signing keys of the Supabase project, cached; refetched at most every 30 s.

    Hand-written rather than PyJWT's PyJWKClient: that client fetches with urllib, which
    blocks the event loop, and refetches on every unknown `kid` (a flood of forged tokens
    would become a flood of JWKS requests); this one never blocks, throttles refetches and
    keeps the cached keys when the endpoint is down."""

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url
        self.client = client
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at: float | None = None
        self.attempted_at = float("-inf")
        self.lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        stale = self.fetched_at is None or now - self.fetched_at > JWKS_MAX_AGE
        if stale or kid not in self.keys:
            await self._refresh(now)
        if self.fetched_at is None:
            raise JWKSUnavailable
        return self.keys.get(kid)

    async def _refresh(self, now: float) -> None:
        async with self.lock:
            if now - self.attempted_at < JWKS_MIN_REFETCH_INTERVAL:
                return  # someone just tried (or we are throttled): use what we have
            self.attempted_at = time.monotonic()
            try:
                response = await self.client.get(self.url)
                response.raise_for_status()
                keys = {}
                for data in response.json()["keys"]:
                    if (
                        isinstance(data, dict)
                        and data.get("kid")
                        and data.get("use", "sig") == "sig"
                    ):
                        try:
                            keys[data["kid"]] = jwt.PyJWK(data)
                        except jwt.PyJWTError:
                            continue  # malformed, or a key type we do not use: skip it
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                log.warning("JWKS fetch from %s failed: %r; keeping cached keys", self.url, exc)
                return
            self.keys = keys
            self.fetched_at = time.monotonic()


@dataclass(frozen=True, slots=True)
class BotIdentity:
    id: str  # "key:<id>" for database keys, "env:<name>" for BOT_API_KEYS
    name: str


class BotKeyCache:
    """key hash -> identity (or None: unknown or revoked) for a few seconds, so the hot path
    makes no database round trip per request. A revocation is announced (topic BOT_KEY) and
    drops the key here and on every replica at commit; BOT_KEY_TTL bounds what a missed
    announcement can leave behind."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # Least recently used first: a flood of guessed keys evicts guesses, not live keys.
        self.entries: OrderedDict[str, tuple[float, BotIdentity | None]] = OrderedDict()
        self.loading: dict[str, asyncio.Task[BotIdentity | None]] = {}
        self.generation = 0  # bumped by every invalidation: a racing load does not cache
        db.on(BOT_KEY, lambda key_hashes: self.invalidate(*key_hashes))

    async def load(self, key_hash: str) -> BotIdentity | None:
        """One database lookup per key however many requests miss at once (when an entry
        expires under load, every in-flight request of that bot misses together)."""
        task = self.loading.get(key_hash)
        if task is None:
            task = asyncio.ensure_future(_load_bot_key(self.db, key_hash))
            self.loading[key_hash] = task
            generation = self.generation

            def done(finished: asyncio.Task[BotIdentity | None]) -> None:
                if self.loading.get(key_hash) is finished:
                    del self.loading[key_hash]
                if finished.cancelled() or finished.exception() is not None:
                    return
                if generation == self.generation:  # no revocation since the read began
                    self.put(key_hash, finished.result())

            task.add_done_callback(done)
        return await asyncio.shield(task)

    def get(self, key_hash: str) -> tuple[float, BotIdentity | None] | None:
        entry = self.entries.get(key_hash)
        if entry is not None and entry[0] > time.monotonic():
            self.entries.move_to_end(key_hash)
            return entry
        return None

    def put(self, key_hash: str, identity: BotIdentity | None) -> None:
        """Unknown keys are kept too (as None), so a repeated guess costs no lookup."""
        self.entries[key_hash] = (time.monotonic() + BOT_KEY_TTL, identity)
        self.entries.move_to_end(key_hash)
        while len(self.entries) > BOT_KEY_CACHE_MAX:
            self.entries.popitem(last=False)

    def invalidate(self, *key_hashes: str) -> None:
        self.generation += 1
        for key_hash in key_hashes:
            self.entries.pop(key_hash, None)
            self.loading.pop(key_hash, None)  # later requests read again, after the change

    def clear(self) -> None:
        self.generation += 1
        self.entries.clear()
        self.loading.clear()


@functools.lru_cache(maxsize=4096)  # a fleet's keys: each bot call hashed 2.7 % of its time
def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def issue_bot_key(session: AsyncSession, actor: "Principal", name: str) -> BotKeyCreated:
    """A new bot key, stored as its hash and audited; the caller commits. The key itself is
    in the answer and nowhere else."""
    key = "cgk_" + secrets.token_urlsafe(32)
    row = BotKey(name=name, prefix=key[:12], key_hash=hash_key(key))
    session.add(row)
    await session.flush()
    assert row.id is not None
    await actor.audit(session, "bot_key.create", "bot_key", row.id, after=snapshot(row))
    return BotKeyCreated(
        id=row.id, name=row.name, prefix=row.prefix, key=key, created_at=row.created_at
    )


class AuthState:
    """Per-application auth caches."""

    def __init__(
        self, settings: Settings, http: httpx.AsyncClient, db: Database, limiter: Limiter
    ) -> None:
        self.settings = settings
        self.db = db
        self.limiter = limiter
        self.jwks = JWKS(settings.jwks_url, http) if settings.jwks_url else None
        self.bot_keys = BotKeyCache(db)
        self.env_bot_keys = {
            hash_key(key): BotIdentity(id=f"env:{name}", name=name)
            for name, key in settings.env_bot_keys.items()
        }
        self.owner_ids = set(settings.owner_user_ids)

    def describe(self) -> str:
        """Which token checks are on, for the start-up log."""
        settings = self.settings
        checks = [
            f"ES256/RS256 via JWKS {settings.jwks_url}" if self.jwks else "no JWKS",
            "HS256 with SUPABASE_JWT_SECRET" if settings.supabase_jwt_secret else "no HS256",
            f"issuer {settings.jwt_issuer}",
            f"audience {settings.supabase_jwt_audience}",
            "aal2 for owners" if settings.require_aal2_for_owners else "aal1 enough for owners",
            f"{len(self.owner_ids)} env owners, {len(self.env_bot_keys)} env bot keys",
        ]
        return "; ".join(checks)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a request: a staff member or a bot key. Audit rows are written as it."""

    kind: str  # "staff" | "bot"
    id: str
    name: str | None
    role: Role | None = None
    aal: str | None = None
    source: str = "database"
    request_id: str | None = None
    expires_at: float | None = None  # a staff token's exp (the live feed ends there)

    async def audit(
        self,
        session: AsyncSession,
        action: str,
        resource: str,
        resource_id: object,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> None:
        """Write the audit row of a change in the change's own transaction (flushed, so the
        live feed can announce its id at commit)."""
        row = AuditLog(
            actor_kind="bot" if self.kind == "bot" else "staff",
            actor_id=self.id,
            actor_name=self.name,
            action=action,
            resource=resource,
            resource_id=str(resource_id),
            before=before,
            after=after,
            request_id=self.request_id,
        )
        session.add(row)
        await session.flush()
        announce(session, AUDIT, [row.id])


SECRET_FIELDS = frozenset({"id", "key_hash"})


def snapshot(row: Any) -> dict[str, Any]:
    """A row as its audit entry shows it (never its surrogate id or a key's hash)."""
    return row.model_dump(mode="json", exclude=SECRET_FIELDS)


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="SupabaseJWT",
    bearerFormat="JWT",
    description="Supabase access token",
)
BOT_KEY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "bearerFormat": "cgk_ followed by 43 url-safe base64 characters",
    "description": "bot API key (POST /api/v1/bot-keys or `channelgate create-bot-key`)",
}


def auth_state(connection: HTTPConnection) -> AuthState:
    return connection.app.state.services.auth


# The claims channelgate reads and the JSON type each must have. A signed token is still
# input: PyJWT checks the registered claims only as far as it uses them (an `exp` of "9999"
# passes), and an `email` object or list would reach the audit log and the answers as a 500.
NUMBER, TEXT, BOOLEAN = (int, float), (str,), (bool,)
CLAIM_TYPES = {
    "exp": NUMBER, "iat": NUMBER, "nbf": NUMBER,
    "sub": TEXT, "role": TEXT, "aal": TEXT, "email": TEXT, "is_anonymous": BOOLEAN,
}  # fmt: skip
TYPE_NAMES = {NUMBER: "a number", TEXT: "a string", BOOLEAN: "true or false"}
MAX_EMAIL = 320  # what the audit log's actor_name holds


def claim_type_error(claims: dict[str, Any]) -> str | None:
    """What is wrong with a claim channelgate reads, if anything. Exact types: `true` is not
    a number. A claim left out (or null) is not wrong here; where one is required, the
    checks that follow say so."""
    for name, kinds in CLAIM_TYPES.items():
        value = claims.get(name)
        if value is not None and type(value) not in kinds:
            return f"the {name!r} claim must be {TYPE_NAMES[kinds]}"
    email = claims.get("email")
    if email is not None and (len(email) > MAX_EMAIL or "\x00" in email):
        return f"the 'email' claim must be at most {MAX_EMAIL} characters, without NUL"
    return None


async def verify_token(token: str, state: AuthState) -> dict[str, Any]:
    """Check a Supabase access token; returns its claims or raises 401/503."""
    settings = state.settings
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise unauthorized("malformed token") from None
    alg = header.get("alg")
    key: Any
    if alg == "HS256" and settings.supabase_jwt_secret:
        key = settings.supabase_jwt_secret
    elif alg in ASYMMETRIC_ALGORITHMS and state.jwks is not None:
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise unauthorized("token has no key id")
        try:
            jwk = await state.jwks.key(kid)
        except JWKSUnavailable:
            raise HTTPException(
                503, "token signing keys are unavailable", headers={"Retry-After": "30"}
            ) from None
        if jwk is None:
            raise unauthorized("unknown signing key")
        if jwk.algorithm_name != alg:
            raise unauthorized("token algorithm does not match its key")
        key = jwk.key
    else:
        raise unauthorized(f"token algorithm {alg!r} is not accepted")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=settings.supabase_jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise unauthorized("token expired") from None
    except jwt.InvalidSignatureError:
        raise unauthorized("bad token signature") from None
    except jwt.InvalidTokenError as exc:
        raise unauthorized(f"invalid token: {exc}") from None
    except (ValueError, TypeError):
        raise unauthorized("invalid token") from None
    if (wrong := claim_type_error(claims)) is not None:
        raise unauthorized(f"invalid token: {wrong}")
    if claims.get("role") != "authenticated":
        raise unauthorized("token role must be 'authenticated'")
    if claims.get("is_anonymous") is True:
        raise unauthorized("anonymous sign-ins are not accepted")
    try:
        claims["sub"] = str(uuid.UUID(claims["sub"]))
    except ValueError:
        raise unauthorized("token subject is not a user id") from None
    return claims


async def staff_with_token(
    connection: HTTPConnection, session: AsyncSession, token: str | None
) -> Principal:
    """The staff member a Supabase access token belongs to; 401 for a bad token, 403 for a
    valid one whose user is not staff."""
    state = auth_state(connection)
    address = client_address(connection.scope)
    state.limiter.check("auth-failure", address)
    try:
        if not token:
            raise unauthorized("missing bearer token")
        if token.startswith("cgk_"):
            raise unauthorized("bot keys are not accepted on dashboard routes")
        claims = await verify_token(token, state)
    except HTTPException as refusal:
        if refusal.status_code == 401:
            state.limiter.hit("auth-failure", address)
        raise
    user_id = claims["sub"]
    state.limiter.hit("staff", user_id)
    request_id = connection.scope.get("state", {}).get("request_id")
    common = {
        "aal": claims.get("aal"),
        "request_id": request_id,
        "name": claims.get("email"),
        "expires_at": float(claims["exp"]),
    }
    if user_id in state.owner_ids:
        return Principal(kind="staff", id=user_id, role="owner", source="environment", **common)
    staff = await session.scalar(select(Staff).where(Staff.user_id == uuid.UUID(user_id)))
    if staff is None:
        raise HTTPException(403, "this account is not channelgate staff")
    return Principal(kind="staff", id=user_id, role=staff.role, **common)


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def current_staff(
    connection: HTTPConnection, session: SessionDep, credentials: Credentials
) -> Principal:
    return await staff_with_token(
        connection, session, credentials.credentials if credentials else None
    )


async def feed_staff(
    connection: HTTPConnection,
    session: SessionDep,
    credentials: Credentials,
    access_token: Annotated[
        str | None,
        Query(description="the access token, for EventSource (which cannot set headers)"),
    ] = None,
) -> Principal:
    token = credentials.credentials if credentials else access_token
    return await staff_with_token(connection, session, token)


CurrentStaff = Annotated[Principal, Depends(current_staff)]
FeedStaff = Annotated[Principal, Depends(feed_staff)]


def refusal(principal: Principal, minimum: Role, settings: Settings) -> str | None:
    """Why this staff member may not act as `minimum` (None if they may): the role's rank,
    and for owners aal2 when REQUIRE_AAL2_FOR_OWNERS."""
    if ROLE_RANK[principal.role or "viewer"] < ROLE_RANK[minimum]:
        return f"this needs the {minimum} role"
    if minimum == "owner" and settings.require_aal2_for_owners and principal.aal != "aal2":
        return "owner actions need multi-factor sign-in (aal2)"
    return None


def _require(minimum: Role):
    async def check(principal: CurrentStaff, connection: HTTPConnection) -> Principal:
        if (why := refusal(principal, minimum, auth_state(connection).settings)) is not None:
            raise HTTPException(403, why)
        return principal

    return check


def may_read_audit(principal: Principal, settings: Settings) -> bool:
    """GET /audit's rule (owners), for the live feed's audit entries too."""
    return refusal(principal, "owner", settings) is None


async def still_staff_as(state: AuthState, principal: Principal) -> bool:
    """Whether this staff member still holds the role they had (a long-lived stream asks,
    now and then). Environment owners always do; a database that cannot answer says no."""
    if principal.source == "environment":
        return True
    try:
        async with state.db.sessionmaker() as session:
            role = await session.scalar(
                select(Staff.role).where(Staff.user_id == uuid.UUID(principal.id))
            )
    except Exception:
        log.warning("could not re-check staff %s for the live feed", principal.id)
        return False
    return role == principal.role


Editor = Annotated[Principal, Depends(_require("editor"))]
Owner = Annotated[Principal, Depends(_require("owner"))]


async def bot_caller(connection: HTTPConnection) -> Principal:
    # Reads the header itself (no HTTPBearer sub-dependency): this runs on the hot path.
    # app.py documents the BotKey scheme on every bot route in the OpenAPI document.
    return await authenticate_bot(
        auth_state(connection),
        connection.headers.get("authorization", ""),
        connection.scope.get("state", {}).get("request_id"),
        client_address(connection.scope),
    )


def client_address(scope: Any) -> str:
    """The caller's address (uvicorn takes it from X-Forwarded-For behind a trusted proxy)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


async def authenticate_bot(
    state: AuthState, authorization: str, request_id: str | None, address: str
) -> Principal:
    """The bot key in an Authorization header value, checked against BOT_API_KEYS and the
    (cached) database keys; 401 unless it is a live key, 429 over the key's rate limit.
    An address with too many failed attempts gets 429 instead of a database lookup: keys
    known here (BOT_API_KEYS, or cached) still work from it, so a guesser behind the same
    NAT as a fleet slows down itself, not the fleet."""
    limiter = state.limiter
    scheme, _, key = authorization.partition(" ")
    try:
        if scheme.lower() != "bearer" or not key:
            raise unauthorized("missing bot key")
        if not BOT_KEY_RE.fullmatch(key):
            raise unauthorized("bot routes need a bot key (cgk_…)")
        key_hash = hash_key(key)
        identity = state.env_bot_keys.get(key_hash)
        if identity is None:
            cached = state.bot_keys.get(key_hash)
            if cached is None:
                limiter.check("auth-failure", address)  # before any lookup
            identity = cached[1] if cached else await state.bot_keys.load(key_hash)
        if identity is None:
            raise unauthorized("unknown or revoked bot key")
    except HTTPException as refusal:
        if refusal.status_code == 401:
            limiter.hit("auth-failure", address)
        raise
    limiter.hit("bot", identity.id)
    return Principal(kind="bot", id=identity.id, name=identity.name, request_id=request_id)


async def _load_bot_key(db: Database, key_hash: str) -> BotIdentity | None:
    # Its own short session: bot authentication runs before the request's session is used.
    async with db.sessionmaker() as session:
        row = (
            await session.execute(
                select(BotKey.id, BotKey.name, BotKey.last_used_at).where(
                    BotKey.key_hash == key_hash,
                    BotKey.revoked_at.is_(None),  # pyrefly: ignore[missing-attribute]
                )
            )
        ).first()
        identity = None
        if row is not None:
            identity = BotIdentity(id=f"key:{row.id}", name=row.name)
            now = utcnow()
            if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
                await session.execute(
                    update(BotKey).where(BotKey.id == row.id).values(last_used_at=now)
                )
                await session.commit()
    return identity


BotCaller = Annotated[Principal, Depends(bot_caller)]
