"""bot.py on the real framework: python-telegram-bot's Application processing real Update
objects, with a fake Bot API (tests/telegram_api.py) that answers as each test decides, and a
real channelgate app (SQLite and PostgreSQL) behind client.py."""

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import select
from sqlmodel import col
from telegram import Update

import bot as reference
from models import Verification
from tests.conftest import Harness
from tests.factories import CHANNEL_ID, GROUP_ID, create_channel, create_group, link, served
from tests.network import Network
from tests.telegram_api import (
    BOT_ID,
    GROUP_DEFAULTS,
    TOKEN,
    BotAPIServer,
    FakeTelegram,
    button,
    chat,
    kinds,
    member_change,
    message,
    update,
)

pytestmark = pytest.mark.anyio

CHANNEL2 = -1004444444444
USER = 42
ADMIN = 77
ROOT = "http://bot-api.test"


class Bot:
    """A running reference bot: its Application, the fake Telegram, the channelgate network."""

    def __init__(self, app: Any, enforcer: reference.Enforcer, telegram: FakeTelegram) -> None:
        self.app = app
        self.enforcer = enforcer
        self.telegram = telegram

    async def send(self, body: dict[str, Any]) -> None:
        await self.app.process_update(Update.de_json(body, self.app.bot))

    async def say(self, user_id: int = USER, chat_id: int = GROUP_ID, **content: Any) -> None:
        await self.send(update(message=message(chat_id, user_id, **content)))

    async def delivered(self) -> None:
        assert await self.enforcer.client.flush(10)


@asynccontextmanager
async def running(
    harness: Harness, key: str, state: Path, telegram: FakeTelegram, network: Network, **options
) -> AsyncIterator[Bot]:
    settings = reference.BotSettings(
        token=TOKEN, url="http://test", key=key, telegram_api_url=ROOT, state_path=str(state)
    )
    options = {"heartbeat_interval": 3600, "batch_interval": 0.05, **options}
    app, enforcer = reference.build(settings, request=telegram, transport=network, **options)
    async with app:
        assert app.post_init is not None and app.post_shutdown is not None
        await app.post_init(app)
        try:
            yield Bot(app, enforcer, telegram)
        finally:
            await app.post_shutdown(app)


@pytest.fixture
def telegram() -> FakeTelegram:
    fake = FakeTelegram()
    fake.admins[GROUP_ID] = [ADMIN, BOT_ID]
    fake.join(GROUP_ID, BOT_ID, "administrator")
    fake.join(CHANNEL_ID, BOT_ID, "administrator")
    fake.chats[CHANNEL_ID] = chat(CHANNEL_ID, "channel", "News", username="news")
    fake.chats[GROUP_ID] = chat(GROUP_ID, "supergroup", "Chatters")
    return fake


@pytest.fixture
async def gatebot(
    harness: Harness, key: str, tmp_path: Path, telegram: FakeTelegram, network: Network
) -> AsyncIterator[Bot]:
    async with running(harness, key, tmp_path / "bot.sqlite3", telegram, network) as b:
        yield b


async def protect(harness: Harness, owner: dict, *channels: int, **settings: Any) -> None:
    await create_group(harness.client, owner, **settings)
    for channel in channels or (CHANNEL_ID,):
        await create_channel(
            harness.client,
            owner,
            chat_id=channel,
            title=f"Channel {channel}",
            invite_link=f"https://t.me/+join{abs(channel)}",
        )
        await link(harness.client, owner, GROUP_ID, channel)


async def events(harness: Harness) -> list[Verification]:
    async with harness.sessionmaker() as session:
        rows = await session.scalars(
            select(Verification).order_by(col(Verification.occurred_at), col(Verification.id))
        )
        return list(rows)


async def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- checks and actions


async def test_every_message_kind_of_a_non_member_is_blocked(harness, owner, gatebot: Bot):
    await protect(harness, owner, action="delete")
    for _, body in kinds(GROUP_ID, USER):
        await gatebot.send(body)
    assert len(gatebot.telegram.of("deleteMessage")) == 5  # text, photo, sticker, forward, edit
    await gatebot.delivered()
    recorded = await events(harness)
    assert [e.result for e in recorded] == ["blocked"] * 5
    assert {e.trigger for e in recorded} == {"message"}
    assert recorded[0].missing_channel_ids == [CHANNEL_ID]
    assert gatebot.telegram.urls[0].startswith(f"{ROOT}/bot{TOKEN}/")


async def test_a_member_passes_then_is_served_from_memory(harness, owner, gatebot: Bot):
    await protect(harness, owner)
    gatebot.telegram.join(CHANNEL_ID, USER)
    await gatebot.say()
    await gatebot.say()
    await gatebot.say()
    assert len(gatebot.telegram.of("getChatMember")) == 1  # then the fresh state answers
    assert gatebot.telegram.of("deleteMessage") == []
    await gatebot.delivered()
    recorded = await events(harness)
    assert [(e.result, e.cached) for e in recorded] == [
        ("passed", False),
        ("passed", True),
        ("passed", True),
    ]


@pytest.mark.parametrize(("mode", "blocked"), [("all", True), ("any", False)])
async def test_mode_over_several_channels(harness, owner, gatebot: Bot, mode: str, blocked: bool):
    await protect(harness, owner, CHANNEL_ID, CHANNEL2, mode=mode, action="delete")
    gatebot.telegram.join(CHANNEL_ID, USER)
    await gatebot.say()
    assert bool(gatebot.telegram.of("deleteMessage")) is blocked
    await gatebot.delivered()
    (recorded,) = await events(harness)
    assert recorded.result == ("blocked" if blocked else "passed")
    assert recorded.missing_channel_ids == ([CHANNEL2] if blocked else [])


async def test_mute_warns_with_buttons_bound_to_the_user(harness, owner, gatebot: Bot):
    await protect(harness, owner, action="mute", mute_seconds=3600)
    fake = gatebot.telegram
    await gatebot.say()
    (restrict,) = fake.of("restrictChatMember")
    assert restrict["user_id"] == USER and not any(restrict["permissions"].values())
    assert restrict["until_date"] > time.time() + 3500
    (warning,) = fake.of("sendMessage")
    assert f"tg://user?id={USER}" in warning["text"] and "@news" not in warning["text"]
    keyboard = warning["reply_markup"]["inline_keyboard"]
    assert keyboard[0][0]["url"].startswith("https://t.me/")
    data = keyboard[-1][0]["callback_data"]
    assert data == f"cg:joined:{USER}"
    await gatebot.say()  # still muted: no second warning
    assert len(fake.of("sendMessage")) == 1

    warning_id = gatebot.enforcer.warnings[(GROUP_ID, USER)]
    await gatebot.send(button(GROUP_ID, 999, data, warning_id))  # someone else presses it
    (refused,) = fake.of("answerCallbackQuery")
    assert refused["show_alert"] is True
    assert len(fake.of("restrictChatMember")) == 1

    await gatebot.send(button(GROUP_ID, USER, data, warning_id))  # not joined yet
    assert "join" in fake.of("answerCallbackQuery")[-1]["text"].lower()
    fake.join(CHANNEL_ID, USER)
    await gatebot.send(button(GROUP_ID, USER, data, warning_id))
    lifted = fake.of("restrictChatMember")[-1]
    assert lifted["permissions"] == GROUP_DEFAULTS  # the group's own defaults, not "all"
    assert fake.members[(GROUP_ID, USER)]["status"] == "member"
    assert {"message_id": warning_id, "chat_id": GROUP_ID} in [
        {k: d[k] for k in ("message_id", "chat_id")} for d in fake.of("deleteMessage")
    ]
    await gatebot.delivered()
    assert [e.trigger for e in await events(harness)][-2:] == ["button", "button"]


async def test_an_admins_restriction_is_given_back(harness, owner, gatebot: Bot):
    """A user an admin restricted (no photos) is muted, then verified: they get back what the
    admin allowed, not the group's defaults."""
    await protect(harness, owner, action="mute")
    fake = gatebot.telegram
    fake.join(GROUP_ID, USER, "restricted", can_send_messages=True)
    await gatebot.say()
    fake.join(CHANNEL_ID, USER)
    await gatebot.send(button(GROUP_ID, USER, f"cg:joined:{USER}", 1))
    restored = fake.of("restrictChatMember")[-1]["permissions"]
    assert restored["can_send_messages"] is True and restored["can_send_photos"] is False


async def test_a_restriction_an_admin_changed_is_never_lifted(harness, owner, gatebot: Bot):
    await protect(harness, owner, action="mute")
    fake = gatebot.telegram
    await gatebot.say()
    # An admin restricts the muted user themselves: the mute is theirs from now on.
    await gatebot.send(member_change(GROUP_ID, USER, "restricted", "restricted", by=ADMIN))
    fake.join(CHANNEL_ID, USER)
    await gatebot.send(button(GROUP_ID, USER, f"cg:joined:{USER}", 1))
    assert len(fake.of("restrictChatMember")) == 1  # the bot's mute only, never lifted
    assert "thank" in fake.of("answerCallbackQuery")[-1]["text"].lower()


async def test_kick_removes_without_banning(harness, owner, gatebot: Bot):
    await protect(harness, owner, action="kick")
    await gatebot.say()
    assert [c["user_id"] for c in gatebot.telegram.of("banChatMember")] == [USER]
    assert [c["only_if_banned"] for c in gatebot.telegram.of("unbanChatMember")] == [True]


async def test_warn_renders_placeholders_and_expires(harness, owner, gatebot: Bot):
    await protect(
        harness,
        owner,
        action="warn",
        warning_ttl_seconds=1,
        warning_text="Hi {user}, {group} needs {channels} <b>now</b>",
    )
    fake = gatebot.telegram
    await gatebot.say()
    assert fake.of("restrictChatMember") == []
    (warning,) = fake.of("sendMessage")
    assert "Chatters needs" in warning["text"] and f"Channel {CHANNEL_ID}" in warning["text"]
    assert "&lt;b&gt;now&lt;/b&gt;" in warning["text"]  # the admin's text is not markup
    warning_count = len(fake.of("deleteMessage"))
    await eventually(lambda: len(fake.of("deleteMessage")) > warning_count, 5)
    assert (GROUP_ID, USER) not in gatebot.enforcer.warnings


async def test_exempt_users_admins_and_bots_are_not_checked(harness, owner, gatebot: Bot):
    await protect(harness, owner, exempt_user_ids=[USER])
    await gatebot.say(USER)
    await gatebot.say(ADMIN)
    await gatebot.send(
        update(
            message={**message(GROUP_ID, 55), "from": {"id": 55, "is_bot": True, "first_name": "B"}}
        )
    )
    await gatebot.send(update(message={**message(GROUP_ID, 56), "sender_chat": chat(GROUP_ID)}))
    assert gatebot.telegram.of("getChatMember") == []
    await gatebot.delivered()
    assert await events(harness) == []


@pytest.mark.parametrize("on_error", ["allow", "block"])
async def test_telegram_failing_follows_on_error(harness, owner, gatebot: Bot, on_error: str):
    await protect(harness, owner, action="delete", on_error=on_error)
    gatebot.telegram.fail("getChatMember", 400, "Bad Request: member list is inaccessible")
    await gatebot.say()
    assert bool(gatebot.telegram.of("deleteMessage")) is (on_error == "block")
    await gatebot.delivered()
    (recorded,) = await events(harness)
    assert recorded.result == "error" and "inaccessible" in (recorded.error or "")


@pytest.mark.parametrize("check_on_join", [True, False])
async def test_joins_are_checked_when_asked(harness, owner, gatebot: Bot, check_on_join: bool):
    await protect(harness, owner, action="mute", check_on_join=check_on_join)
    await gatebot.send(member_change(GROUP_ID, USER, "left", "member"))
    assert bool(gatebot.telegram.of("restrictChatMember")) is check_on_join
    await gatebot.delivered()
    assert [e.trigger for e in await events(harness)] == (["join"] if check_on_join else [])


async def test_leaving_a_channel_rechecks_every_group(harness, owner, gatebot: Bot):
    await protect(harness, owner, action="mute")
    fake = gatebot.telegram
    fake.join(CHANNEL_ID, USER)
    fake.join(GROUP_ID, USER)
    await gatebot.say()
    assert fake.of("restrictChatMember") == []
    fake.leave(CHANNEL_ID, USER)
    await gatebot.send(member_change(CHANNEL_ID, USER, "member", "left", kind="channel"))
    assert [c["user_id"] for c in fake.of("restrictChatMember")] == [USER]
    await gatebot.delivered()
    assert [e.trigger for e in await events(harness)] == ["message", "channel_leave"]


# ---------------------------------------------------------------- the group's life


async def test_being_added_registers_the_group(harness, owner, gatebot: Bot):
    await gatebot.send(
        update(
            my_chat_member={
                "chat": chat(-1005555555555, "supergroup", "New home"),
                "from": {"id": ADMIN, "is_bot": False, "first_name": "A"},
                "date": int(time.time()),
                "old_chat_member": {
                    "status": "left",
                    "user": {"id": BOT_ID, "is_bot": True, "first_name": "G"},
                },
                "new_chat_member": {
                    "status": "member",
                    "user": {"id": BOT_ID, "is_bot": True, "first_name": "G"},
                },
            }
        )
    )
    group = (await harness.client.get("/api/v1/groups/-1005555555555", headers=owner)).json()
    assert group["title"] == "New home" and group["member_count"] == 321


async def test_migration_to_a_supergroup_moves_the_group(harness, owner, gatebot: Bot):
    await create_group(harness.client, owner, chat_id=-4004)
    await gatebot.send(
        update(
            message={
                **message(-4004, ADMIN),
                "chat": chat(-4004, "group"),
                "migrate_to_chat_id": GROUP_ID,
            }
        )
    )
    moved = await harness.client.get(f"/api/v1/groups/{GROUP_ID}", headers=owner)
    assert moved.status_code == 200
    assert (await harness.client.get("/api/v1/groups/-4004", headers=owner)).status_code == 404


async def test_admin_commands(harness, owner, gatebot: Bot):
    fake = gatebot.telegram
    fake.join(GROUP_ID, ADMIN, "administrator")
    await gatebot.say(USER, text="/protect @news", entities=[command(8)])
    assert "only" in fake.of("sendMessage")[-1]["text"].lower()  # not an admin
    await gatebot.say(ADMIN, text="/protect @news", entities=[command(8)])
    assert "protected" in fake.of("sendMessage")[-1]["text"].lower()
    policy = (await harness.client.get(f"/api/v1/groups/{GROUP_ID}", headers=owner)).json()
    assert [c["chat_id"] for c in policy["channels"]] == [CHANNEL_ID]
    assert policy["channels"][0]["username"] == "news"

    await gatebot.say(ADMIN, text="/status", entities=[command(7)])
    assert "@news" in fake.of("sendMessage")[-1]["text"]
    await gatebot.say(ADMIN, text="/settings", entities=[command(9)])
    assert "mode: all" in fake.of("sendMessage")[-1]["text"]
    await gatebot.say(ADMIN, text="/unprotect @news", entities=[command(10)])
    policy = (await harness.client.get(f"/api/v1/groups/{GROUP_ID}", headers=owner)).json()
    assert policy["channels"] == []
    assert len(gatebot.enforcer.tasks) >= 8  # replies and commands scheduled for deletion


async def test_protect_needs_the_bot_admin_in_the_channel(harness, owner, gatebot: Bot):
    fake = gatebot.telegram
    fake.join(GROUP_ID, ADMIN, "administrator")
    fake.join(CHANNEL_ID, BOT_ID, "member")
    await gatebot.say(ADMIN, text="/protect @news", entities=[command(8)])
    assert "admin" in fake.of("sendMessage")[-1]["text"].lower()
    assert (
        await harness.client.get(f"/api/v1/channels/{CHANNEL_ID}", headers=owner)
    ).status_code == 404


def command(length: int) -> dict[str, Any]:
    return {"type": "bot_command", "offset": 0, "length": length}


# ---------------------------------------------------------------- outages and limits


async def test_channelgate_down_the_bot_enforces_and_spools(
    harness, owner, key: str, tmp_path: Path, telegram: FakeTelegram, network: Network
):
    """channelgate goes away: the cached policy still enforces, events are spooled; across a
    restart they are delivered exactly once."""
    await protect(harness, owner, action="delete")
    state = tmp_path / "bot.sqlite3"
    async with running(harness, key, state, telegram, network, policy_ttl=0.0) as b:
        await b.say(USER)
        await b.delivered()
        network.down = True
        for i in range(5):
            await b.say(100 + i)
        assert len(telegram.of("deleteMessage")) == 6
        assert not await b.enforcer.client.flush(0.3)
        b.enforcer.client.options.attempts = 1
    assert len(await events(harness)) == 1
    network.down = False
    async with running(harness, key, state, telegram, network) as b:
        await b.delivered()
    recorded = await events(harness)
    assert len(recorded) == 6 and len({e.event_id for e in recorded}) == 6


async def test_a_flood_wait_is_waited_out_not_dropped(harness, owner, gatebot: Bot):
    await protect(harness, owner, action="mute")
    gatebot.telegram.fail("restrictChatMember", 429, "Too Many Requests: retry after 1", 1)
    await gatebot.say()
    attempts = gatebot.telegram.at("restrictChatMember")
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 1.0
    assert gatebot.telegram.members[(GROUP_ID, USER)]["status"] == "restricted"


# ---------------------------------------------------------------- `channelgate bot`, a process


async def test_channelgate_bot_polls_enforces_and_flushes_on_sigterm(
    harness, owner, key: str, tmp_path: Path, telegram: FakeTelegram
):
    """The README's way: `channelgate bot` with the three variables and a Bot API root,
    long-polling a (fake) Bot API over HTTP and calling a real channelgate server."""
    await protect(harness, owner, action="delete")
    api = BotAPIServer(telegram)
    api.pending.append(update(message=message(GROUP_ID, USER, text="spam")))
    async with served(harness) as channelgate:
        env = {
            **os.environ,
            "BOT_TOKEN": TOKEN,
            "CHANNELGATE_URL": str(channelgate.base_url),
            "CHANNELGATE_KEY": key,
            "TELEGRAM_API_URL": api.root,
            "BOT_STATE_PATH": str(tmp_path / "bot.sqlite3"),
        }
        process = await anyio.open_process([sys.executable, "-m", "cli", "bot"], env=env)
        try:
            await eventually(lambda: bool(telegram.of("deleteMessage")), 30)
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            api.close()
    assert f"/bot{TOKEN}/deleteMessage" in telegram.urls
    (recorded,) = await events(harness)  # delivered by close() on the way out
    assert recorded.result == "blocked" and recorded.user_id == USER


async def test_recheck_seconds_through_the_member_state(harness, owner, gatebot: Bot):
    """A pass older than `recheck_seconds` is not fresh: Telegram is asked again."""
    await protect(harness, owner, recheck_seconds=60)
    gatebot.telegram.join(CHANNEL_ID, USER)
    long_ago = datetime.now(UTC) - timedelta(seconds=61)
    gatebot.enforcer.client.record(GROUP_ID, USER, "passed", "message", occurred_at=long_ago)
    await gatebot.delivered()
    await gatebot.say()
    assert len(gatebot.telegram.of("getChatMember")) == 1  # stale: checked again
    await gatebot.say()
    assert len(gatebot.telegram.of("getChatMember")) == 1  # that check is fresh for 60 s


async def test_counts_are_refreshed_through_registration(harness, owner, gatebot: Bot):
    await protect(harness, owner)
    await gatebot.say(ADMIN)  # the group is seen
    await gatebot.enforcer.refresh_counts(gatebot.app.bot)
    group = (await harness.client.get(f"/api/v1/groups/{GROUP_ID}", headers=owner)).json()
    channel = (await harness.client.get(f"/api/v1/channels/{CHANNEL_ID}", headers=owner)).json()
    assert group["member_count"] == 321 and channel["subscriber_count"] == 321
    assert channel["username"] == "news"  # what Telegram says about the channel now


async def test_sending_as_a_channel_does_not_walk_around_the_check(harness, owner, gatebot):
    await protect(harness, owner, action="mute")
    own = {"sender_chat": chat(GROUP_ID)}  # an anonymous admin
    forward = {"sender_chat": chat(CHANNEL_ID, "channel"), "is_automatic_forward": True}
    other = {"sender_chat": chat(-1006666666666, "channel", "Spam")}
    for content in (own, forward, other):
        await gatebot.send(update(message={**message(GROUP_ID, 136817688), **content}))
    (deleted,) = gatebot.telegram.of("deleteMessage")
    assert gatebot.telegram.of("restrictChatMember") == []
    await gatebot.delivered()
    assert await events(harness) == []
    assert deleted["chat_id"] == GROUP_ID


async def test_a_members_command_is_a_message_like_any_other(harness, owner, gatebot: Bot):
    await protect(harness, owner, action="delete")
    await gatebot.say(USER, text="/status", entities=[command(7)])
    assert len(gatebot.telegram.of("deleteMessage")) == 1  # checked and deleted
    refusal = gatebot.telegram.of("sendMessage")[-1]
    assert "only" in refusal["text"].lower()
    assert refusal["reply_parameters"]["allow_sending_without_reply"] is True  # it was deleted
