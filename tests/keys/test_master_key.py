"""The master key file: creation, refusal of unsafe or foreign files, restarts, and rotation
(offline, interrupted, and through the CLI)."""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.api import key_broker_pb2 as pb
from broker.audit.log import AuditLog
from broker.core.audit_event import AuditEvent
from broker.core.settings import Settings
from broker.db.engine import create_engine, session_factory
from broker.keys import master_key
from broker.lifecycle.master_key_rotation import rotate_master_key
from tests.harness import BrokerUnderTest, audit_rows, refusal, run_keybroker, running_broker

Keys = list[tuple[str, bytes, bytes]]  # (object name, wrapped, plaintext)


async def populate(broker: BrokerUnderTest, resource_ids: Sequence[str] = ("r1", "r2")) -> Keys:
    """Creates resources and a data key per purpose in each; returns the keys."""
    keys: Keys = []
    for rid in resource_ids:
        await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id=rid))
        for name in (f"resources/{rid}/models/m", f"resources/{rid}/analyzeResults/a"):
            key = await broker.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name=name))
            keys.append((name, key.wrapped_data_key, key.plaintext_data_key))
    return keys


async def assert_decrypt(broker: BrokerUnderTest, keys: Keys) -> None:
    for name, wrapped, plaintext in keys:
        reply = await broker.stub.DecryptDataKey(
            pb.DecryptDataKeyRequest(name=name, wrapped_data_key=wrapped)
        )
        assert reply.plaintext_data_key == plaintext


async def first_run(settings: Settings) -> tuple[str, Keys]:
    """Runs a broker once to create the key file and some keys; returns (master key id, keys)."""
    async with running_broker(settings) as broker:
        keys = await populate(broker)
        return broker.running.broker.master.key_id, keys


async def status_key_id(broker: BrokerUnderTest) -> str:
    return (await broker.stub.GetStatus(pb.GetStatusRequest())).master_key_id


def file_key_id(path: Path) -> str:
    return master_key.load(path).key_id


async def rows(engine: AsyncEngine, query: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in (await conn.execute(text(query))).all()]


async def rotate_offline(settings: Settings) -> tuple[str, str, int]:
    engine = create_engine(settings.database)
    try:
        return await rotate_master_key(
            settings,
            session_factory(engine),
            AuditLog(engine),
            lambda: AuditEvent("RotateMasterKey", "local:test", "req-rotate"),
        )
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_key_file_is_created_0600_on_first_start(settings: Settings) -> None:
    path = settings.master_key_file
    assert not path.exists()
    async with running_broker(settings) as broker:
        assert path.exists()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(settings.data_dir.stat().st_mode) & 0o077 == 0
        assert path.stat().st_size == master_key.FILE_SIZE
        assert file_key_id(path) == broker.running.broker.master.key_id
        assert await status_key_id(broker) == file_key_id(path)


@pytest.mark.asyncio
async def test_group_readable_key_file_is_refused(settings: Settings) -> None:
    await first_run(settings)
    path = settings.master_key_file
    path.chmod(0o640)
    message = await refusal(settings)
    assert str(path) in message
    assert "group or others" in message and "0640" in message
    path.chmod(0o604)
    assert str(path) in await refusal(settings)
    path.chmod(0o600)
    async with running_broker(settings):
        pass


@pytest.mark.asyncio
async def test_missing_key_file_is_refused_when_the_database_holds_keys(
    settings: Settings,
) -> None:
    old_id, _ = await first_run(settings)
    settings.master_key_file.unlink()
    message = await refusal(settings)
    assert str(settings.master_key_file) in message
    assert "missing" in message and old_id in message
    assert not settings.master_key_file.exists()  # no new key was made in its place


@pytest.mark.asyncio
async def test_tampered_key_file_is_refused(settings: Settings) -> None:
    await first_run(settings)
    path = settings.master_key_file
    original = path.read_bytes()
    for offset in (0, 4, 5, 5 + master_key.KEY_ID_SIZE + 3, master_key.FILE_SIZE - 1):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        message = await refusal(settings)
        assert str(path) in message, offset
        assert "damaged" in message or "not a keybroker master key" in message
    path.write_bytes(original[:-1])
    assert "not a keybroker master key" in await refusal(settings)
    path.write_bytes(original)
    async with running_broker(settings):
        pass


@pytest.mark.asyncio
async def test_a_valid_but_different_key_file_is_refused(settings: Settings) -> None:
    old_id, _ = await first_run(settings)
    path = settings.master_key_file
    path.unlink()
    new_id = master_key.write_new(path).key_id
    message = await refusal(settings)
    assert str(path) in message
    assert new_id in message and old_id in message
    assert "not the database's master key file" in message


@pytest.mark.asyncio
async def test_restart_keeps_data_keys_working(settings: Settings) -> None:
    key_id, keys = await first_run(settings)
    async with running_broker(settings) as broker:
        assert await status_key_id(broker) == key_id
        await assert_decrypt(broker, keys)
        keys += await populate(broker, ["r3"])
    async with running_broker(settings) as broker:
        await assert_decrypt(broker, keys)


@pytest.mark.asyncio
async def test_master_key_rotation(settings: Settings) -> None:
    async with running_broker(settings) as broker:
        old_id = broker.running.broker.master.key_id
        keys = await populate(broker, ["r1", "r2", "r3"])
        await broker.stub.RotateResourceKey(
            pb.RotateResourceKeyRequest(name="resources/r2/resourceKeys/models")
        )
        await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="gone"))
        await broker.stub.DeleteResource(
            pb.DeleteResourceRequest(name="resources/gone", pending_window=Duration(seconds=0))
        )
        versions_before = await rows(
            broker.engine, "SELECT * FROM key_versions ORDER BY resource_id, purpose, version"
        )
        roots_before = dict(await rows(broker.engine, "SELECT id, root_key_sealed FROM resources"))

    backup = settings.data_dir.parent / "old-master.key"
    shutil.copy2(settings.master_key_file, backup)
    old, new, count = await rotate_offline(settings)
    assert (old, count) == (old_id, 3)
    assert new != old and re.fullmatch(r"masterKeys/[0-9a-f]{32}", new)
    assert file_key_id(settings.master_key_file) == new
    assert stat.S_IMODE(settings.master_key_file.stat().st_mode) == 0o600
    assert not settings.master_key_file.with_name(master_key.NEXT_FILE_NAME).exists()

    async with running_broker(settings) as broker:
        assert await status_key_id(broker) == new
        await assert_decrypt(broker, keys)
        versions_after = await rows(
            broker.engine, "SELECT * FROM key_versions ORDER BY resource_id, purpose, version"
        )
        assert versions_after == versions_before  # nothing below the root keys re-written
        roots_after = dict(await rows(broker.engine, "SELECT id, root_key_sealed FROM resources"))
        assert roots_after.keys() == roots_before.keys()
        for rid in ("r1", "r2", "r3"):
            assert roots_after[rid] is not None
            assert bytes(roots_after[rid]) != bytes(roots_before[rid])
        assert roots_before["gone"] is None and roots_after["gone"] is None
        assert await rows(
            broker.engine, "SELECT DISTINCT master_key_id FROM resources WHERE id <> 'gone'"
        ) == [(new,)]

        audit = [r for r in await audit_rows(broker.engine) if r["operation"] == "RotateMasterKey"]
        assert len(audit) == 1
        assert audit[0]["outcome"] == "OK"
        assert audit[0]["item_count"] == 3
        assert set(audit[0]["key_ids"].split()) == {old, new}

    # A copy of the old key file no longer opens the database.
    shutil.copy2(backup, settings.master_key_file)
    message = await refusal(settings)
    assert old in message and new in message


@pytest.mark.asyncio
async def test_stale_next_file_is_discarded_at_start(settings: Settings) -> None:
    key_id, keys = await first_run(settings)
    next_path = settings.master_key_file.with_name(master_key.NEXT_FILE_NAME)
    master_key.write_new(next_path)  # a rotation that never committed
    async with running_broker(settings) as broker:
        assert not next_path.exists()
        assert await status_key_id(broker) == key_id
        assert file_key_id(settings.master_key_file) == key_id
        await assert_decrypt(broker, keys)


@pytest.mark.asyncio
async def test_rotation_committed_but_not_renamed_is_completed_at_start(
    settings: Settings, tmp_path: Path
) -> None:
    old_id, keys = await first_run(settings)
    path = settings.master_key_file
    next_path = path.with_name(master_key.NEXT_FILE_NAME)
    backup = tmp_path / "old-master.key"
    shutil.copy2(path, backup)
    _, new_id, _ = await rotate_offline(settings)
    # Undo the rename only: the database is sealed under the new key, which waits in .next.
    os.replace(path, next_path)
    shutil.copy2(backup, path)
    assert file_key_id(path) == old_id and file_key_id(next_path) == new_id

    async with running_broker(settings) as broker:
        assert not next_path.exists()
        assert file_key_id(path) == new_id
        assert await status_key_id(broker) == new_id
        await assert_decrypt(broker, keys)


@pytest.mark.asyncio
@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_cli_master_key_rotate(settings: Settings) -> None:
    old_id, keys = await first_run(settings)
    args = ("--data-dir", str(settings.data_dir), "--database-url", settings.database)
    code, out, err = await run_keybroker("master-key", "rotate", *args)
    assert code == 0, err
    new_id = file_key_id(settings.master_key_file)
    assert new_id != old_id
    assert f"master key rotated: {old_id} -> {new_id}; 2 root keys re-sealed" in out
    async with running_broker(settings) as broker:
        assert await status_key_id(broker) == new_id
        await assert_decrypt(broker, keys)
        audit = [r for r in await audit_rows(broker.engine) if r["operation"] == "RotateMasterKey"]
        assert len(audit) == 1 and audit[0]["caller"].startswith("local:")

    # A damaged key file: the command refuses with exit code 2 and changes nothing.
    settings.master_key_file.chmod(0o644)
    code, out, err = await run_keybroker("master-key", "rotate", *args)
    assert code == 2
    assert str(settings.master_key_file) in err and "group or others" in err
    assert file_key_id_unchecked(settings.master_key_file) == new_id


def file_key_id_unchecked(path: Path) -> str:
    return master_key.decode_file(path.read_bytes(), path).key_id


@pytest.mark.asyncio
@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_cli_rotation_is_refused_while_a_broker_runs_on_the_data_dir(
    settings: Settings,
) -> None:
    # A live broker would keep sealing new root keys under the key that rotation retires.
    async with running_broker(settings) as broker:
        keys = await populate(broker, ["r1"])
        old_id = broker.running.broker.master.key_id
        args = ("--data-dir", str(settings.data_dir), "--database-url", settings.database)
        code, _, err = await run_keybroker("master-key", "rotate", *args)
        assert code == 2
        assert "a keybroker server is running on" in err
        assert file_key_id(settings.master_key_file) == old_id
        await assert_decrypt(broker, keys)


@pytest.mark.asyncio
async def test_torn_next_file_is_discarded_when_the_database_needs_only_the_current_key(
    settings: Settings,
) -> None:
    key_id, keys = await first_run(settings)
    next_path = settings.master_key_file.with_name(master_key.NEXT_FILE_NAME)
    next_path.write_bytes(b"KBMK\x01 torn")  # a crash in the middle of writing the new key
    next_path.chmod(0o600)
    async with running_broker(settings) as broker:
        assert not next_path.exists()
        assert await status_key_id(broker) == key_id
        await assert_decrypt(broker, keys)


@pytest.mark.asyncio
async def test_next_file_is_kept_when_no_file_holds_the_database_key(
    settings: Settings, tmp_path: Path
) -> None:
    await first_run(settings)
    _, new_id, _ = await rotate_offline(settings)
    # The database names the new key; master.key is lost and .next is damaged: refuse, and
    # delete nothing.
    next_path = settings.master_key_file.with_name(master_key.NEXT_FILE_NAME)
    os.replace(settings.master_key_file, next_path)
    damaged = bytearray(next_path.read_bytes())
    damaged[-1] ^= 1
    next_path.write_bytes(bytes(damaged))
    message = await refusal(settings)
    assert "interrupted master key rotation" in message
    assert new_id in message
    assert next_path.exists()
