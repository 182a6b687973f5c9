"""A fake Bot API for python-telegram-bot: its request class replaced by one that answers as
the test decides (who is in which channel, which calls fail or hit a flood wait) and records
every call the bot makes. Also builders of the JSON updates Telegram would send."""

import itertools
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from telegram.request import BaseRequest, RequestData

from bot import PERMISSIONS

BOT_ID = 5000000001
TOKEN = f"{BOT_ID}:test-token"
ALL = dict.fromkeys(PERMISSIONS, True)
GROUP_DEFAULTS = {**ALL, "can_change_info": False, "can_pin_messages": False, "can_edit_tag": False}


def user(user_id: int, name: str = "User", is_bot: bool = False) -> dict[str, Any]:
    return {"id": user_id, "is_bot": is_bot, "first_name": f"{name}{user_id}"}


def chat(chat_id: int, kind: str = "supergroup", title: str = "Group", **more: Any) -> dict:
    return {"id": chat_id, "type": kind, "title": title, **more}


def member(user_id: int, status: str = "member", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"status": status, "user": user(user_id), **fields}
    if status == "restricted":
        body = {**{p: False for p in ALL}, "is_member": True, "until_date": 0, **body}
    if status == "administrator":
        body = {
            "can_be_edited": False,
            "is_anonymous": False,
            "can_manage_chat": True,
            "can_delete_messages": True,
            "can_manage_video_chats": True,
            "can_restrict_members": True,
            "can_promote_members": False,
            "can_change_info": True,
            "can_invite_users": True,
            "can_post_stories": False,
            "can_edit_stories": False,
            "can_delete_stories": False,
            **body,
        }
    return body


class TelegramError(Exception):
    def __init__(self, code: int, description: str, retry_after: int | None = None) -> None:
        self.payload: dict[str, Any] = {
            "ok": False,
            "error_code": code,
            "description": description,
        }
        if retry_after is not None:
            self.payload["parameters"] = {"retry_after": retry_after}


class FakeTelegram(BaseRequest):
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], float]] = []
        self.urls: list[str] = []
        self.members: dict[tuple[int, int], dict[str, Any]] = {}
        self.chats: dict[int, dict[str, Any]] = {}
        self.admins: dict[int, list[int]] = {}
        self.failures: dict[str, list[TelegramError]] = {}  # method -> errors answered first
        self.message_ids = itertools.count(9000)

    # ------------------------------------------------------------ what tests set up

    def join(self, chat_id: int, user_id: int, status: str = "member", **fields: Any) -> None:
        self.members[(chat_id, user_id)] = member(user_id, status, **fields)

    def leave(self, chat_id: int, user_id: int) -> None:
        self.members[(chat_id, user_id)] = member(user_id, "left")

    def fail(self, method: str, code: int, description: str, retry_after: int | None = None):
        self.failures.setdefault(method, []).append(TelegramError(code, description, retry_after))

    def of(self, method: str) -> list[dict[str, Any]]:
        return [params for name, params, _ in self.calls if name == method]

    def at(self, method: str) -> list[float]:
        return [when for name, _, when in self.calls if name == method]

    # ------------------------------------------------------------ BaseRequest

    @property
    def read_timeout(self) -> float | None:
        return 5.0

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def do_request(
        self, url: str, method: str, request_data: RequestData | None = None, *_: Any, **__: Any
    ) -> tuple[int, bytes]:
        name = url.rsplit("/", 1)[-1]
        params = dict(request_data.parameters) if request_data else {}
        self.urls.append(url)
        self.calls.append((name, params, time.monotonic()))
        if self.failures.get(name):
            error = self.failures[name].pop(0)
            return error.payload["error_code"], json.dumps(error.payload).encode()
        try:
            result = getattr(self, name)(**params)
        except KeyError:
            error = TelegramError(400, "Bad Request: chat not found")
            return 400, json.dumps(error.payload).encode()
        return 200, json.dumps({"ok": True, "result": result}).encode()

    # ------------------------------------------------------------ the Bot API's methods

    def getMe(self, **_: Any) -> dict[str, Any]:
        return {**user(BOT_ID, "Gate", is_bot=True), "username": "gate_test_bot"}

    def getChatMember(self, chat_id: int, user_id: int, **_: Any) -> dict[str, Any]:
        return self.members.get((int(chat_id), user_id), member(user_id, "left"))

    def getChatAdministrators(self, chat_id: int, **_: Any) -> list[dict[str, Any]]:
        return [member(u, "administrator") for u in self.admins.get(int(chat_id), [])]

    def getChat(self, chat_id: int | str, **_: Any) -> dict[str, Any]:
        if isinstance(chat_id, str) and chat_id.startswith("@"):
            found = [c for c in self.chats.values() if c.get("username") == chat_id[1:]]
            if not found:
                raise KeyError(chat_id)
            body = found[0]
        else:
            body = self.chats.get(int(chat_id), chat(int(chat_id)))
        return {
            "accent_color_id": 0,
            "max_reaction_count": 11,
            "accepted_gift_types": {
                "unlimited_gifts": False,
                "limited_gifts": False,
                "unique_gifts": False,
                "premium_subscription": False,
                "gifts_from_channels": False,
            },
            "permissions": GROUP_DEFAULTS,
            **body,
        }

    def getChatMemberCount(self, **_: Any) -> int:
        return 321

    def sendMessage(self, chat_id: int, text: str, **more: Any) -> dict[str, Any]:
        return {
            "message_id": next(self.message_ids),
            "date": int(time.time()),
            "chat": chat(int(chat_id)),
            "from": user(BOT_ID, "Gate", is_bot=True),
            "text": text,
            **({"reply_markup": more["reply_markup"]} if "reply_markup" in more else {}),
        }

    def restrictChatMember(
        self, chat_id: int, user_id: int, permissions: Any, until_date: int = 0, **_: Any
    ) -> bool:
        granted = json.loads(permissions) if isinstance(permissions, str) else permissions
        defaults = self.getChat(chat_id)["permissions"]
        if all(granted.get(p, False) == v for p, v in defaults.items()):
            self.join(int(chat_id), user_id)
        else:
            self.join(int(chat_id), user_id, "restricted", until_date=until_date, **granted)
        return True

    def deleteMessage(self, **_: Any) -> bool:
        return True

    def banChatMember(self, chat_id: int, user_id: int, **_: Any) -> bool:
        self.members[(int(chat_id), user_id)] = member(user_id, "kicked", until_date=0)
        return True

    def unbanChatMember(self, chat_id: int, user_id: int, **_: Any) -> bool:
        self.leave(int(chat_id), user_id)
        return True

    def answerCallbackQuery(self, **_: Any) -> bool:
        return True

    def exportChatInviteLink(self, chat_id: int, **_: Any) -> str:
        return f"https://t.me/+invite{abs(int(chat_id))}"


# ---------------------------------------------------------------- updates

_ids = itertools.count(1)


def update(**body: Any) -> dict[str, Any]:
    return {"update_id": next(_ids), **body}


def message(chat_id: int, user_id: int, **content: Any) -> dict[str, Any]:
    content = content or {"text": "hello"}
    return {
        "message_id": next(_ids),
        "date": int(time.time()),
        "chat": chat(chat_id),
        "from": user(user_id),
        **content,
    }


def kinds(chat_id: int, user_id: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """One update of every kind of message a member can send."""
    photo = [{"file_id": "p", "file_unique_id": "p", "width": 1, "height": 1}]
    sticker = {
        "file_id": "s",
        "file_unique_id": "s",
        "width": 1,
        "height": 1,
        "is_animated": False,
        "is_video": False,
        "type": "regular",
    }
    forward = {"type": "user", "date": int(time.time()), "sender_user": user(7)}
    yield "text", update(message=message(chat_id, user_id, text="hi"))
    yield "photo", update(message=message(chat_id, user_id, photo=photo, caption="look"))
    yield "sticker", update(message=message(chat_id, user_id, sticker=sticker))
    yield "forward", update(message=message(chat_id, user_id, text="fw", forward_origin=forward))
    yield "edit", update(edited_message={**message(chat_id, user_id), "edit_date": 1})


def member_change(
    chat_id: int,
    user_id: int,
    old: str,
    new: str,
    *,
    by: int | None = None,
    kind: str = "supergroup",
) -> dict[str, Any]:
    return update(
        chat_member={
            "chat": chat(chat_id, kind),
            "from": user(by or user_id),
            "date": int(time.time()),
            "old_chat_member": member(user_id, old),
            "new_chat_member": member(user_id, new),
        }
    )


def button(chat_id: int, presser: int, data: str, warning_id: int) -> dict[str, Any]:
    return update(
        callback_query={
            "id": str(next(_ids)),
            "from": user(presser),
            "chat_instance": "ci",
            "data": data,
            "message": {
                "message_id": warning_id,
                "date": int(time.time()),
                "chat": chat(chat_id),
                "from": user(BOT_ID, "Gate", is_bot=True),
                "text": "warning",
            },
        }
    )


# ---------------------------------------------------------------- over HTTP, for a real process


class BotAPIServer:
    """The fake Bot API behind a real HTTP server, at `<root>/bot<token>/<method>` as the Bot
    API documents, for a `channelgate bot` process; `getUpdates` hands out `pending`."""

    def __init__(self, fake: FakeTelegram) -> None:
        self.fake = fake
        self.pending: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                params = {k: _decoded(v[0]) for k, v in form.items()}
                method = self.path.rsplit("/", 1)[-1]
                if method == "getUpdates":
                    body = server.updates(int(params.get("offset", 0)), params.get("timeout"))
                    status, payload = 200, json.dumps({"ok": True, "result": body}).encode()
                else:
                    status, payload = server.call(self.path, method, params)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def updates(self, offset: int, timeout: Any) -> list[dict[str, Any]]:
        ready = [u for u in self.pending if u["update_id"] >= offset]
        if not ready:
            time.sleep(min(float(timeout or 0), 0.2))
        return ready

    def call(self, path: str, method: str, params: dict[str, Any]) -> tuple[int, bytes]:
        self.fake.urls.append(path)
        self.fake.calls.append((method, params, time.monotonic()))
        handler = getattr(self.fake, method, None)
        if handler is None:  # deleteWebhook, setMyCommands...: accepted
            return 200, b'{"ok": true, "result": true}'
        return 200, json.dumps({"ok": True, "result": handler(**params)}).encode()

    def close(self) -> None:
        self.httpd.shutdown()


def _decoded(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value  # strings are sent as they are
