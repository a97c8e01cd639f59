"""Schema version control: servers refuse un-migrated or newer databases; `keybroker migrate`
and `migrate=True` bring an empty one to head; the migration history runs down and up again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import migrations
from broker.api import key_broker_pb2 as pb
from broker.core.errors import ConfigurationError
from broker.core.settings import Settings
from broker.db import schema
from broker.db.engine import create_engine
from tests.conftest import fresh_postgres, make_settings
from tests.harness import refusal, run_keybroker, running_broker, state_digest

TABLES = {"resources", "key_rings", "key_versions", "audit_records"}


@pytest_asyncio.fixture
async def empty_url(db_kind: str, postgres_url: str, tmp_path: Path) -> str:
    """An empty, never migrated database of the parametrized kind."""
    if db_kind == "sqlite":
        path = tmp_path / "empty.db"
        path.touch(mode=0o600)
        return f"sqlite+aiosqlite:///{path}"
    return await fresh_postgres(postgres_url, migrated=False)


@pytest_asyncio.fixture
async def engine_for(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def tables(engine: AsyncEngine) -> set[str]:
    def read(conn: Connection) -> set[str]:
        return set(inspect(conn).get_table_names())

    async with engine.connect() as conn:
        return await conn.run_sync(read)


def alembic_config(conn: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["connection"] = conn
    return cfg


@pytest.mark.asyncio
async def test_an_unmigrated_database_is_refused(empty_url: str, tmp_path: Path) -> None:
    message = await refusal(make_settings(tmp_path / "data", empty_url))
    assert "keybroker migrate" in message
    assert "empty database" in message and schema.head_revision() in message
    assert not (tmp_path / "data" / "master.key").exists()  # refused before touching keys
    engine = create_engine(empty_url)
    try:
        assert await schema.current_revision(engine) is None
        assert not await tables(engine) & TABLES  # nothing was created
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_an_unknown_newer_revision_is_refused(
    database_url: str, engine_for: AsyncEngine, tmp_path: Path
) -> None:
    async with engine_for.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    message = await refusal(make_settings(tmp_path / "data", database_url))
    assert "9999" in message
    assert "does not know" in message and "upgrade keybroker" in message
    assert "keybroker migrate" not in message  # migrating would not help


@pytest.mark.asyncio
async def test_migrate_true_migrates_an_empty_database(empty_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", empty_url)
    async with running_broker(settings, migrate=True) as broker:
        assert await schema.current_revision(broker.engine) == schema.head_revision()
        assert await tables(broker.engine) >= TABLES
        created = await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        assert created.resource.name == "resources/r1"
    # Migrated once, it now starts without migrate=True, with its data.
    async with running_broker(settings) as broker:
        got = await broker.stub.GetResource(pb.GetResourceRequest(name="resources/r1"))
        assert got.resource.state == pb.Resource.ACTIVE


async def run_migrate(data_dir: Path, url: str) -> tuple[int, str, str]:
    return await run_keybroker("migrate", "--data-dir", str(data_dir), "--database-url", url)


@pytest.mark.asyncio
async def test_cli_migrate_an_empty_sqlite_file_then_again(tmp_path: Path) -> None:
    path = tmp_path / "kb.db"
    path.touch(mode=0o600)
    url = f"sqlite+aiosqlite:///{path}"
    head = schema.head_revision()

    code, out, err = await run_migrate(tmp_path / "data", url)
    assert code == 0, err
    assert f"database schema: empty -> {head}" in out
    engine = create_engine(url)
    try:
        assert await schema.current_revision(engine) == head
        assert await tables(engine) >= TABLES
        async with running_broker(make_settings(tmp_path / "data", url)) as broker:
            await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        before = await state_digest(engine)

        code, out, err = await run_migrate(tmp_path / "data", url)
        assert code == 0, err
        assert f"database schema: {head} -> {head}" in out
        assert await schema.current_revision(engine) == head
        assert await state_digest(engine) == before  # a no-op: the data is untouched
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_downgrade_to_base_and_upgrade_again(
    engine_for: AsyncEngine, settings: Settings
) -> None:
    head = schema.head_revision()
    assert await schema.current_revision(engine_for) == head

    def downgrade(conn: Connection) -> None:
        command.downgrade(alembic_config(conn), "base")

    async with engine_for.begin() as conn:
        await conn.run_sync(downgrade)
    assert await schema.current_revision(engine_for) is None
    assert not await tables(engine_for) & TABLES
    with pytest.raises(ConfigurationError, match="keybroker migrate"):
        await schema.require_current(engine_for)

    def upgrade(conn: Connection) -> None:
        command.upgrade(alembic_config(conn), "head")

    async with engine_for.begin() as conn:
        await conn.run_sync(upgrade)
    assert await schema.current_revision(engine_for) == head
    assert await tables(engine_for) >= TABLES
    await schema.require_current(engine_for)
    async with running_broker(settings) as broker:
        await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        key = await broker.stub.GenerateDataKey(
            pb.GenerateDataKeyRequest(name="resources/r1/models/m")
        )
        assert key.key_id == "resources/r1/resourceKeys/models/versions/1"
