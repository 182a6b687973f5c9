"""Every environment variable the service reads, with its default and validation."""

import re
import uuid
from functools import lru_cache
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOCAL_SUPABASE_URL = "http://127.0.0.1:54321"
MIN_HS256_SECRET = 32  # bytes: RFC 7518 3.2, a key at least as long as the hash
BOT_KEY_RE = re.compile(r"^cgk_[A-Za-z0-9_-]{43}$")


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _bot_key_entry(entry: str) -> str:
    name, sep, key = entry.partition(":")
    if not sep or not name or not BOT_KEY_RE.fullmatch(key):
        raise ValueError("BOT_API_KEYS entries must be name:cgk_<43 url-safe chars>")
    return entry


def _user_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError("OWNER_USER_IDS entries must be Supabase user UUIDs") from None


def asyncpg_url(url: str) -> str:
    """postgres:// and postgresql:// URLs (what providers hand out) with the asyncpg driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    return url


def _rate_limit(text: str) -> str:
    from limits import parse_many

    if text.strip():
        try:
            parse_many(text)
        except ValueError:
            raise ValueError(
                "must be rate limits like '100/second;3000/minute' (or empty for none)"
            ) from None
    return text.strip()


type RateLimit = Annotated[str, AfterValidator(_rate_limit)]


# A comma-separated environment variable (NoDecode: not parsed as JSON first).
type CommaList[T] = Annotated[list[T], NoDecode, BeforeValidator(_split_commas)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: str = "sqlite+aiosqlite:///./channelgate.db"
    # A session connection for LISTEN when DATABASE_URL is a transaction pooler (Supavisor
    # port 6543, PgBouncer pool_mode=transaction); default: DATABASE_URL itself.
    database_listen_url: str = ""
    # A replica (or any second URL) for the dashboard's reads: log, export, analytics, audit.
    database_read_url: str = ""
    # "transaction": DATABASE_URL is a transaction pooler: no server-side prepared
    # statements survive there, and the timeouts are set per transaction.
    database_pool_mode: Literal["session", "transaction"] = "session"
    database_pool_size: int = Field(default=10, ge=1, le=200)
    # Every wait on the database is bounded (seconds; see DESIGN.md, "Database faults").
    database_connect_timeout: float = Field(default=3.0, gt=0, le=60)
    database_command_timeout: float = Field(default=5.0, gt=0, le=600)
    database_statement_timeout: float = Field(default=4.0, gt=0, le=600)
    database_lock_timeout: float = Field(default=2.0, gt=0, le=600)
    database_pool_timeout: float = Field(default=2.0, gt=0, le=60)
    auto_migrate: bool | None = None  # None: on for SQLite, off for PostgreSQL

    supabase_url: str = ""
    supabase_jwks_url: str = ""
    supabase_jwt_secret: str = ""
    supabase_jwt_issuer: str = ""
    supabase_jwt_audience: str = "authenticated"

    owner_user_ids: CommaList[Annotated[str, AfterValidator(_user_uuid)]] = []
    require_aal2_for_owners: bool = False
    bot_api_keys: CommaList[Annotated[str, AfterValidator(_bot_key_entry)]] = []

    # Rate limits in the `limits` library's notation ("100/second;3000/minute"; "" for none):
    # per bot key, per staff user, per client address for unauthenticated calls, and per
    # address for failed authentications (checked before any database work).
    rate_limit_bot: RateLimit = "2000/second;60000/minute"
    rate_limit_staff: RateLimit = "30/second;900/minute"
    rate_limit_anonymous: RateLimit = "30/second;900/minute"
    rate_limit_auth_failures: RateLimit = "30/minute"
    rate_limit_storage_url: str = Field(
        default="", pattern=r"^$|^(memory|redis|rediss|redis\+unix)://"
    )  # "" or memory:// counts per process; redis://… shares counters across processes

    cors_origins: CommaList[str] = []
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    environment: Literal["development", "test", "production"] = "development"
    metrics_enabled: bool = False
    retention_days: int = Field(default=90, ge=1, le=3650)
    # How often each process's folder merges the rollup deltas ingestion writes (the lag
    # of the rollup tables behind the log; reads count unfolded deltas either way).
    fold_interval_seconds: float = Field(default=0.5, gt=0, le=60)

    @field_validator("database_url", "database_listen_url", "database_read_url")
    @classmethod
    def _asyncpg_driver(cls, url: str) -> str:
        return asyncpg_url(url)

    @field_validator("supabase_url")
    @classmethod
    def _no_trailing_slash(cls, url: str) -> str:
        return url.rstrip("/")

    @model_validator(mode="after")
    def _can_verify_tokens(self) -> Self:
        if self.environment != "production":
            return self
        if not (self.jwks_url or self.supabase_jwt_secret):
            raise ValueError(
                "production needs SUPABASE_URL, SUPABASE_JWKS_URL or SUPABASE_JWT_SECRET "
                "to verify dashboard tokens"
            )
        if self.supabase_jwt_secret and len(self.supabase_jwt_secret.encode()) < MIN_HS256_SECRET:
            raise ValueError(
                f"SUPABASE_JWT_SECRET must be at least {MIN_HS256_SECRET} bytes in production "
                "(anyone who guesses it signs owner tokens); use the project's JWT secret"
            )
        return self

    @model_validator(mode="after")
    def _listen_needs_a_session(self) -> Self:
        if self.database_pool_mode == "transaction" and not self.database_listen_url:
            raise ValueError(
                "DATABASE_POOL_MODE=transaction needs DATABASE_LISTEN_URL: LISTEN needs a "
                "session connection (Supabase: the direct or session-pooler URL)"
            )
        if self.database_read_url and (
            self.is_sqlite or not self.database_read_url.startswith("postgresql")
        ):
            raise ValueError(
                "DATABASE_READ_URL is a PostgreSQL replica's URL, beside a PostgreSQL "
                "DATABASE_URL (its primary)"
            )
        if self.database_statement_timeout >= self.database_command_timeout:
            raise ValueError(
                "DATABASE_STATEMENT_TIMEOUT must be below DATABASE_COMMAND_TIMEOUT, so that "
                "PostgreSQL cancels a slow statement before the client gives up on the link"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    @property
    def rate_limits(self) -> dict[str, str]:
        return {
            "bot": self.rate_limit_bot,
            "staff": self.rate_limit_staff,
            "anonymous": self.rate_limit_anonymous,
            "auth-failure": self.rate_limit_auth_failures,
        }

    @property
    def listen_url(self) -> str:
        return self.database_listen_url or self.database_url

    @property
    def jwks_url(self) -> str:
        if self.supabase_jwks_url:
            return self.supabase_jwks_url
        return f"{self.supabase_url}/auth/v1/.well-known/jwks.json" if self.supabase_url else ""

    @property
    def jwt_issuer(self) -> str:
        if self.supabase_jwt_issuer:
            return self.supabase_jwt_issuer
        # Without SUPABASE_URL: the issuer of a local `supabase start` stack (and of dev-token).
        return f"{self.supabase_url or LOCAL_SUPABASE_URL}/auth/v1"

    @property
    def env_bot_keys(self) -> dict[str, str]:
        """name -> key, from BOT_API_KEYS."""
        return dict(item.split(":", 1) for item in self.bot_api_keys)


@lru_cache
def get_settings() -> Settings:
    return Settings()
