"""Every environment variable the service reads, with its default and validation."""

import re
import uuid
from functools import lru_cache
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOCAL_SUPABASE_URL = "http://127.0.0.1:54321"
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


# A comma-separated environment variable (NoDecode: not parsed as JSON first).
type CommaList[T] = Annotated[list[T], NoDecode, BeforeValidator(_split_commas)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: str = "sqlite+aiosqlite:///./channelgate.db"
    database_pool_size: int = Field(default=10, ge=1, le=200)
    auto_migrate: bool | None = None  # None: on for SQLite, off for PostgreSQL

    supabase_url: str = ""
    supabase_jwks_url: str = ""
    supabase_jwt_secret: str = ""
    supabase_jwt_issuer: str = ""
    supabase_jwt_audience: str = "authenticated"

    owner_user_ids: CommaList[Annotated[str, AfterValidator(_user_uuid)]] = []
    require_aal2_for_owners: bool = False
    bot_api_keys: CommaList[Annotated[str, AfterValidator(_bot_key_entry)]] = []

    cors_origins: CommaList[str] = []
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    environment: Literal["development", "test", "production"] = "development"
    metrics_enabled: bool = False
    retention_days: int = Field(default=90, ge=1, le=3650)

    @field_validator("database_url")
    @classmethod
    def _asyncpg_driver(cls, url: str) -> str:
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+asyncpg://" + url.removeprefix(prefix)
        return url

    @field_validator("supabase_url")
    @classmethod
    def _no_trailing_slash(cls, url: str) -> str:
        return url.rstrip("/")

    @model_validator(mode="after")
    def _can_verify_tokens(self) -> Self:
        if self.environment == "production" and not (self.jwks_url or self.supabase_jwt_secret):
            raise ValueError(
                "production needs SUPABASE_URL, SUPABASE_JWKS_URL or SUPABASE_JWT_SECRET "
                "to verify dashboard tokens"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

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
