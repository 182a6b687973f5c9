"""A network between the client library and a real channelgate app that tests can break:
refuse connections, answer 429/503 instead of the app, or lose the app's answer after the
app has acted on the request (the retry then carries events the server already stored)."""

from collections import Counter
from collections.abc import Callable

import httpx


class Network(httpx.AsyncBaseTransport):
    def __init__(self, app: object) -> None:
        self.app = httpx.ASGITransport(app=app)  # pyrefly: ignore[bad-argument-type]
        self.down = False  # connections refused
        self.status: int | None = None  # answered instead of the app (429, 503)
        self.retry_after = "1"
        self.lose_answers = 0  # answers to event batches that never reach the client
        self.calls: Counter[str] = Counter()  # "METHOD path" -> requests that reached the app
        self.sent_at: list[float] = []  # when each POST of events was attempted
        self.clock: Callable[[], float] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        events = request.url.path.endswith("/verifications")
        if events and self.clock is not None:
            self.sent_at.append(self.clock())
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.status is not None:
            return httpx.Response(
                self.status,
                headers={
                    "Retry-After": self.retry_after,
                    "Content-Type": "application/problem+json",
                },
                json={"title": "Unavailable", "status": self.status, "detail": "test"},
                request=request,
            )
        response = await self.app.handle_async_request(request)
        self.calls[f"{request.method} {request.url.path}"] += 1
        if events and self.lose_answers:
            self.lose_answers -= 1
            await response.aread()
            raise httpx.ReadError("connection reset by peer", request=request)
        return response
