"""The migration to DataSketches sketches: rebuilt from the raw log where it covers the
bucket, the old registers kept as `legacy` where it does not (SQLite file, alembic)."""

import sqlite3
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
from alembic import command

import analytics
from db import alembic_config

BEFORE = "57739de3087a"
DAY0 = datetime(2026, 3, 10, tzinfo=UTC)  # the oldest event left in the raw log: midnight


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def test_sketches_rebuilt_from_the_log_and_older_ones_kept_as_legacy(tmp_path):
    path = tmp_path / "migrate.db"
    config = alembic_config(f"sqlite+aiosqlite:///{path}")
    command.upgrade(config, BEFORE)
    old_registers = np.zeros(analytics.LEGACY_M, dtype=np.uint8)
    old_registers[np.arange(0, 400, 2)] = 1  # 200 registers: about 201 users
    legacy = analytics.LEGACY_DENSE + old_registers.tobytes()
    events = [  # (chat, user, at)
        (-100, 1, DAY0),
        (-100, 2, DAY0),
        (-200, 3, DAY0 + timedelta(hours=5, minutes=30)),
        (-100, 1, DAY0 + timedelta(days=1, hours=1)),
    ]
    with sqlite3.connect(path) as db:
        for chat, user, at in events:
            db.execute(
                "INSERT INTO verifications (event_id, chat_id, user_id, result, trigger,"
                " missing_channel_ids, cached, latency_ms, occurred_at, received_at)"
                " VALUES (?, ?, ?, 'passed', 'join', '[]', 0, 5, ?, ?)",
                (uuid.uuid4().hex, chat, user, stamp(at), stamp(at)),
            )
        for grain, chat, bucket in [
            ("d", 0, DAY0 - timedelta(days=5)),  # past retention: its events are gone
            ("d", -100, DAY0 - timedelta(days=5)),
            ("h", -100, DAY0),  # covered by the log: rebuilt
            ("d", 0, DAY0),
        ]:
            db.execute(
                "INSERT INTO user_sketches (grain, chat_id, bucket, registers) VALUES (?,?,?,?)",
                (grain, chat, stamp(bucket), legacy),
            )
    command.upgrade(config, "head")
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT grain, chat_id, bucket, sketch, legacy FROM user_sketches"
        ).fetchall()
    got = {
        (g, c, datetime.fromisoformat(b).replace(tzinfo=UTC)): (
            analytics.count_of(analytics.unite([s])),
            lg,
        )
        for g, c, b, s, lg in rows
    }
    old = DAY0 - timedelta(days=5)
    assert got == {
        ("d", 0, old): ((0, False), legacy),
        ("d", -100, old): ((0, False), legacy),
        ("h", -100, DAY0): ((2, False), None),
        ("h", 0, DAY0): ((2, False), None),
        ("h", -200, DAY0 + timedelta(hours=5)): ((1, False), None),
        ("h", 0, DAY0 + timedelta(hours=5)): ((1, False), None),
        ("d", -100, DAY0): ((2, False), None),
        ("d", -200, DAY0): ((1, False), None),
        ("d", 0, DAY0): ((3, False), None),
        ("h", -100, DAY0 + timedelta(days=1, hours=1)): ((1, False), None),
        ("h", 0, DAY0 + timedelta(days=1, hours=1)): ((1, False), None),
        ("d", -100, DAY0 + timedelta(days=1)): ((1, False), None),
        ("d", 0, DAY0 + timedelta(days=1)): ((1, False), None),
    }
    command.downgrade(config, BEFORE)  # back: the legacy registers, the rebuilt ones gone
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT grain, chat_id, registers FROM user_sketches").fetchall()
    assert sorted(rows) == [("d", -100, legacy), ("d", 0, legacy)]


def test_downgrading_the_delta_tables_folds_what_is_left(tmp_path):
    """The older code has no delta tables: downgrading past them adds every unfolded delta
    into its table first (counters add up, sketches unite), so nothing acknowledged is lost."""
    path = tmp_path / "deltas.db"
    config = alembic_config(f"sqlite+aiosqlite:///{path}")
    command.upgrade(config, "126b9b5f3b09")
    hour = stamp(DAY0)
    zeros = ", ".join(["0"] * 16)
    latency = ", ".join(f"lat_{i}" for i in range(16))
    counters = f"grain, chat_id, bucket, checks, passed, blocked, errors, cached, {latency}"
    rollup = f"INSERT INTO rollups ({counters}) VALUES ('h', -100, ?, 5, 5, 0, 0, 1, {zeros})"  # noqa: S608
    delta = f"INSERT INTO rollup_deltas ({counters}) VALUES ('h', -100, ?, ?, ?, 0, 0, 0, {zeros})"  # noqa: S608
    sketch = (
        "INSERT INTO user_sketch_deltas (grain, chat_id, bucket, sketch) VALUES ('h', -100, ?, ?)"
    )
    with sqlite3.connect(path) as db:
        db.execute(rollup, (hour,))
        for checks in (2, 3):
            db.execute(delta, (hour, checks, checks))
        db.execute(
            "INSERT INTO member_count_deltas (chat_id, verified, restricted) VALUES (-100, 2, 1)"
        )
        db.execute(
            "INSERT INTO member_count_deltas (chat_id, verified, restricted) VALUES (-100, 1, -1)"
        )
        db.execute(
            "INSERT INTO channel_rollup_deltas (grain, chat_id, channel_id, bucket, blocks)"
            " VALUES ('h', -100, -1002, ?, 4)",
            (hour,),
        )
        db.execute(
            "INSERT INTO user_sketches (grain, chat_id, bucket, sketch) VALUES ('h', -100, ?, ?)",
            (hour, analytics.add_users(None, [1, 2, 3])),
        )
        for users in ([3, 4], [5]):
            db.execute(sketch, (hour, analytics.add_users(None, users)))
    command.downgrade(config, "9c1f2e7a4b10")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT checks, passed, cached FROM rollups").fetchall() == [(10, 10, 1)]
        assert db.execute("SELECT verified, restricted FROM member_counts").fetchall() == [(3, 0)]
        assert db.execute("SELECT blocks FROM channel_rollups").fetchall() == [(4,)]
        (sketch,) = db.execute("SELECT sketch FROM user_sketches").fetchone()
        assert analytics.count_of(analytics.sketch_of(sketch)) == (5, False)
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        assert not {t for t in tables if t.endswith("_deltas")}
