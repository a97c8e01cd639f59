"""Fixtures: every SQL-touching test runs on SQLite and on a real PostgreSQL.

The session starts one throwaway PostgreSQL cluster (tests/pg_cluster.py) and removes it at the
end; a test gets a fresh database cloned from a migrated template (PostgreSQL) or a copy of a
migrated file (SQLite). If PostgreSQL cannot start, the session fails: it never skips.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from broker.core.settings import Settings
from broker.db import schema
from broker.db.engine import create_engine
from tests import softhsm
from tests.harness import BrokerUnderTest, Clock, running_broker
from tests.pg_cluster import throwaway_cluster

TEMPLATE_DB = "kb_template"


def _migrate(url: str) -> None:
    async def run() -> None:
        engine = create_engine(url)
        try:
            await schema.upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The admin URL of the session's throwaway cluster, with a migrated template database."""
    with throwaway_cluster() as url:

        async def make_template() -> None:
            conn = await asyncpg.connect(_dsn(url))
            try:
                await conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
            finally:
                await conn.close()

        asyncio.run(make_template())
        _migrate(url.rsplit("/", 1)[0] + f"/{TEMPLATE_DB}")
        yield url


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's SoftHSM2 token (SoftHSM sees only tokens initialised before the PKCS#11
    library loads, so there is one, made first); returns its label. The only place that sets
    SoftHSM up."""
    softhsm.softhsm_conf(tmp_path_factory.mktemp("softhsm"))
    softhsm.init_token(softhsm.TOKEN, softhsm.SO_PIN, softhsm.PIN)
    return softhsm.TOKEN


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "keybroker.db"
    _migrate(f"sqlite+aiosqlite:///{path}")
    return path


async def fresh_postgres(admin_url: str, *, migrated: bool = True) -> str:
    """A new empty (or migrated) database in the session cluster; returns its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_dsn(admin_url))
    try:
        template = f' TEMPLATE "{TEMPLATE_DB}"' if migrated else ""
        await conn.execute(f'CREATE DATABASE "{name}"{template}')
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest_asyncio.fixture
async def database_url(
    db_kind: str, postgres_url: str, tmp_path: Path, sqlite_template: Path
) -> str:
    """A migrated, empty database of the parametrized kind."""
    if db_kind == "sqlite":
        path = tmp_path / "data" / "keybroker.db"
        path.parent.mkdir(mode=0o700)
        shutil.copy(sqlite_template, path)
        return f"sqlite+aiosqlite:///{path}"
    return await fresh_postgres(postgres_url)


def make_settings(data_dir: Path, database_url: str, **overrides: object) -> Settings:
    """Settings for a test broker: port 0, zero pending windows allowed, no background janitor."""
    values: dict[str, object] = {
        "data_dir": data_dir,
        "listen": "127.0.0.1:0",
        "database_url": database_url,
        "min_pending_window": timedelta(0),
        "janitor_interval": timedelta(hours=1),
        "shutdown_grace": timedelta(seconds=2),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path / "data", database_url)


@pytest_asyncio.fixture
async def broker(settings: Settings) -> AsyncIterator[BrokerUnderTest]:
    async with running_broker(settings, Clock()) as b:
        yield b
