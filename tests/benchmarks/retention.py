"""Retention benchmark (issue 5, case e): sweeping N expired analyze results (100k; smoke 2k) with
the real retention sweeper vs a plain SQL delete of the same rows plus unlinks of the same files.

Both cases get fresh data of the same shape, in a fresh data directory on the same file system
and a fresh database: N succeeded analyze operations over 10 resources, each with a
wrapped data key in its row and a 1 KiB blob file where workers.fs_blobs keeps it
(`<data>/blobs/<resource>/<32 hex>`), inserted in bulk with Core executemany and plain file
writes, then synced to disk before timing.

- sweeper: the broker and workers as `keybroker up` assembles them (`serve(with_storage=True)`,
  audit on, a real gRPC server on loopback), the clock moved past the expiry, then one
  `workers.retention.sweep` call, timed until every row and blob is gone;
- plain: SELECT the blob keys, one DELETE of the expired rows, and os.unlink of every file,
  without fsync.

Target: the sweeper removes >= 0.3x the plain rows/s.

With --postgres, both cases run again on a throwaway PostgreSQL cluster (tests.pg_cluster,
fsync off, as in the test suite), each in a fresh database.

Run: python -m tests.benchmarks.retention [--smoke] [--rows N] [--postgres] [--json PATH]
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
from sqlalchemy import Table, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.api import key_broker_pb2 as pb
from broker.core.settings import Settings
from broker.db import schema
from broker.db.engine import create_engine
from tests.benchmarks.common import environment, now_utc, parser, write_report
from tests.harness import Clock, running_broker
from tests.pg_cluster import throwaway_cluster
from workers.retention import sweep
from workers.tables import AnalyzeOperationRow, JobRow

TARGET_RATIO = 0.3
RESOURCES = 10
BLOB_BYTES = 1024
INSERT_CHUNK = 5000
TABLE = cast(Table, AnalyzeOperationRow.__table__)


@dataclass
class Figures:
    case: str
    rows: int
    seconds: float
    rows_per_s: float


async def _database(data: Path, pg_admin: str | None) -> str:
    """A fresh, empty database: SQLite in `data`, or a new one in the PostgreSQL cluster."""
    if pg_admin is None:
        return f"sqlite+aiosqlite:///{data / 'keybroker.db'}"
    name = f"bench_{os.urandom(6).hex()}"
    conn = await asyncpg.connect(pg_admin.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return pg_admin.rsplit("/", 1)[0] + f"/{name}"


def _settings(data: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=data,
        listen="127.0.0.1:0",
        database_url=database_url,
        log_level="WARNING",
        # The background sweeper runs once at start-up (before the data is expired) and then
        # not again during the measurement; the one measured sweep is called directly.
        sweep_interval=timedelta(hours=1),
    )


async def _fill(engine: AsyncEngine, blob_dir: Path, n: int, completed: datetime) -> None:
    """N succeeded operations that expire 24 h after `completed`, with their blob files."""
    expire = completed + timedelta(hours=24)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        resource = f"r{i % RESOURCES}"
        blob_key = f"{resource}/{os.urandom(16).hex()}"
        rows.append(
            {
                "name": f"resources/{resource}/analyzeResults/a{i:07d}",
                "resource_id": resource,
                "model": f"resources/{resource}/models/m1",
                "status": "succeeded",
                "create_time": completed,
                "last_update_time": completed,
                "complete_time": completed,
                "expire_time": expire,
                "error_message": "",
                "blob_key": blob_key,
                # The shape of a real one (broker.keys.data_key_format: 65 bytes), never opened.
                "wrapped_data_key": b"\x01\x00\x00\x00\x01" + os.urandom(60),
                "key_id": f"resources/{resource}/resourceKeys/results/versions/1",
                "result_size_bytes": BLOB_BYTES - 56,
                "deleted": False,
            }
        )
    async with engine.begin() as conn:
        for start in range(0, n, INSERT_CHUNK):
            await conn.execute(insert(TABLE), rows[start : start + INSERT_CHUNK])
    await asyncio.to_thread(_write_blobs, blob_dir, [r["blob_key"] for r in rows])


def _write_blobs(blob_dir: Path, keys: list[str]) -> None:
    for r in range(RESOURCES):
        (blob_dir / f"r{r}").mkdir(mode=0o700, parents=True, exist_ok=True)
    payload = os.urandom(BLOB_BYTES)
    for key in keys:
        fd = os.open(blob_dir / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
    os.sync()  # the writes' own flushing stays out of the timed part


def _unlink_all(blob_dir: Path, keys: list[str]) -> None:
    for key in keys:
        os.unlink(blob_dir / key)


def _files(blob_dir: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(blob_dir))


async def _rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        count: int = (await conn.execute(select(func.count()).select_from(TABLE))).scalar_one()
        return count


async def plain(n: int, pg_admin: str | None) -> Figures:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir(mode=0o700)
        settings = _settings(data, await _database(data, pg_admin))
        engine = create_engine(settings.database)
        try:
            await schema.upgrade(engine)
            completed = datetime.now(UTC) - timedelta(days=2)
            await _fill(engine, settings.blob_dir, n, completed)
            now = datetime.now(UTC)
            started = time.perf_counter()
            async with engine.begin() as conn:
                keys = list(
                    await conn.scalars(select(TABLE.c.blob_key).where(TABLE.c.expire_time <= now))
                )
                await conn.execute(delete(TABLE).where(TABLE.c.expire_time <= now))
            blob_dir = settings.blob_dir
            await asyncio.to_thread(_unlink_all, blob_dir, keys)
            elapsed = time.perf_counter() - started
            assert len(keys) == n and await _rows(engine) == 0 and _files(blob_dir) == 0
        finally:
            await engine.dispose()
    return Figures(f"plain DELETE + unlink ({_kind(pg_admin)})", n, elapsed, n / elapsed)


async def sweeper(n: int, pg_admin: str | None) -> tuple[Figures, dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir(mode=0o700)
        settings = _settings(data, await _database(data, pg_admin))
        clock = Clock()
        async with running_broker(settings, clock, migrate=True, with_storage=True) as kb:
            for r in range(RESOURCES):
                await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id=f"r{r}"))
            await asyncio.sleep(0.5)  # the start-up sweep is over
            await _fill(kb.engine, settings.blob_dir, n, clock.now())
            clock.advance(timedelta(hours=24, seconds=1))
            storage = kb.workers
            started = time.perf_counter()
            counts = await sweep(
                storage.objects, storage.objects.blobs, storage.context.sessions, storage.audit
            )
            elapsed = time.perf_counter() - started
            left_rows, left_files = await _rows(kb.engine), _files(settings.blob_dir)
            async with kb.engine.connect() as conn:
                jobs = (
                    await conn.execute(
                        select(func.count())
                        .select_from(JobRow)
                        .where(JobRow.state.in_(("pending", "running")))
                    )
                ).scalar_one()
        assert counts.shredded == n and counts.removed == n, counts
        assert left_rows == 0 and left_files == 0 and jobs == 0, (left_rows, left_files, jobs)
    return (
        Figures(f"retention sweep ({_kind(pg_admin)})", n, elapsed, n / elapsed),
        {"shredded": counts.shredded, "removed": counts.removed, "jobs_left": jobs},
    )


def _kind(pg_admin: str | None) -> str:
    return "sqlite" if pg_admin is None else "postgresql"


async def run(n: int, pg_admin: str | None = None) -> dict[str, Any]:
    """Both cases on SQLite, and on PostgreSQL too when given its cluster's admin URL."""
    figures: list[Figures] = []
    counts: dict[str, dict[str, int]] = {}
    ratios: dict[str, float] = {}
    for admin in (None, pg_admin) if pg_admin else (None,):
        base = await plain(n, admin)
        swept, counted = await sweeper(n, admin)
        figures += [base, swept]
        counts[_kind(admin)] = counted
        ratios[f"sweep rows/s vs plain delete rows/s ({_kind(admin)})"] = (
            swept.rows_per_s / base.rows_per_s
        )
    return {
        "benchmark": "retention",
        "date": now_utc(),
        "environment": environment(),
        "figures": [asdict(f) for f in figures],
        "sweep_counts": counts,
        "ratios": ratios,
        "target": f">= {TARGET_RATIO}x the plain delete rate",
        "met": all(r >= TARGET_RATIO for r in ratios.values()),
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"{'case':<38}{'rows':>9}{'seconds':>9}{'rows/s':>9}")
    for r in report["figures"]:
        print(f"{r['case']:<38}{r['rows']:>9}{r['seconds']:>9.2f}{r['rows_per_s']:>9.0f}")
    print()
    for name, value in report["ratios"].items():
        print(f"{name:<56}{value:>8.2f}")
    print(f"target {report['target']}: {'met' if report['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=100_000, help="N (default 100000)")
    p.add_argument(
        "--postgres", action="store_true", help="also on a throwaway PostgreSQL cluster (~2 s)"
    )
    args = p.parse_args(argv)
    n = 2000 if args.smoke else args.rows
    if args.postgres:
        with throwaway_cluster() as admin:
            report = asyncio.run(run(n, admin))
    else:
        report = asyncio.run(run(n))
    print_table(report)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
