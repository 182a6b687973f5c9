"""SQLModel classes: the tables and the request/response schemas derived from them.

Constraints are declared once, as annotated types, and drive both the DDL and the 422s.
"""

import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Self

import pydantic
from annotated_types import Interval, Len
from fastapi.exceptions import RequestValidationError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    FiniteFloat,
    GetCoreSchemaHandler,
    GetPydanticSchema,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError, core_schema
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata: MetaData = SQLModel.metadata


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """timestamptz on PostgreSQL; on SQLite (which has no time zones) stored and read as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    @property
    def python_type(self) -> type[datetime]:
        return datetime

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


JSONType = JSON().with_variant(JSONB(), "postgresql")
# BIGINT primary keys do not autoincrement on SQLite; INTEGER there is the same 64-bit rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# ---------------------------------------------------------------- Telegram id rules

RESERVED_USER_IDS = frozenset({1087968824, 136817688, 777000})
MAX_USER_ID = 2**40 - 1
MIN_CHAT_ID = -4_000_000_000_000
NOT_A_GROUP = -(10**12)  # between basic groups (-1 … -999999999999) and supergroups


def schema(**json_schema: Any) -> WithJsonSchema:
    """The JSON schema of a type whose validator says more than pydantic can derive: what
    the service accepts, exactly, so that generated clients and fuzzers agree with it."""
    return WithJsonSchema(json_schema, mode="validation")


def _not_reserved(user_id: int) -> int:
    if user_id in RESERVED_USER_IDS:
        raise ValueError("is a Telegram service account, not a user")
    return user_id


def is_group_chat_id(chat_id: int) -> bool:
    return MIN_CHAT_ID <= chat_id <= -1 and chat_id != NOT_A_GROUP


def _group_chat_id(chat_id: int) -> int:
    if not is_group_chat_id(chat_id):
        raise ValueError("is not a group chat id (negative; supergroups -100…)")
    return chat_id


def _channel_chat_id(chat_id: int) -> int:
    if not MIN_CHAT_ID <= chat_id <= -(10**12 + 1):
        raise ValueError("is not a channel chat id (-100…)")
    return chat_id


def _normalise_username(value: object) -> object:
    return value.removeprefix("@").lower() if isinstance(value, str) else value


def _integral(value: object) -> object:
    """JSON Schema's integer includes 5.0; the bodies' strict validation refuses true, "5"
    and 5.5 (and 5.0 without this)."""
    return int(value) if type(value) is float and value.is_integer() else value


# Last in an Annotated, so that it runs first.
Integral = BeforeValidator(_integral)

USER_ID_SCHEMA = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_USER_ID,
    "not": {"enum": sorted(RESERVED_USER_IDS)},
}
GROUP_ID_SCHEMA = {
    "type": "integer",
    "minimum": MIN_CHAT_ID,
    "maximum": -1,
    "not": {"const": NOT_A_GROUP},
}
CHANNEL_ID_SCHEMA = {"type": "integer", "minimum": MIN_CHAT_ID, "maximum": -(10**12 + 1)}
# Free text never holds NUL (PostgreSQL cannot store it) and has something besides spaces.
NO_NUL = r"^[^\x00]*$"
TEXT = r"^[^\x00]*[^\s\x00][^\x00]*$"

UserId = Annotated[
    int,
    AfterValidator(_not_reserved),
    Interval(ge=1, le=MAX_USER_ID),
    schema(**USER_ID_SCHEMA),
    Integral,
]
GroupChatId = Annotated[int, AfterValidator(_group_chat_id), schema(**GROUP_ID_SCHEMA), Integral]
ChannelChatId = Annotated[
    int, AfterValidator(_channel_chat_id), schema(**CHANNEL_ID_SCHEMA), Integral
]
Username = Annotated[
    str,
    BeforeValidator(_normalise_username),
    StringConstraints(pattern=r"^[a-z][a-z0-9_]{3,31}$"),
    schema(type="string", pattern=r"^@?[A-Za-z][A-Za-z0-9_]{3,31}$"),
]


def no_nul(value: object) -> object:
    """PostgreSQL text and JSON cannot hold NUL characters: refuse them at the door."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if isinstance(value, dict):
        for key, item in value.items():
            no_nul(key)
            no_nul(item)
    elif isinstance(value, list):
        for item in value:
            no_nul(item)
    return value


def _text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    value = value.strip()
    if not value:
        raise PydanticCustomError("string_too_short", "must have a character that is not a space")
    return value


# Free text: up to N characters as sent, stored without surrounding spaces.
Title = Annotated[
    str,
    StringConstraints(max_length=255),
    AfterValidator(_text),
    schema(type="string", maxLength=255, pattern=TEXT),
]
InviteLink = Annotated[
    str,
    StringConstraints(max_length=255),
    AfterValidator(no_nul),
    StringConstraints(pattern=r"^(https://t\.me/|tg://)[^\s]+$"),
    schema(type="string", maxLength=255, pattern=r"^(https://t\.me/|tg://)[^\s\x00]+$"),
]
Count = Annotated[int, Interval(ge=0, le=2**31 - 1), Integral]

# ---------------------------------------------------------------- times
# RFC 3339 with an offset (T and Z upper case), years 1970 … 9999: never a number, never a
# date alone, never a naive time. The pattern runs in pydantic's Rust core, the parse in C:
# a 500-event batch pays no Python call per time.
RFC3339 = (
    r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
TIME_MESSAGE = "must be an RFC 3339 time with an offset, e.g. 2026-11-26T10:00:00Z"
UTC_RANGE = "must fall in the years 1970 … 9999 once converted to UTC"


def _time_core_schema(_source: Any, _handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
    from_text = core_schema.no_info_after_validator_function(
        datetime.fromisoformat, core_schema.str_schema(pattern=RFC3339)
    )
    error = {"custom_error_type": "time_format", "custom_error_message": TIME_MESSAGE}
    return core_schema.json_or_python_schema(
        json_schema=core_schema.custom_error_schema(from_text, **error),
        python_schema=core_schema.union_schema(  # query strings, or datetimes built in code
            [core_schema.is_instance_schema(datetime), from_text], **error
        ),
        serialization=core_schema.simple_ser_schema("datetime"),  # ISO 8601, in Rust
    )


def in_utc_range(value: datetime) -> bool:
    """Whether a time stays inside the years 1970 … 9999 once converted to UTC."""
    try:
        return value.astimezone(UTC).year >= 1970
    except OverflowError:  # past 9999-12-31 in UTC
        return False


def _utc_range(value: datetime) -> datetime:
    if not in_utc_range(value):
        raise ValueError(UTC_RANGE)
    return value


TIME_SCHEMA = {"type": "string", "format": "date-time", "pattern": RFC3339}
# Checked by the batch (VerificationBatch.rule_errors), once over all its events.
EventTime = Annotated[datetime, GetPydanticSchema(_time_core_schema), schema(**TIME_SCHEMA)]
Time = Annotated[EventTime, AfterValidator(_utc_range)]

# ---------------------------------------------------------------- group settings

PLACEHOLDERS = ("user", "group", "channels")
DEFAULT_WARNING_TEXT = (
    "{user}, to write in {group} please join {channels} first, then send your message again."
)
WARNING_TEXT = r"^([^{}\x00]|\{(user|group|channels)\})+$"


def _warning_text(text: str) -> str:
    no_nul(text)
    if not re.fullmatch(WARNING_TEXT, text):
        unknown = sorted(set(re.findall(r"\{([^{}]*)\}", text)) - set(PLACEHOLDERS))
        what = ", ".join("{" + u + "}" for u in unknown) if unknown else "a lone { or }"
        raise ValueError(f"has {what}; braces only as {{user}}, {{group}}, {{channels}}")
    return text


def _mute_seconds(seconds: int) -> int:
    if 0 < seconds < 30:
        raise ValueError("must be 0 (until verified) or 30 … 31622400")
    return seconds


def _distinct(ids: list[int]) -> list[int]:
    if len(set(ids)) != len(ids):
        raise ValueError("user ids must be distinct")
    return ids


Mode = Literal["all", "any"]
Action = Literal["mute", "delete", "kick", "warn"]
OnError = Literal["allow", "block"]
MuteSeconds = Annotated[
    int,
    Interval(ge=0, le=31_622_400),
    AfterValidator(_mute_seconds),
    schema(
        anyOf=[
            {"type": "integer", "const": 0},
            {"type": "integer", "minimum": 30, "maximum": 31_622_400},
        ]
    ),
    Integral,
]
WarningText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=1024),
    AfterValidator(_warning_text),
    schema(type="string", minLength=1, maxLength=1024, pattern=WARNING_TEXT),
]
WarningTtl = Annotated[int, Interval(ge=0, le=86_400), Integral]
RecheckSeconds = Annotated[int, Interval(ge=60, le=604_800), Integral]
ExemptUserIds = Annotated[
    list[UserId],
    Len(max_length=500),
    AfterValidator(_distinct),
    schema(type="array", items=USER_ID_SCHEMA, maxItems=500, uniqueItems=True),
]


def error_entry(loc: tuple[str | int, ...], msg: str, kind: str = "value_error") -> dict[str, Any]:
    """One entry of a 422's `errors`, shaped like pydantic's."""
    return {"loc": loc, "msg": msg, "type": kind}


def invalid(
    loc: tuple[str | int, ...], msg: str, kind: str = "value_error"
) -> RequestValidationError:
    """A 422 for one input that its type alone cannot refuse, rendered like any other."""
    return RequestValidationError([error_entry(loc, msg, kind)])


class Schema(SQLModel):
    """Base of every request and response schema. In a response every field is sent, so the
    OpenAPI document marks every field required there, defaults included (in requests a
    field with a default stays optional)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)  # pyrefly: ignore[bad-override]


class RequestBody(Schema):
    """Base of every request body: unknown fields are a 422, NUL characters too, and values
    are never coerced (`true` is not 1, `0` is not false, "5" is not 5)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # pyrefly: ignore[bad-override]

    @field_validator("*", mode="after")
    @classmethod
    def reject_nul(cls, value: object) -> object:
        return no_nul(value)


class GroupSettings(Schema):
    mode: Mode = Field(default="all", sa_type=String(8))
    action: Action = Field(default="mute", sa_type=String(8))
    mute_seconds: MuteSeconds = 0
    warning_text: WarningText = Field(default=DEFAULT_WARNING_TEXT, sa_type=String(1024))
    warning_ttl_seconds: WarningTtl = 60
    check_on_join: bool = True
    on_error: OnError = Field(default="allow", sa_type=String(8))
    exempt_user_ids: ExemptUserIds = Field(default_factory=list, sa_type=JSONType)
    recheck_seconds: RecheckSeconds = 600


SETTING_FIELDS = tuple(GroupSettings.model_fields)


# ---------------------------------------------------------------- shared columns


class Stamped(Schema):
    """Columns of the editable rows (groups, channels, staff): a surrogate key and times."""

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Versioned(Stamped):
    """A row the API versions: `version` is bumped on every change and sent as its ETag."""

    version: int = 1


# ---------------------------------------------------------------- groups


class GroupBase(GroupSettings):
    chat_id: GroupChatId = Field(sa_type=BigInteger, unique=True)
    title: Title = Field(sa_type=String(255))
    username: Username | None = Field(default=None, sa_type=String(32), index=True)
    is_active: bool = True


class Group(GroupBase, Versioned, table=True):
    __tablename__ = "groups"  # pyrefly: ignore[bad-override]

    member_count: Count | None = None
    added_by_user_id: int | None = Field(default=None, sa_type=BigInteger)


class GroupCreate(GroupBase, RequestBody):
    pass


def _no_default(field_schema: dict[str, Any]) -> None:
    field_schema.pop("default", None)


def kept() -> Any:
    """A PATCH field that is kept when left out: optional, but never null (its None default
    lies outside its type, and stays out of the schema)."""
    return pydantic.Field(default=None, json_schema_extra=_no_default)


class GroupUpdate(RequestBody):
    # Leave a field out to keep it; null is a 422 (reject_null), but for username (it clears).
    title: Title = kept()
    username: Username | None = None
    is_active: bool = kept()
    mode: Mode = kept()
    action: Action = kept()
    mute_seconds: MuteSeconds = kept()
    warning_text: WarningText = kept()
    warning_ttl_seconds: WarningTtl = kept()
    check_on_join: bool = kept()
    on_error: OnError = kept()
    exempt_user_ids: ExemptUserIds = kept()
    recheck_seconds: RecheckSeconds = kept()

    @field_validator("title", "is_active", *SETTING_FIELDS, mode="before")
    @classmethod
    def reject_null(cls, value: object) -> object:
        return not_null(value)


def not_null(value: object) -> object:
    if value is None:
        raise ValueError("cannot be null")
    return value


class GroupSummary(Schema):
    chat_id: int
    title: str
    username: str | None
    is_active: bool
    channel_count: int
    member_count: int | None
    created_at: datetime
    updated_at: datetime
    version: int


class ChannelRef(Schema):
    chat_id: int
    title: str
    username: str | None
    invite_link: str | None


class GroupStats(Schema):
    verified_members: int = 0
    restricted_members: int = 0
    checks_24h: int = 0
    pass_rate_24h: float | None = None


class GroupPublic(GroupSettings, GroupSummary):
    channels: list[ChannelRef]
    stats: GroupStats


class Policy(GroupSettings):
    chat_id: int
    active: bool
    version: int
    channels: list[ChannelRef]


# ---------------------------------------------------------------- channels


class ChannelBase(Schema):
    chat_id: ChannelChatId = Field(sa_type=BigInteger, unique=True)
    title: Title = Field(sa_type=String(255))
    username: Username | None = Field(default=None, sa_type=String(32), index=True)
    invite_link: InviteLink | None = Field(default=None, sa_type=String(255))


class Channel(ChannelBase, Versioned, table=True):
    __tablename__ = "channels"  # pyrefly: ignore[bad-override]

    subscriber_count: Count | None = None


class ChannelCreate(ChannelBase, RequestBody):
    pass


class ChannelUpdate(RequestBody):
    title: Title = kept()
    username: Username | None = None
    invite_link: InviteLink | None = None

    @field_validator("title", mode="before")
    @classmethod
    def reject_null(cls, value: object) -> object:
        return not_null(value)


class ChannelSummary(Schema):
    chat_id: int
    title: str
    username: str | None
    invite_link: str | None
    group_count: int
    subscriber_count: int | None
    created_at: datetime
    updated_at: datetime
    version: int


class GroupRef(Schema):
    chat_id: int
    title: str


class ChannelPublic(ChannelSummary):
    groups: list[GroupRef]


MAX_CHANNELS_PER_GROUP = 10


class GroupChannel(SQLModel, table=True):
    __tablename__ = "group_channels"  # pyrefly: ignore[bad-override]
    __table_args__ = (UniqueConstraint("group_id", "channel_id"),)

    id: int | None = Field(default=None, primary_key=True)
    group_id: int = Field(
        sa_column=Column(Integer, ForeignKey("groups.id", ondelete="CASCADE"), nullable=False)
    )
    channel_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("channels.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    position: int
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# ---------------------------------------------------------------- staff

Role = Literal["viewer", "editor", "owner"]
ROLE_RANK: dict[str, int] = {"viewer": 1, "editor": 2, "owner": 3}
# Stored without surrounding spaces, like the other free text.
Email = Annotated[
    str,
    StringConstraints(max_length=320, pattern=r"^\s*[^@\s\x00]+@[^@\s\x00]+\.[^@\s\x00]+\s*$"),
    AfterValidator(str.strip),
]


class Staff(Stamped, table=True):
    __tablename__ = "staff"  # pyrefly: ignore[bad-override]

    user_id: uuid.UUID = Field(unique=True)
    email: str | None = Field(default=None, sa_type=String(320))
    role: Role = Field(sa_type=String(8))


class StaffPut(RequestBody):
    email: Email | None = None
    role: Role


class StaffPublic(Schema):
    user_id: uuid.UUID
    email: str | None
    role: Role
    created_at: datetime | None
    source: Literal["database", "environment"]

    @classmethod
    def from_row(cls, row: Any, env_owners: set[str]) -> Self:
        """A staff member as listed, from a `Staff` row or a row of the staff listing (which
        has the same columns); an owner through OWNER_USER_IDS is an owner whatever the
        row says."""
        from_env = str(row.user_id) in env_owners
        return cls(
            user_id=row.user_id,
            email=row.email,
            role="owner" if from_env else row.role,
            created_at=row.created_at,
            source="environment" if from_env else "database",
        )


class Me(Schema):
    user_id: uuid.UUID
    email: str | None
    role: Role
    aal: str | None


# ---------------------------------------------------------------- bot keys

KeyName = Annotated[
    str,
    StringConstraints(max_length=64),
    AfterValidator(_text),
    schema(type="string", maxLength=64, pattern=TEXT),
]


class BotKey(SQLModel, table=True):
    __tablename__ = "bot_keys"  # pyrefly: ignore[bad-override]

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_type=String(64))
    prefix: str = Field(sa_type=String(12))
    key_hash: str = Field(sa_type=String(64), unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class BotKeyCreate(RequestBody):
    name: KeyName


class BotKeyPublic(Schema):
    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class BotKeyCreated(Schema):
    id: int
    name: str
    prefix: str
    key: str
    created_at: datetime


# ---------------------------------------------------------------- audit log

ActorKind = Literal["staff", "bot"]


class AuditLog(SQLModel, table=True):
    __tablename__ = "audit_log"  # pyrefly: ignore[bad-override]
    __table_args__ = (
        Index(None, "at", "id"),
        Index(None, "actor_id", "at", "id"),
        Index(None, "resource", "resource_id", "at"),
    )

    id: int | None = Field(default=None, sa_type=BigId, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    actor_kind: ActorKind = Field(sa_type=String(8))
    actor_id: str = Field(sa_type=String(64))
    actor_name: str | None = Field(default=None, sa_type=String(320))
    action: str = Field(sa_type=String(64), index=True)
    resource: str = Field(sa_type=String(32))
    resource_id: str = Field(sa_type=String(64))
    before: dict[str, Any] | None = Field(default=None, sa_type=JSONType)
    after: dict[str, Any] | None = Field(default=None, sa_type=JSONType)
    request_id: str | None = Field(default=None, sa_type=String(64))


class Actor(Schema):
    kind: ActorKind
    id: str
    name: str | None


class AuditPublic(Schema):
    id: int
    at: datetime
    actor: Actor
    action: str
    resource: str
    resource_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    request_id: str | None

    @classmethod
    def from_row(cls, row: AuditLog) -> Self:
        assert row.id is not None
        return cls(
            id=row.id,
            at=row.at,
            actor=Actor(kind=row.actor_kind, id=row.actor_id, name=row.actor_name),
            action=row.action,
            resource=row.resource,
            resource_id=row.resource_id,
            before=row.before,
            after=row.after,
            request_id=row.request_id,
        )


# ---------------------------------------------------------------- bot: members, log, instances

MAX_CLOCK_SKEW = timedelta(minutes=5)
Result = Literal["passed", "blocked", "error"]
Trigger = Literal["message", "join", "button", "channel_leave", "recheck"]
MemberStatus = Literal["verified", "restricted", "unknown"]  # unknown: only errors so far


class Member(SQLModel, table=True):
    """Current verification state of one user in one group (by chat id: it outlives links)."""

    __tablename__ = "members"  # pyrefly: ignore[bad-override]
    __table_args__ = (Index(None, "chat_id", "status", "user_id"),)

    # Keyed by what every read and ingestion's upsert go by: no surrogate id (one index
    # fewer for each member upsert to write). On PostgreSQL the table has fillfactor 80 (its
    # migration), room for updates that write no index entry (HOT).
    chat_id: int = Field(sa_type=BigInteger, primary_key=True)
    user_id: int = Field(sa_type=BigInteger, primary_key=True)
    status: MemberStatus = Field(sa_type=String(12))
    verified_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    restricted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    checks: int = 0
    # The status before the latest upsert: an upsert's RETURNING then tells ingestion which
    # members changed state, to keep member_counts exact without counting the table.
    previous_status: MemberStatus | None = Field(default=None, sa_type=String(12))


class MemberPublic(Schema):
    user_id: int
    status: MemberStatus
    verified_at: datetime | None
    restricted_at: datetime | None
    updated_at: datetime
    checks: int


class MemberState(Schema):
    status: MemberStatus
    verified_at: datetime | None
    restricted_at: datetime | None
    fresh_until: datetime | None


class Verification(SQLModel, table=True):
    """Append-only log of every check a bot reported; chat ids are not foreign keys, so the
    history of an unregistered or deleted group is kept."""

    __tablename__ = "verifications"  # pyrefly: ignore[bad-override]
    __table_args__ = (
        # The idempotency key holds the partition key (partitions.py): a retry repeats both.
        # Time first: random event ids would scatter inserts over the whole index (migration
        # c4e8a2d1f6b3).
        UniqueConstraint("occurred_at", "event_id"),
        Index(None, "occurred_at", "id"),
        Index(None, "chat_id", "occurred_at", "id"),
        Index(None, "user_id", "occurred_at", "id"),
    )

    id: int | None = Field(default=None, sa_type=BigId, primary_key=True)
    event_id: uuid.UUID
    chat_id: int = Field(sa_type=BigInteger)
    user_id: int = Field(sa_type=BigInteger)
    result: Result = Field(sa_type=String(8))
    trigger: Trigger = Field(sa_type=String(16))
    missing_channel_ids: list[int] = Field(default_factory=list, sa_type=JSONType)
    cached: bool = False
    latency_ms: int = 0
    error: str | None = Field(default=None, sa_type=String(200))
    occurred_at: datetime = Field(sa_type=UTCDateTime)
    received_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class FastRequest(BaseModel):
    """Like `RequestBody`, but plain Pydantic: validated entirely in Rust. For bodies of up to
    thousands of items on the bot's hot paths, where SQLModel's per-object init costs."""

    model_config = ConfigDict(extra="forbid", strict=True)


# Range checks run in pydantic's Rust core; the rules a range cannot say (the reserved user
# ids, the one gap in group ids, times in UTC and not ahead) run once over the batch in
# VerificationBatch.rule_errors. Per-field Python validators here cost a tenth of a
# 500-event batch. The schemas still say every rule.
CHANNEL_ID_RANGE = Interval(ge=MIN_CHAT_ID, le=-(10**12 + 1))


class VerificationIn(FastRequest):
    event_id: uuid.UUID
    chat_id: Annotated[int, Interval(ge=MIN_CHAT_ID, le=-1), schema(**GROUP_ID_SCHEMA), Integral]
    user_id: Annotated[int, Interval(ge=1, le=MAX_USER_ID), schema(**USER_ID_SCHEMA), Integral]
    result: Result
    trigger: Trigger
    missing_channel_ids: Annotated[
        list[Annotated[int, CHANNEL_ID_RANGE, Integral]], Len(max_length=10)
    ] = []
    cached: bool = False
    latency_ms: Annotated[int, Interval(ge=0, le=600_000), Integral] = 0
    # The only free text here; NUL is refused by the pattern (PostgreSQL cannot store it).
    error: Annotated[str, StringConstraints(max_length=200, pattern=NO_NUL)] | None = None
    occurred_at: EventTime


class VerificationBatch(FastRequest):
    events: Annotated[list[VerificationIn], Len(min_length=1, max_length=1000)]

    def rule_errors(self) -> list[dict[str, Any]]:
        """The rules checked once over the whole batch, as validation errors naming the
        event: reserved user ids, the group-id gap, and times more than 5 minutes ahead."""
        limit = time.time() + MAX_CLOCK_SKEW.total_seconds()
        errors = []
        for i, event in enumerate(self.events):
            if event.user_id in RESERVED_USER_IDS:
                errors.append(rule_error(i, "user_id", "is a Telegram service account"))
            if event.chat_id == NOT_A_GROUP:
                errors.append(rule_error(i, "chat_id", "is not a group chat id"))
            if not in_utc_range(event.occurred_at):
                errors.append(rule_error(i, "occurred_at", UTC_RANGE))
            elif event.occurred_at.timestamp() > limit:
                errors.append(rule_error(i, "occurred_at", "is more than 5 minutes in the future"))
        return errors


def rule_error(index: int, field: str, message: str) -> dict[str, Any]:
    return error_entry(("body", "events", index, field), message)


class IngestResult(Schema):
    accepted: int
    duplicates: int


class VerificationPublic(Schema):
    id: int
    event_id: uuid.UUID
    chat_id: int
    user_id: int
    result: Result
    trigger: Trigger
    missing_channel_ids: list[int]
    cached: bool
    latency_ms: int
    error: str | None
    occurred_at: datetime
    received_at: datetime


class BotGroupPut(RequestBody):
    title: Title
    username: Username | None = None
    member_count: Count | None = None
    added_by_user_id: UserId | None = None


class BotChannelPut(RequestBody):
    title: Title
    username: Username | None = None
    invite_link: InviteLink | None = None
    subscriber_count: Count | None = None


class GroupMigrate(RequestBody):
    new_chat_id: GroupChatId


class ChatRef(Schema):
    chat_id: int


class ChatRefList(Schema):
    items: list[ChatRef]


StatName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NO_NUL)]


class Heartbeat(RequestBody):
    instance_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
    version: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NO_NUL)]
    started_at: Time
    stats: Annotated[
        dict[StatName, FiniteFloat],
        Len(max_length=50),
        schema(
            type="object",
            maxProperties=50,
            propertyNames={"minLength": 1, "maxLength": 64, "pattern": NO_NUL},
            additionalProperties={"type": "number"},
        ),
    ] = {}


class BotInstance(SQLModel, table=True):
    __tablename__ = "bot_instances"  # pyrefly: ignore[bad-override]

    id: int | None = Field(default=None, primary_key=True)
    instance_id: str = Field(sa_type=String(64), unique=True)
    key_name: str = Field(sa_type=String(64))
    version: str = Field(sa_type=String(64))
    started_at: datetime = Field(sa_type=UTCDateTime)
    last_seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    stats: dict[str, float] = Field(default_factory=dict, sa_type=JSONType)


class BotInstancePublic(Schema):
    instance_id: str
    key_name: str
    version: str
    started_at: datetime
    last_seen_at: datetime
    online: bool
    stats: dict[str, float]


# ---------------------------------------------------------------- analytics rollups
# Internal tables, never exposed as schemas: plain SQLAlchemy Core on the same metadata.

# Upper edges (ms) of the latency histogram buckets; the last bucket is open-ended.
LATENCY_EDGES_MS = (10, 25, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 30000)
LATENCY_COLUMNS = tuple(f"lat_{i}" for i in range(len(LATENCY_EDGES_MS) + 1))
COUNTERS = ("checks", "passed", "blocked", "errors", "cached")
ALL_GROUPS = 0  # chat id of the sketches that cover every group

rollups = Table(
    "rollups",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("grain", String(1), nullable=False),  # "h" hour, "d" day (UTC)
    Column("chat_id", BigInteger, nullable=False),
    Column("bucket", UTCDateTime, nullable=False),
    *[Column(name, BigInteger, nullable=False) for name in COUNTERS],
    *[Column(name, BigInteger, nullable=False) for name in LATENCY_COLUMNS],
    UniqueConstraint("grain", "chat_id", "bucket"),
    Index(None, "grain", "bucket", "chat_id"),
)

channel_rollups = Table(
    "channel_rollups",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("grain", String(1), nullable=False),
    Column("chat_id", BigInteger, nullable=False),
    Column("channel_id", BigInteger, nullable=False),
    Column("bucket", UTCDateTime, nullable=False),
    Column("blocks", BigInteger, nullable=False),
    UniqueConstraint("grain", "chat_id", "bucket", "channel_id"),
    Index(None, "grain", "bucket", "chat_id"),
)

# Verified / restricted members per group, kept by ingestion from status transitions, so a
# summary over every group reads one row per group instead of counting the members table.
member_counts = Table(
    "member_counts",
    metadata,
    Column("chat_id", BigInteger, primary_key=True, autoincrement=False),
    Column("verified", BigInteger, nullable=False),
    Column("restricted", BigInteger, nullable=False),
)

# Where each migrated chat id went (a basic group that became a supergroup): events a bot
# still reports under the old id are stored under the new one (ingest.moved_to).
group_migrations = Table(
    "group_migrations",
    metadata,
    Column("old_chat_id", BigInteger, primary_key=True, autoincrement=False),
    Column("new_chat_id", BigInteger, nullable=False),
    Column("migrated_at", UTCDateTime, nullable=False),
)

# Sketches of the users seen, per group and for all groups (chat_id 0): `sketch` is an
# Apache DataSketches HLL, serialized compact (analytics.LG_K); `legacy`, the registers of
# the HyperLogLog kept before it where the raw log could not rebuild them (else null).
user_sketches = Table(
    "user_sketches",
    metadata,
    Column("id", BigId, primary_key=True),
    Column("grain", String(1), nullable=False),
    Column("chat_id", BigInteger, nullable=False),
    Column("bucket", UTCDateTime, nullable=False),
    Column("sketch", LargeBinary, nullable=False),
    Column("legacy", LargeBinary, nullable=True),
    UniqueConstraint("grain", "chat_id", "bucket"),
)


# What each ingested batch adds to the tables above, one insert-only row per batch and key
# (no unique key, so concurrent batches never wait on each other's rows), until the folder
# (analytics.fold) merges it into its table and deletes it in one transaction. Reads add the
# rows not folded yet (analytics.pending). Same columns as the table they feed, `id` aside.
def deltas_of(table: Table, name: str, *, skip: tuple[str, ...] = ()) -> Table:
    return Table(
        name,
        metadata,
        Column("id", BigId, primary_key=True),
        *[
            Column(c.name, c.type, nullable=c.nullable)
            for c in table.c
            if c.name != "id" and c.name not in skip
        ],
    )


rollup_deltas = deltas_of(rollups, "rollup_deltas")
channel_rollup_deltas = deltas_of(channel_rollups, "channel_rollup_deltas")
member_count_deltas = deltas_of(member_counts, "member_count_deltas")
user_sketch_deltas = deltas_of(user_sketches, "user_sketch_deltas", skip=("legacy",))


class Latency(Schema):
    p50: float | None
    p95: float | None


class AnalyticsSummary(Schema):
    since: datetime
    until: datetime
    checks: int
    passed: int
    blocked: int
    errors: int
    pass_rate: float | None
    unique_users: int
    unique_users_estimated: bool
    cache_hit_rate: float | None
    latency_ms: Latency
    active_groups: int
    verified_members: int
    restricted_members: int


class TimePoint(Schema):
    t: datetime
    checks: int
    passed: int
    blocked: int
    errors: int


class Timeseries(Schema):
    bucket: Literal["hour", "day"]
    since: datetime
    until: datetime
    points: list[TimePoint]


class TopGroup(Schema):
    chat_id: int
    title: str | None
    checks: int
    blocked: int
    pass_rate: float | None


class TopGroups(Schema):
    since: datetime
    until: datetime
    items: list[TopGroup]


class ChannelBlocks(Schema):
    chat_id: int
    title: str | None
    blocks: int


class ChannelBlocksList(Schema):
    since: datetime
    until: datetime
    items: list[ChannelBlocks]


# ---------------------------------------------------------------- pages


class Page[T](BaseModel):
    """A page of a list: plain pydantic, which (unlike SQLModel) parametrizes generics, so
    the OpenAPI document types `items` down to the item model."""

    items: list[T]
    next_cursor: str | None


class CountedPage[T](Page[T]):
    total: int


class Readiness(BaseModel):
    status: Literal["ok"]
    schema_revision: str = Field(description="the Alembic revision the database is at")
    replica_link: Literal["up", "none"] = Field(
        description="the LISTEN link to the other replicas: up, or none on SQLite"
    )


class ProblemError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An error (RFC 9457), as every non-2xx answer carries it (application/problem+json)."""

    type: str = Field(description="about:blank, or https://channelgate.dev/problems/<slug>")
    title: str
    status: int
    detail: str
    request_id: str

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class ValidationProblem(Problem):
    """A 422: the same problem, plus one entry per invalid input."""

    errors: list[ProblemError]
