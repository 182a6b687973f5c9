"""Inputs exactly as strict as the OpenAPI document says: RFC 3339 times with an offset in
the years 1970 … 9999 (in UTC), on every route that takes one; JSON values never coerced;
405 with the path's methods in Allow; a body that is not UTF-8 is malformed JSON."""

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import Harness, names_field, problem
from tests.factories import GROUP_ID, VERIFICATIONS, create_group, event

pytestmark = pytest.mark.anyio

# Every route that takes a time, and where.
QUERY_TIMES = [
    ("/api/v1/verifications", "since"),
    ("/api/v1/verifications", "until"),
    ("/api/v1/verifications/export", "since"),
    ("/api/v1/audit", "until"),
    ("/api/v1/analytics/summary", "since"),
    ("/api/v1/analytics/timeseries", "until"),
    ("/api/v1/analytics/top-groups", "since"),
    ("/api/v1/analytics/channels", "until"),
]
NOT_TIMES = {
    "number": "0.5",
    "unix time": "1764000000",
    "date only": "2026-11-26",
    "naive": "2026-11-26T10:00:00",
    "no seconds": "2026-11-26T10:00Z",
    "space for T": "2026-11-26 10:00:00Z",
    "offset without colon": "2026-11-26T10:00:00+0500",
    "30 February": "2026-02-30T10:00:00Z",
    "7 decimals": "2026-11-26T10:00:00.1234567Z",
    "year 1 at +05:00": "0001-01-01T00:00:00+05:00",
    "before 1970 in UTC": "1970-01-01T00:30:00+01:00",
    "after 9999 in UTC": "9999-12-31T23:30:00-01:00",
}


async def test_query_times_that_are_not_rfc3339_in_range_are_422(
    harness: Harness, owner, subtests
) -> None:
    for path, name in QUERY_TIMES:
        for label, value in NOT_TIMES.items():
            with subtests.test(msg=f"{path} {name}={label}"):
                response = await harness.client.get(path, params={name: value}, headers=owner)
                assert names_field(problem(response, 422), "query", name)


async def test_query_times_at_the_edges_are_taken(harness: Harness, owner, subtests) -> None:
    edges = {
        "first instant": "1970-01-01T00:00:00Z",
        "negative offset on the first day": "1970-01-01T00:30:00-01:00",
        "the last hour": "9999-12-31T23:00:00Z",
        "positive offset on the last day": "9999-12-31T23:30:00+01:00",
        "microseconds and a half-hour offset": "2026-11-26T10:00:00.123456+05:30",
    }
    for path, name in QUERY_TIMES:
        for label, value in edges.items():
            with subtests.test(msg=f"{path} {name}={label}"):
                response = await harness.client.get(path, params={name: value}, headers=owner)
                if value.startswith("9999") and name == "since" and "analytics" in path:
                    # since after the default until (the end of this hour): an empty window
                    assert "must be before until" in problem(response, 422)["detail"]
                else:
                    assert response.status_code == 200, response.text


async def test_windows_at_the_end_of_time_do_not_overflow(harness: Harness, owner) -> None:
    late = {"since": "9999-12-31T01:00:00Z", "until": "9999-12-31T23:00:00Z"}
    for path in ("summary", "top-groups", "channels", "timeseries"):
        response = await harness.client.get(f"/api/v1/analytics/{path}", params=late, headers=owner)
        assert response.status_code == 200, response.text
    days = {"bucket": "day", "since": "9999-12-01T00:00:00Z", "until": "9999-12-31T23:59:59Z"}
    response = await harness.client.get("/api/v1/analytics/timeseries", params=days, headers=owner)
    assert response.status_code == 200, response.text
    assert len(response.json()["points"]) == 30


async def test_event_times_that_are_not_rfc3339_in_range_reject_the_batch(
    harness: Harness, bot, owner, subtests
) -> None:
    for label, value in [*NOT_TIMES.items(), ("a JSON number", 0)]:
        with subtests.test(msg=label):
            batch = [event(user_id=1), event(user_id=2, occurred_at=value)]
            response = await harness.client.post(VERIFICATIONS, json={"events": batch}, headers=bot)
            assert names_field(problem(response, 422), "body", "events", 1, "occurred_at")
    log = await harness.client.get("/api/v1/verifications", headers=owner)
    assert log.json()["items"] == []  # nothing of any refused batch was stored


async def test_heartbeat_start_time_is_strict_too(harness: Harness, bot) -> None:
    beat: dict[str, object] = {"instance_id": "i-1", "version": "1", "started_at": 0}
    problem(await harness.client.post("/api/v1/bot/heartbeat", json=beat, headers=bot), 422)
    beat["started_at"] = datetime.now(UTC).isoformat()
    response = await harness.client.post("/api/v1/bot/heartbeat", json=beat, headers=bot)
    assert response.status_code == 204


async def test_json_values_are_never_coerced(harness: Harness, editor, bot, subtests) -> None:
    await create_group(harness.client, editor)
    patches = {
        "string for an integer": {"recheck_seconds": "600"},
        "true for an integer": {"warning_ttl_seconds": True},
        "0 for a boolean": {"check_on_join": 0},
        "string for a boolean": {"is_active": "false"},
        "number for a string": {"title": 5},
        "5.5 for an integer": {"mute_seconds": 45.5},
    }
    for label, body in patches.items():
        with subtests.test(msg=label):
            response = await harness.client.patch(
                f"/api/v1/groups/{GROUP_ID}", json=body, headers=editor
            )
            assert names_field(problem(response, 422), "body", *body)
    # JSON Schema's integer includes 5.0: taken, stored as 5.
    response = await harness.client.patch(
        f"/api/v1/groups/{GROUP_ID}", json={"recheck_seconds": 900.0}, headers=editor
    )
    assert response.status_code == 200 and response.json()["recheck_seconds"] == 900
    batch = [event(user_id=7, latency_ms=True)]
    response = await harness.client.post(VERIFICATIONS, json={"events": batch}, headers=bot)
    assert names_field(problem(response, 422), "body", "events", 0, "latency_ms")
    batch = [{**event(user_id=7, latency_ms=12.0), "chat_id": float(GROUP_ID)}]
    response = await harness.client.post(VERIFICATIONS, json={"events": batch}, headers=bot)
    assert response.status_code == 200, response.text


async def test_warning_text_braces_only_as_placeholders(harness: Harness, editor, subtests) -> None:
    await create_group(harness.client, editor)
    for text in ("a lone { here", "a lone } here", "{nope}", "{{user}}", "{User}"):
        with subtests.test(msg=text):
            response = await harness.client.patch(
                f"/api/v1/groups/{GROUP_ID}", json={"warning_text": text}, headers=editor
            )
            assert names_field(problem(response, 422), "body", "warning_text")
    text = "{user}: join {channels} to talk in {group}"
    response = await harness.client.patch(
        f"/api/v1/groups/{GROUP_ID}", json={"warning_text": text}, headers=editor
    )
    assert response.status_code == 200 and response.json()["warning_text"] == text


async def test_405_lists_every_method_of_the_path(harness: Harness, owner) -> None:
    cases = {
        ("POST", f"/api/v1/groups/{GROUP_ID}"): "DELETE, GET, PATCH",
        ("DELETE", "/api/v1/groups"): "GET, POST",
        ("POST", f"/api/v1/bot/groups/{GROUP_ID}/policy"): "GET",
        ("PATCH", "/healthz"): "GET",
    }
    for (method, path), allowed in cases.items():
        response = await harness.client.request(method, path, headers=owner)
        problem(response, 405)
        assert response.headers["allow"] == allowed, (method, path)


async def test_a_body_that_is_not_utf8_is_malformed(harness: Harness, editor) -> None:
    for body in (b"\xff", b"\xff\xfe"):
        response = await harness.client.post(
            "/api/v1/groups", content=body, headers={**editor, "Content-Type": "application/json"}
        )
        assert problem(response, 400)["type"] == "https://channelgate.dev/problems/malformed"


async def test_lists_of_times_in_the_log_still_filter(harness: Harness, bot, owner) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    batch = [event(user_id=1, at=now - timedelta(hours=2)), event(user_id=2, at=now)]
    assert (
        await harness.client.post(VERIFICATIONS, json={"events": batch}, headers=bot)
    ).is_success
    since = (now - timedelta(hours=1)).isoformat()  # +00:00, as good as Z
    page = await harness.client.get("/api/v1/verifications", params={"since": since}, headers=owner)
    assert [v["user_id"] for v in page.json()["items"]] == [2]
