"""The reference bot: python-telegram-bot 22 enforcing channelgate's policy in Telegram groups.

`channelgate bot` runs it (polling) with BOT_TOKEN, CHANNELGATE_URL and CHANNELGATE_KEY, and
TELEGRAM_API_URL for a self-hosted Bot API server. Everything it knows comes from channelgate
through client.py: the policy (cached, so a busy group costs no call per message), the member
states (a fresh pass skips Telegram), and every check it makes is recorded there.

How it enforces a group's settings (API.md, "Group settings"):
- Every message a user sends (text, media, stickers, forwards, edits) is checked, unless the
  sender is exempt (`exempt_user_ids`), a chat admin or a bot. A message sent as a chat is
  the group's own when it is an anonymous admin's or the linked channel's automatic forward;
  sent as any other channel, it is deleted (no member can be checked behind it). Joins are
  checked when `check_on_join`. A user who leaves a channel is re-checked in every group
  that requires it.
- A check asks Telegram whether the user is in each linked channel; `mode` all/any decides.
  When Telegram cannot answer, `on_error` decides: `allow` lets the message through, `block`
  treats the user as not subscribed.
- Blocked: `delete` deletes the message; `warn` deletes it and posts `warning_text` with a
  join button per missing channel and an "I joined" button only the warned user can use (the
  warning is deleted after `warning_ttl_seconds`); `mute` does the same and restricts the
  user (for `mute_seconds`, 0 = until verified); `kick` deletes it and removes the user (who
  may come back once subscribed).
- A mute is lifted when the user passes a check, restoring the permissions they had before
  (the group's defaults, or an admin's earlier restriction). A restriction an admin set or
  changed after the bot's mute is never lifted: the bot lifts only its own mutes, kept in a
  ledger in the state file beside the client's spool.
- Telegram's flood limits are python-telegram-bot's AIORateLimiter's (about 30 messages per
  second overall, 20 per minute per group) for what the bot sends; a flood wait is waited out
  and the call retried, restrictions included.
"""

import os

# python-telegram-bot's documented opt-in to durations as timedelta (its next major default);
# without it, its own flood-wait handling warns on every RetryAfter.
os.environ.setdefault("PTB_TIMEDELTA", "1")

import asyncio
import contextlib
import html
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from telegram import (
    Bot,
    Chat,
    ChatMember,
    ChatMemberRestricted,
    ChatPermissions,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    ReplyParameters,
    Update,
    User,
)
from telegram.constants import ChatMemberStatus, ChatType
from telegram.error import Forbidden, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    ChatMemberHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)
from telegram.request import BaseRequest

import client as gate

log = logging.getLogger("channelgate.bot")

JOINED = {ChatMemberStatus.OWNER, ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.MEMBER}
GONE = {ChatMemberStatus.LEFT, ChatMemberStatus.BANNED}
ADMINS = {ChatMemberStatus.OWNER, ChatMemberStatus.ADMINISTRATOR}
GROUPS = {ChatType.GROUP, ChatType.SUPERGROUP}
ANONYMOUS_ADMIN = 1087968824  # Telegram's GroupAnonymousBot: an admin writing as the group
BUTTON = "cg:joined:"  # callback data of the "I joined" button, then the warned user's id
REPLY_TTL = 30.0  # seconds before a command's reply (and the command) are deleted
ADMIN_TTL = 300.0  # seconds a group's admin list is trusted
# Endpoints that send something to a chat: python-telegram-bot's limiter applies its quotas
# to these. Everything else (reads such as getChatMember, moderation such as
# restrictChatMember) passes without the per-group quota of 20 a minute, which would cap a
# channel at 20 checks a minute; a flood wait on them is still waited out and retried.
SENDS = frozenset({"sendMessage", "editMessageText", "copyMessage", "forwardMessage"})
PERMISSIONS = (
    "can_send_messages",
    "can_send_audios",
    "can_send_documents",
    "can_send_photos",
    "can_send_videos",
    "can_send_video_notes",
    "can_send_voice_notes",
    "can_send_polls",
    "can_send_other_messages",
    "can_add_web_page_previews",
    "can_change_info",
    "can_invite_users",
    "can_pin_messages",
    "can_manage_topics",
    "can_edit_tag",
    "can_react_to_messages",
)
NOTHING = ChatPermissions.no_permissions()


class FloodLimits(AIORateLimiter):
    """AIORateLimiter's quotas for messages only; flood waits retried on every call."""

    async def process_request(  # pyrefly: ignore[bad-override]
        self,
        callback: Callable[..., Coroutine[Any, Any, Any]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> Any:
        if endpoint not in SENDS:
            data = {k: v for k, v in data.items() if k != "chat_id"}  # no chat: no quota
        return await super().process_request(
            callback, args, kwargs, endpoint, data, rate_limit_args
        )


# ---------------------------------------------------------------- settings and state


@dataclass(frozen=True)
class BotSettings:
    token: str
    url: str
    key: str
    telegram_api_url: str = "https://api.telegram.org"
    state_path: str = "channelgate-bot.sqlite3"
    refresh_seconds: float = 3600.0  # member and subscriber counts
    flood_retries: int = 5

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "BotSettings":
        env = os.environ if environ is None else environ
        missing = [n for n in ("BOT_TOKEN", "CHANNELGATE_URL", "CHANNELGATE_KEY") if not env.get(n)]
        if missing:
            raise ValueError(f"set {', '.join(missing)} (see the README's 'The bot')")
        return cls(
            token=env["BOT_TOKEN"],
            url=env["CHANNELGATE_URL"],
            key=env["CHANNELGATE_KEY"],
            telegram_api_url=env.get("TELEGRAM_API_URL", cls.telegram_api_url).rstrip("/"),
            state_path=env.get("BOT_STATE_PATH", cls.state_path),
            refresh_seconds=float(env.get("BOT_REFRESH_SECONDS", cls.refresh_seconds)),
        )


class Mutes:
    """The mutes this bot made, with what the user could do before (None: the group's
    defaults), in a SQLite table beside the client's spool. Only these are ever lifted."""

    def __init__(self, path: str) -> None:
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS channelgate_mutes (chat_id INTEGER, user_id INTEGER,"
            " prior TEXT, PRIMARY KEY (chat_id, user_id))"
        )
        rows = self.db.execute("SELECT chat_id, user_id, prior FROM channelgate_mutes")
        self.rows: dict[tuple[int, int], str | None] = {(c, u): p for c, u, p in rows}

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self.rows

    def prior(self, key: tuple[int, int]) -> dict[str, Any] | None:
        value = self.rows.get(key)
        return None if value is None else json.loads(value)

    async def add(self, key: tuple[int, int], prior: dict[str, Any] | None) -> None:
        self.rows[key] = None if prior is None else json.dumps(prior)
        await asyncio.to_thread(
            self._write,
            "INSERT OR REPLACE INTO channelgate_mutes VALUES (?, ?, ?)",
            (*key, self.rows[key]),
        )

    async def remove(self, key: tuple[int, int]) -> None:
        if self.rows.pop(key, "absent") != "absent":
            await asyncio.to_thread(
                self._write, "DELETE FROM channelgate_mutes WHERE chat_id = ? AND user_id = ?", key
            )

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self.lock:
            self.db.execute(sql, params)

    def close(self) -> None:
        with self.lock:
            self.db.close()


@dataclass(frozen=True)
class Check:
    result: gate.Result
    missing: list[int]
    latency_ms: int
    error: str | None = None

    def blocks(self, policy: gate.Policy) -> bool:
        return self.result == "blocked" or (self.result == "error" and policy.on_error == "block")


def enforced(policy: gate.Policy | None) -> bool:
    return policy is not None and policy.active and bool(policy.channels)


def permissions_of(member: ChatMember) -> dict[str, Any]:
    """A restricted member's permissions and end, to give back when the bot's mute ends."""
    until = getattr(member, "until_date", None)
    return {
        "permissions": {p: bool(getattr(member, p, False)) for p in PERMISSIONS},
        "until": until.timestamp() if isinstance(until, datetime) else None,
    }


def mention(user: User) -> str:
    return f'<a href="tg://user?id={user.id}">{html.escape(user.full_name)}</a>'


def channel_name(channel: gate.ChannelRef) -> str:
    return f"@{channel.username}" if channel.username else html.escape(channel.title)


def join_link(channel: gate.ChannelRef) -> str | None:
    if channel.invite_link:
        return channel.invite_link
    return f"https://t.me/{channel.username}" if channel.username else None


# ---------------------------------------------------------------- the enforcement


class Enforcer:
    """The handlers. One per bot process; `client` is started and closed with the app."""

    def __init__(self, client: gate.Client, mutes: Mutes, settings: BotSettings) -> None:
        self.client = client
        self.mutes = mutes
        self.settings = settings
        self.admins: dict[int, tuple[float, frozenset[int]]] = {}
        self.warnings: dict[tuple[int, int], int] = {}  # (chat, user) -> live warning's id
        self.seen_groups: dict[int, None] = {}  # groups whose counts are refreshed
        self.locks: dict[tuple[int, int], asyncio.Lock] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ helpers

    def later(self, seconds: float, action: Callable[[], Awaitable[Any]]) -> None:
        """Run `action` after `seconds` (a warning's or a reply's deletion), in the background."""

        async def run() -> None:
            await asyncio.sleep(seconds)
            with contextlib.suppress(TelegramError):
                await action()

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def policy(self, chat: Chat) -> gate.Policy | None:
        self.seen_groups[chat.id] = None
        try:
            policy = await self.client.policy(chat.id)
        except gate.ChannelgateError as error:
            log.warning("no policy for %s: %s", chat.id, error)
            return None
        if policy is None:  # a group the bot is in but channelgate does not know: register
            with contextlib.suppress(gate.ChannelgateError):
                policy = await self.client.register_group(
                    chat.id, chat.title or str(chat.id), username=chat.username
                )
        return policy

    async def admin_ids(self, bot: Bot, chat_id: int) -> frozenset[int]:
        cached = self.admins.get(chat_id)
        if cached is not None and time.monotonic() - cached[0] < ADMIN_TTL:
            return cached[1]
        members = await bot.get_chat_administrators(chat_id)
        ids = frozenset(m.user.id for m in members)
        self.admins[chat_id] = (time.monotonic(), ids)
        return ids

    async def exempt(self, bot: Bot, policy: gate.Policy, user: User) -> bool:
        if user.is_bot or user.id in policy.exempt_user_ids or user.id == ANONYMOUS_ADMIN:
            return True
        try:
            return user.id in await self.admin_ids(bot, policy.chat_id)
        except TelegramError:
            return False  # cannot tell: check them like anyone (an admin is in the channels)

    async def check(self, bot: Bot, policy: gate.Policy, user_id: int) -> Check:
        """Ask Telegram whether the user is in the group's channels."""
        started = time.perf_counter()

        async def joined(channel: gate.ChannelRef) -> bool:
            member = await bot.get_chat_member(channel.chat_id, user_id)
            if member.status == ChatMemberStatus.RESTRICTED:
                return isinstance(member, ChatMemberRestricted) and member.is_member
            return member.status in JOINED

        answers = await asyncio.gather(
            *(joined(c) for c in policy.channels), return_exceptions=True
        )
        elapsed = int((time.perf_counter() - started) * 1000)
        for answer in answers:
            if isinstance(answer, TelegramError):
                error = f"{type(answer).__name__}: {answer.message}"
                return Check("error", [], elapsed, error[:200])
            if isinstance(answer, BaseException):
                raise answer
        missing = [c.chat_id for c, ok in zip(policy.channels, answers, strict=True) if not ok]
        passed = not missing if policy.mode == "all" else len(missing) < len(policy.channels)
        return Check("passed", [], elapsed) if passed else Check("blocked", missing, elapsed)

    def record(
        self, policy: gate.Policy, user_id: int, check: Check, trigger: gate.Trigger
    ) -> None:
        self.client.record(
            policy.chat_id,
            user_id,
            check.result,
            trigger,
            missing_channel_ids=check.missing,
            latency_ms=check.latency_ms,
            error=check.error,
        )

    async def verify(
        self, bot: Bot, policy: gate.Policy, user_id: int, trigger: gate.Trigger
    ) -> Check:
        """The member state if fresh (recorded as a cached pass), else a Telegram check."""
        try:
            state = await self.client.member(policy.chat_id, user_id)
        except gate.ChannelgateError:
            state = None
        if state is not None and state.fresh():
            check = Check("passed", [], 0)
            self.client.record(policy.chat_id, user_id, "passed", trigger, cached=True)
            return check
        check = await self.check(bot, policy, user_id)
        self.record(policy, user_id, check, trigger)
        if check.result == "passed":
            await self.passed(bot, policy.chat_id, user_id)
        return check

    async def passed(self, bot: Bot, chat_id: int, user_id: int) -> None:
        """A member passed a check: end this bot's mute and take their warning down."""
        try:
            await self.lift(bot, chat_id, user_id)
        except TelegramError as error:  # kept in the ledger: lifted at the next pass
            log.warning("unmuting %s in %s failed: %s", user_id, chat_id, error)
        if (message_id := self.warnings.pop((chat_id, user_id), None)) is not None:
            with contextlib.suppress(TelegramError):
                await bot.delete_message(chat_id, message_id)

    # ------------------------------------------------------------ actions

    async def act(
        self, bot: Bot, policy: gate.Policy, user: User, check: Check, message: Message | None
    ) -> None:
        """What the group's `action` says, for a user who is not subscribed."""
        chat_id = policy.chat_id
        if message is not None:
            with contextlib.suppress(TelegramError):
                await message.delete()
        if policy.action == "delete":
            return
        if policy.action == "kick":
            await bot.ban_chat_member(chat_id, user.id)
            await bot.unban_chat_member(chat_id, user.id, only_if_banned=True)
            return
        if policy.action == "mute":
            await self.mute(bot, policy, user.id)
        await self.warn(bot, policy, user, check)

    async def mute(self, bot: Bot, policy: gate.Policy, user_id: int) -> None:
        key = (policy.chat_id, user_id)
        member = await bot.get_chat_member(policy.chat_id, user_id)
        restricted = member.status == ChatMemberStatus.RESTRICTED
        if key in self.mutes:
            if restricted:
                return  # still muted by this bot
            prior = self.mutes.prior(key)  # that mute ran out; what came before it stays
        else:
            prior = permissions_of(member) if restricted else None
        until = (
            datetime.now(UTC) + timedelta(seconds=policy.mute_seconds)
            if policy.mute_seconds
            else None
        )
        await self.mutes.add(key, prior)  # first: a crash after the call still lifts it
        try:
            await bot.restrict_chat_member(
                policy.chat_id,
                user_id,
                NOTHING,
                until_date=until,
                use_independent_chat_permissions=True,
            )
        except TelegramError:
            await self.mutes.remove(key)
            raise

    async def lift(self, bot: Bot, chat_id: int, user_id: int) -> None:
        """End this bot's mute: give back what the user had before it."""
        key = (chat_id, user_id)
        if key not in self.mutes:
            return
        prior = self.mutes.prior(key)
        if prior is None:
            chat = await bot.get_chat(chat_id)
            permissions = chat.permissions or ChatPermissions.all_permissions()
            until = None
        else:
            permissions = ChatPermissions(**prior["permissions"])
            until = datetime.fromtimestamp(prior["until"], UTC) if prior["until"] else None
        await bot.restrict_chat_member(
            chat_id, user_id, permissions, until_date=until, use_independent_chat_permissions=True
        )
        await self.mutes.remove(key)

    async def warn(self, bot: Bot, policy: gate.Policy, user: User, check: Check) -> None:
        key = (policy.chat_id, user.id)
        if key in self.warnings:
            return  # one live warning per user, not one per message
        missing = [c for c in policy.channels if c.chat_id in check.missing] or policy.channels
        text = (
            html.escape(policy.warning_text)
            .replace("{user}", mention(user))
            .replace("{group}", html.escape(await self.group_title(bot, policy.chat_id)))
            .replace("{channels}", ", ".join(channel_name(c) for c in missing))
        )
        rows = [
            [InlineKeyboardButton(f"Join {c.title}", url=link)]
            for c in missing
            if (link := join_link(c))
        ]
        rows.append([InlineKeyboardButton("I joined", callback_data=f"{BUTTON}{user.id}")])
        sent = await bot.send_message(
            policy.chat_id, text, parse_mode="HTML", reply_markup=InlineKeyboardMarkup(rows)
        )
        self.warnings[key] = sent.message_id
        if policy.warning_ttl_seconds:

            async def expire() -> None:
                if self.warnings.get(key) == sent.message_id:
                    del self.warnings[key]
                await sent.delete()

            self.later(policy.warning_ttl_seconds, expire)

    async def group_title(self, bot: Bot, chat_id: int) -> str:
        with contextlib.suppress(TelegramError):
            return (await bot.get_chat(chat_id)).title or ""
        return ""

    # ------------------------------------------------------------ handlers

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, chat = update.effective_message, update.effective_chat
        if message is None or chat is None or chat.type not in GROUPS:
            return
        user = message.from_user
        if user is None:
            return
        if message.sender_chat is not None:
            await self.on_chat_message(chat, message)
            return
        policy = await self.policy(chat)
        if policy is None or not enforced(policy) or await self.exempt(context.bot, policy, user):
            return
        # One check at a time per member: two messages at once make one mute, one warning.
        async with self.locks.setdefault((chat.id, user.id), asyncio.Lock()):
            check = await self.verify(context.bot, policy, user.id, "message")
            if check.blocks(policy):
                await self.act(context.bot, policy, user, check, message)
        if len(self.locks) > 10_000:
            self.locks = {k: v for k, v in self.locks.items() if v.locked()}

    async def on_chat_message(self, chat: Chat, message: Message) -> None:
        """A message written as a chat. The group itself (an anonymous admin) and the linked
        channel's automatic forwards are the group's own; anything else was sent as some
        channel, where no member can be checked: in a protected group it is deleted (else
        "send as channel" would walk around every check)."""
        assert message.sender_chat is not None
        if message.sender_chat.id == chat.id or message.is_automatic_forward:
            return
        policy = await self.policy(chat)
        if enforced(policy):
            with contextlib.suppress(TelegramError):
                await message.delete()

    async def on_member(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        change = update.chat_member
        if change is None:
            return
        chat, user = change.chat, change.new_chat_member.user
        old, new = change.old_chat_member.status, change.new_chat_member.status
        if chat.type == ChatType.CHANNEL:
            if new in GONE and old not in GONE:
                await self.left_channel(context.bot, chat.id, user)
            return
        if chat.type not in GROUPS:
            return
        if old in ADMINS or new in ADMINS:
            self.admins.pop(chat.id, None)  # promoted or demoted
        if (
            change.from_user.id not in (context.bot.id, user.id)
            and (chat.id, user.id) in self.mutes
        ):
            await self.mutes.remove((chat.id, user.id))  # an admin took over: theirs now
        if old in GONE and new not in GONE:
            await self.joined_group(context.bot, chat, user)

    async def joined_group(self, bot: Bot, chat: Chat, user: User) -> None:
        policy = await self.policy(chat)
        if policy is None or not enforced(policy) or not policy.check_on_join:
            return
        if await self.exempt(bot, policy, user):
            return
        check = await self.verify(bot, policy, user.id, "join")
        if check.blocks(policy):
            await self.act(bot, policy, user, check, None)

    async def left_channel(self, bot: Bot, channel_id: int, user: User) -> None:
        """A user left a required channel: re-check them in every group requiring it."""
        try:
            groups = await self.client.channel_groups(channel_id)
        except gate.ChannelgateError as error:
            log.warning("groups of channel %s unknown: %s", channel_id, error)
            return
        for chat_id in groups:
            try:
                policy = await self.client.policy(chat_id)
                if policy is None or not enforced(policy) or await self.exempt(bot, policy, user):
                    continue
                if (await bot.get_chat_member(chat_id, user.id)).status in GONE:
                    continue  # not in that group
                check = await self.check(bot, policy, user.id)
                self.record(policy, user.id, check, "channel_leave")
                if check.blocks(policy):
                    await self.act(bot, policy, user, check, None)
            except (TelegramError, gate.ChannelgateError) as error:
                log.warning("re-check of %s in %s failed: %s", user.id, chat_id, error)

    async def on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None or not query.data or query.message is None:
            return
        owner = int(query.data.removeprefix(BUTTON))
        if query.from_user.id != owner:
            await query.answer("This button is for the member it was shown to.", show_alert=True)
            return
        chat = query.message.chat
        policy = await self.policy(chat)
        if policy is None or not enforced(policy):
            await query.answer()
            return
        check = await self.check(context.bot, policy, owner)
        self.record(policy, owner, check, "button")
        if check.result == "passed":
            await self.passed(context.bot, chat.id, owner)
            await query.answer("Thank you, you can write now.")
        elif check.result == "error":
            await query.answer("Telegram did not answer; try again in a moment.", show_alert=True)
        else:
            names = ", ".join(c.title for c in policy.channels if c.chat_id in check.missing)
            await query.answer(f"Please join {names} first.", show_alert=True)

    async def on_my_member(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The bot was added to a group (register it) or made admin of a channel."""
        change = update.my_chat_member
        if change is None or change.new_chat_member.status in GONE:
            return
        chat, bot = change.chat, context.bot
        try:
            if chat.type in GROUPS:
                await self.client.register_group(
                    chat.id,
                    chat.title or str(chat.id),
                    username=chat.username,
                    member_count=await bot.get_chat_member_count(chat.id),
                    added_by_user_id=change.from_user.id if not change.from_user.is_bot else None,
                )
                self.seen_groups[chat.id] = None
            elif chat.type == ChatType.CHANNEL:
                await self.register_channel(bot, chat.id)
        except (TelegramError, gate.ChannelgateError) as error:
            log.warning("registering %s failed: %s", chat.id, error)

    async def on_migrate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.migrate_to_chat_id is None:
            return
        try:
            await self.client.migrate(message.chat.id, message.migrate_to_chat_id)
        except gate.ChannelgateError as error:
            log.warning("migration of %s failed: %s", message.chat.id, error)
        self.seen_groups.pop(message.chat.id, None)
        self.seen_groups[message.migrate_to_chat_id] = None

    # ------------------------------------------------------------ admin commands

    async def reply(self, message: Message, text: str) -> None:
        """Answer a command; both the command and the answer go after REPLY_TTL."""
        # A reply that still goes out when the command was deleted (a member's, just checked).
        reply_to = ReplyParameters(message.message_id, allow_sending_without_reply=True)
        sent = await message.get_bot().send_message(
            message.chat.id, text, parse_mode="HTML", reply_parameters=reply_to
        )
        self.later(REPLY_TTL, sent.delete)
        self.later(REPLY_TTL, message.delete)

    async def admin_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> bool:
        message, chat = update.effective_message, update.effective_chat
        if message is None or chat is None or message.from_user is None:
            return False
        if chat.type not in GROUPS:
            await message.reply_text("Use this command in the group you want to protect.")
            return False
        user = message.from_user
        if message.sender_chat is not None and message.sender_chat.id == chat.id:
            return True  # an anonymous admin
        member = await context.bot.get_chat_member(chat.id, user.id)
        if member.status not in ADMINS:
            await self.on_message(update, context)  # a member's message like any other
            if update.effective_message is not None:
                await self.reply(message, "Only the group's admins can do that.")
            return False
        return True

    async def on_protect(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if not await self.admin_command(update, context):
            return
        message, chat, bot = update.effective_message, update.effective_chat, context.bot
        assert message is not None and chat is not None
        if not context.args:
            await self.reply(message, "Usage: /protect @channel")
            return
        me = await bot.get_chat_member(chat.id, bot.id)
        if not (
            me.status in ADMINS
            and getattr(me, "can_restrict_members", False)
            and getattr(me, "can_delete_messages", False)
        ):
            await self.reply(
                message, "Make me an admin here who can delete messages and restrict members first."
            )
            return
        target = context.args[0]
        try:
            channel = await bot.get_chat(target if target.startswith("@") else int(target))
            mine = await bot.get_chat_member(channel.id, bot.id)
        except (TelegramError, ValueError):
            await self.reply(
                message, f"I cannot see {html.escape(target)}: add me to it as an admin first."
            )
            return
        if channel.type != ChatType.CHANNEL or mine.status not in ADMINS:
            await self.reply(message, f"Add me to {html.escape(target)} as an admin first.")
            return
        try:
            await self.register_channel(bot, channel.id)
            if await self.client.policy(chat.id) is None:
                await self.client.register_group(
                    chat.id, chat.title or str(chat.id), username=chat.username
                )
            await self.client.link(chat.id, channel.id)
        except gate.ChannelgateError as error:
            await self.reply(message, f"channelgate refused: {html.escape(error.detail)}")
            return
        await self.reply(
            message, f"Protected: members must join {html.escape(target)} to write here."
        )

    async def register_channel(self, bot: Bot, channel_id: int) -> gate.Channel:
        """Tell channelgate the channel's title, link and subscribers, creating an invite
        link when a private channel has none."""
        full = await bot.get_chat(channel_id)
        link = full.invite_link
        if not link and not full.username:
            link = await bot.export_chat_invite_link(channel_id)
        return await self.client.register_channel(
            channel_id,
            full.title or str(channel_id),
            username=full.username,
            invite_link=link,
            subscriber_count=await bot.get_chat_member_count(channel_id),
        )

    async def on_unprotect(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if not await self.admin_command(update, context):
            return
        message, chat = update.effective_message, update.effective_chat
        assert message is not None and chat is not None
        policy = await self.client.policy(chat.id)
        channels = policy.channels if policy else []
        if context.args:
            wanted = context.args[0].lstrip("@").lower()
            channels = [c for c in channels if c.username == wanted or str(c.chat_id) == wanted]
        if not channels:
            await self.reply(message, "No such protection here.")
            return
        for channel in channels:
            with contextlib.suppress(gate.ChannelgateError):
                await self.client.unlink(chat.id, channel.chat_id)
        names = ", ".join(channel_name(c) for c in channels)
        await self.reply(message, f"No longer required: {names}.")

    async def on_status(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if not await self.admin_command(update, context):
            return
        message, chat = update.effective_message, update.effective_chat
        assert message is not None and chat is not None
        policy = await self.client.policy(chat.id)
        if policy is None or not policy.channels:
            await self.reply(message, "Not protected. Use /protect @channel.")
            return
        stats = await self.client.group_stats(chat.id)
        rate = "—" if stats.pass_rate_24h is None else f"{stats.pass_rate_24h:.0%}"
        names = ", ".join(channel_name(c) for c in policy.channels)
        state = "on" if policy.active else "paused"
        await self.reply(
            message,
            f"Protection {state}: {policy.mode} of {names}; action {policy.action}.\n"
            f"Last 24 h: {stats.checks_24h} checks, {rate} passed.\n"
            f"Verified members: {stats.verified_members}, "
            f"restricted: {stats.restricted_members}.",
        )

    async def on_settings(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if not await self.admin_command(update, context):
            return
        message, chat = update.effective_message, update.effective_chat
        assert message is not None and chat is not None
        policy = await self.client.policy(chat.id)
        if policy is None:
            await self.reply(message, "Not protected. Use /protect @channel.")
            return
        mute = f"{policy.mute_seconds} s" if policy.mute_seconds else "until verified"
        await self.reply(
            message,
            f"mode: {policy.mode}\naction: {policy.action} (mute {mute})\n"
            f"check on join: {'yes' if policy.check_on_join else 'no'}\n"
            f"when Telegram fails: {policy.on_error}\nrecheck after: "
            f"{policy.recheck_seconds} s\nwarning kept: {policy.warning_ttl_seconds} s\n"
            f"exempt users: {len(policy.exempt_user_ids)}\n"
            "Change them on the channelgate dashboard.",
        )

    # ------------------------------------------------------------ counts

    async def refresh_counts(self, bot: Bot) -> None:
        """Member and subscriber counts of the groups this process has seen, through the
        registration endpoints."""
        for chat_id in list(self.seen_groups):
            try:
                chat = await bot.get_chat(chat_id)
                count = await bot.get_chat_member_count(chat_id)
                policy = await self.client.register_group(
                    chat_id,
                    chat.title or str(chat_id),
                    username=chat.username,
                    member_count=count,
                )
                for channel in policy.channels:
                    await self.register_channel(bot, channel.chat_id)
            except Forbidden:
                self.seen_groups.pop(chat_id, None)  # the bot is no longer there
            except (TelegramError, gate.ChannelgateError) as error:
                log.warning("count refresh of %s failed: %s", chat_id, error)

    async def refresh_forever(self, bot: Bot) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_seconds)
            await self.refresh_counts(bot)


# ---------------------------------------------------------------- the application


def build(
    settings: BotSettings, *, request: BaseRequest | None = None, **client_options: Any
) -> tuple[Application, Enforcer]:
    """The python-telegram-bot Application with channelgate's handlers. `request` replaces
    the HTTP transport to Telegram (the tests' fake Bot API); `client_options` go to the
    channelgate client (a `transport`, freshness windows)."""
    client = gate.Client(
        settings.url, settings.key, spool_path=settings.state_path, **client_options
    )
    mutes = Mutes(settings.state_path)
    enforcer = Enforcer(client, mutes, settings)

    async def started(app: Application) -> None:
        await client.start()
        refresher = asyncio.get_running_loop().create_task(enforcer.refresh_forever(app.bot))
        enforcer.tasks.add(refresher)

    async def stopped(_: Application) -> None:
        for task in list(enforcer.tasks):
            task.cancel()
        await asyncio.gather(*enforcer.tasks, return_exceptions=True)
        await client.close()
        mutes.close()

    builder = (
        ApplicationBuilder()
        .token(settings.token)
        .base_url(f"{settings.telegram_api_url}/bot")
        .base_file_url(f"{settings.telegram_api_url}/file/bot")
        .rate_limiter(FloodLimits(max_retries=settings.flood_retries))
        .concurrent_updates(64)  # a slow getChatMember in one group does not hold up others
        .post_init(started)
        .post_shutdown(stopped)
    )
    if request is not None:
        builder = builder.request(request).get_updates_request(request)
    app = builder.build()
    groups = filters.ChatType.GROUPS
    app.add_handler(CommandHandler("protect", enforcer.on_protect, filters=groups))
    app.add_handler(CommandHandler("unprotect", enforcer.on_unprotect, filters=groups))
    app.add_handler(CommandHandler("status", enforcer.on_status, filters=groups))
    app.add_handler(CommandHandler("settings", enforcer.on_settings, filters=groups))
    app.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, enforcer.on_migrate))
    app.add_handler(MessageHandler(groups & ~filters.StatusUpdate.ALL, enforcer.on_message))
    app.add_handler(ChatMemberHandler(enforcer.on_member, ChatMemberHandler.CHAT_MEMBER))
    app.add_handler(ChatMemberHandler(enforcer.on_my_member, ChatMemberHandler.MY_CHAT_MEMBER))
    app.add_handler(CallbackQueryHandler(enforcer.on_button, pattern=f"^{BUTTON}[0-9]+$"))
    app.add_error_handler(on_error)
    return app, enforcer


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    log.error("handling %s failed", type(update).__name__, exc_info=context.error)


def run(settings: BotSettings) -> None:
    """`channelgate bot`: long polling until SIGINT or SIGTERM."""
    app, _ = build(settings)
    app.run_polling(allowed_updates=Update.ALL_TYPES, drop_pending_updates=False)
