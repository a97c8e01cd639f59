"""The SQLite audit sink: a group goes in as multi-row INSERTs of several sizes; every row must
land once, in order, with its values unchanged (the HMAC chain depends on the order)."""

from __future__ import annotations

import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from broker.audit.sinks import COLUMNS, AuditTuple, open_sink


def _rows(count: int) -> list[AuditTuple]:
    start = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    return [
        (
            start + timedelta(microseconds=i),
            "host:1:ab:g",
            f"req-{i}",
            "ipv4:127.0.0.1:1",
            None if i % 2 else "end-caller",
            "DecryptDataKey",
            f"resources/r{i % 7}",
            1,
            0,
            "resources/r/resourceKeys/models/versions/1",
            "OK",
            None,
            i + 1,
            bytes([i % 256]) * 32,
            "auditKeys/k",
        )
        for i in range(count)
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("count", [1, 5, 77, 333])
async def test_a_group_lands_whole_and_in_order(
    sqlite_template: Path, tmp_path: Path, count: int
) -> None:
    db = tmp_path / "keybroker.db"
    shutil.copy(sqlite_template, db)
    sink = open_sink(make_url(f"sqlite+aiosqlite:///{db}"))
    rows = _rows(count)
    try:
        await sink.write(rows[: count // 2])
        await sink.write(rows[count // 2 :])
    finally:
        await sink.close()
    with sqlite3.connect(db) as conn:
        stored = conn.execute(
            f"SELECT {', '.join(COLUMNS)} FROM audit_records ORDER BY id"
        ).fetchall()
    expected = [(r[0].strftime("%Y-%m-%d %H:%M:%S.%f"), *r[1:]) for r in rows]
    assert stored == expected
