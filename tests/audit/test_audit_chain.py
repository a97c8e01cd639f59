"""The tamper-evident audit trail, as a threat model: someone with write access to the database
(but not to the master key or the data directory) edits, deletes, inserts, reorders or truncates
audit records; `keybroker audit verify` must report each, and nothing on a clean trail. Also: the
frozen MAC vector, master-key rotation, rolled-back state changes, the checkpoint file, and the
ListAuditRecords RPC. Every trail is written by a real broker on a real database."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import stat
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.api import key_broker_pb2 as pb
from broker.audit import chain, verify
from broker.audit.chain import GENESIS, AuditKey
from broker.core.audit_event import AuditEvent
from broker.core.errors import ConfigurationError
from broker.core.settings import Settings
from broker.db.engine import create_engine
from tests import softhsm
from tests.harness import (
    BrokerUnderTest,
    assert_error,
    error_info,
    run_keybroker,
    running_broker,
)
from tests.keys.test_master_key import rotate_offline

# -- the MAC format: frozen vectors --------------------------------------------------------------

VECTOR_KEY = AuditKey("auditKeys/0001020304050607", bytes(range(32)))
VECTOR_TIME = datetime(2026, 11, 28, 12, 34, 56, 789012, tzinfo=UTC)
VECTOR_1 = (
    VECTOR_TIME,
    "host:42:abcd:g",
    "req-1",
    "local:alice",
    None,
    "DecryptDataKey",
    "resources/r1/models/m1",
    1,
    0,
    "resources/r1/resourceKeys/models/versions/1",
    "OK",
    None,
)
VECTOR_2 = (
    VECTOR_TIME,
    "host:42:abcd:g",
    "req-2",
    "local:alice",
    "spiffe://x/worker",
    "GenerateDataKey",
    None,
    3,
    1,
    "",
    "INVALID_ARGUMENT",
    "DECRYPTION_FAILED",
)
MESSAGE_1 = (
    "000000196b657962726f6b65722f61756469742d7265636f72642f76310000001a61756469744b6579732f3030"
    "3031303230333034303530363037"
    "0000000e686f73743a34323a616263643a67"
    "000000080000000000000001"
    "000000200000000000000000000000000000000000000000000000000000000000000000"
    "0000000800066155677f8614"
    "000000057265712d31"
    "0000000b6c6f63616c3a616c696365"
    "0000000100"
    "0000000e44656372797074446174614b6579"
    "00000017017265736f75726365732f72312f6d6f64656c732f6d31"
    "000000080000000000000001"
    "000000080000000000000000"
    "0000002b7265736f75726365732f72312f7265736f757263654b6579732f6d6f64656c732f76657273696f6e732f31"
    "000000024f4b"
    "0000000100"
)
MAC_1 = "7107dd220ff4e0ec1333ffb74255ee9194b584f44fd0614f11894f4ccefa8737"
MAC_2 = "e464154924f5011d6f5a26b24440d5fe4a431cb18b4d0fcb885410983058e0f7"


def test_record_mac_known_answers() -> None:
    assert chain.message(VECTOR_KEY.key_id, 1, GENESIS, VECTOR_1).hex() == MESSAGE_1
    # The hot path's hand-built message is the length-prefixed encoding, field by field.
    assert chain.reference_message(VECTOR_KEY.key_id, 1, GENESIS, VECTOR_1).hex() == MESSAGE_1
    for seq, content in ((7, VECTOR_2), (2**63, VECTOR_1)):
        previous = os.urandom(32)
        assert chain.message("k", seq, previous, content) == chain.reference_message(
            "k", seq, previous, content
        )
    mac_1 = VECTOR_KEY.mac(1, GENESIS, VECTOR_1)
    assert mac_1.hex() == MAC_1
    assert VECTOR_KEY.mac(2, mac_1, VECTOR_2).hex() == MAC_2


def test_every_field_and_link_is_covered() -> None:
    base = VECTOR_KEY.mac(1, GENESIS, VECTOR_1)
    for i, value in enumerate(VECTOR_1):
        changed = list(VECTOR_1)
        if isinstance(value, datetime):
            changed[i] = value + timedelta(microseconds=1)
        elif isinstance(value, int):
            changed[i] = value + 1
        elif value is None:
            changed[i] = ""  # NULL and empty differ
        else:
            changed[i] = value + "x"
        assert VECTOR_KEY.mac(1, GENESIS, changed) != base, i
    assert VECTOR_KEY.mac(2, GENESIS, VECTOR_1) != base  # the position
    assert VECTOR_KEY.mac(1, bytes(31) + b"\x01", VECTOR_1) != base  # the predecessor
    assert AuditKey(VECTOR_KEY.key_id, bytes(32)).mac(1, GENESIS, VECTOR_1) != base  # the key
    # Shifting text between neighbouring fields changes the MAC (length prefixes).
    shifted = list(VECTOR_1)
    shifted[2], shifted[3] = "req-1l", "ocal:alice"
    assert VECTOR_KEY.mac(1, GENESIS, shifted) != base


# -- trails written by a real broker -------------------------------------------------------------

DATA_CALLS = 6


async def write_trail(settings: Settings) -> None:
    """A resource, then DATA_CALLS data-key calls one after another (each its own group, so the
    group chain holds DATA_CALLS records in a row), then a clean shutdown."""
    async with running_broker(settings) as b:
        await b.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        for i in range(DATA_CALLS):
            await b.stub.GenerateDataKey(
                pb.GenerateDataKeyRequest(name=f"resources/r1/models/m{i}")
            )


async def run_verify(settings: Settings) -> tuple[int, str]:
    out = io.StringIO()
    code = await verify.run(settings, out)
    return code, out.getvalue()


async def group_ids(engine: AsyncEngine) -> list[int]:
    """Ids of the group chain's records, in chain order."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT id FROM audit_records WHERE writer LIKE :g ORDER BY chain_seq"),
            {"g": "%:g"},
        )
        return [r[0] for r in rows]


async def sql(settings: Settings, statement: str, **params: Any) -> None:
    engine = create_engine(settings.database)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement), params)
    finally:
        await engine.dispose()


async def with_engine(settings: Settings, fn: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
    engine = create_engine(settings.database)
    try:
        return await fn(engine)
    finally:
        await engine.dispose()


@pytest.mark.asyncio
async def test_a_clean_trail_verifies(settings: Settings) -> None:
    await write_trail(settings)
    code, out = await run_verify(settings)
    assert code == 0, out
    # CreateResource on the state chain, the data-key calls on the group chain.
    assert f"audit verify: {DATA_CALLS + 1} chained records in 2 chains" in out
    assert "0 unchained" in out and ": OK" in out

    async def rows(engine: AsyncEngine) -> list[Any]:
        async with engine.connect() as conn:
            query = "SELECT writer, chain_seq, chain_mac, audit_key_id FROM audit_records"
            return list(await conn.execute(text(query)))

    for writer, seq, mac, key_id in await with_engine(settings, rows):
        assert writer.endswith((":g", ":s")) and seq >= 1
        assert len(mac) == 32 and key_id.startswith("auditKeys/")


@pytest.mark.asyncio
async def test_cli_audit_verify(settings: Settings) -> None:
    await write_trail(settings)
    args = ("--data-dir", str(settings.data_dir), "--database-url", settings.database_url)
    code, out, err = await run_keybroker("audit", "verify", *args)
    assert code == 0, (out, err)
    assert ": OK" in out
    # The tail goes: the command says so and fails.
    last = (await with_engine(settings, group_ids))[-1]
    await sql(settings, "DELETE FROM audit_records WHERE id = :id", id=last)
    code, out, err = await run_keybroker("audit", "verify", *args)
    assert code == 1, (out, err)
    assert "truncated:" in out and "1 finding(s)" in out


async def _edit_a_field(settings: Settings, ids: list[int]) -> None:
    await sql(
        settings, "UPDATE audit_records SET caller = 'local:mallory' WHERE id = :id", id=ids[2]
    )


async def _delete_a_middle_record(settings: Settings, ids: list[int]) -> None:
    await sql(settings, "DELETE FROM audit_records WHERE id = :id", id=ids[2])


async def _insert_a_forged_record(settings: Settings, ids: list[int]) -> None:
    # A copy of a real record, made to look like another call at the same chain position.
    await sql(
        settings,
        "INSERT INTO audit_records (time, writer, request_id, caller, on_behalf_of, operation,"
        " resource, item_count, failed_count, key_ids, outcome, reason, chain_seq, chain_mac,"
        " audit_key_id) SELECT time, writer, 'forged', caller, on_behalf_of, operation, resource,"
        " item_count, failed_count, key_ids, outcome, reason, chain_seq, chain_mac, audit_key_id"
        " FROM audit_records WHERE id = :id",
        id=ids[2],
    )


async def _append_a_forged_record(settings: Settings, ids: list[int]) -> None:
    # The next chain position, with a MAC made without the key.
    await sql(
        settings,
        "INSERT INTO audit_records (time, writer, request_id, caller, on_behalf_of, operation,"
        " resource, item_count, failed_count, key_ids, outcome, reason, chain_seq, chain_mac,"
        " audit_key_id) SELECT time, writer, 'forged', caller, on_behalf_of, operation, resource,"
        " item_count, failed_count, key_ids, outcome, reason, chain_seq + 1, :mac, audit_key_id"
        " FROM audit_records WHERE id = :id",
        id=ids[-1],
        mac=os.urandom(32),
    )


async def _insert_an_unchained_record(settings: Settings, ids: list[int]) -> None:
    await sql(
        settings,
        "INSERT INTO audit_records (time, writer, request_id, caller, operation, item_count,"
        " failed_count, key_ids, outcome) SELECT time, writer, 'forged', caller, operation,"
        " item_count, failed_count, key_ids, outcome FROM audit_records WHERE id = :id",
        id=ids[2],
    )


async def _swap_two_records(settings: Settings, ids: list[int]) -> None:
    # Every column but the id trades places: the two records now sit in each other's position.
    a, b = ids[1], ids[2]
    columns = (
        "time, writer, request_id, caller, on_behalf_of, operation, resource, item_count,"
        " failed_count, key_ids, outcome, reason, chain_seq, chain_mac, audit_key_id"
    )
    names = [c.strip() for c in columns.split(",")]
    sets = ", ".join(f"{c} = (SELECT {c} FROM audit_records WHERE id = :src)" for c in names)
    await sql(
        settings,
        f"CREATE TABLE swap_tmp AS SELECT id, {columns} FROM audit_records WHERE id IN (:a, :b)",
        a=a,
        b=b,
    )
    for dst, src in ((a, b), (b, a)):
        await sql(
            settings,
            f"UPDATE audit_records SET {sets.replace('audit_records', 'swap_tmp')} WHERE id = :dst",
            dst=dst,
            src=src,
        )
    await sql(settings, "DROP TABLE swap_tmp")


async def _delete_the_tail(settings: Settings, ids: list[int]) -> None:
    await sql(settings, "DELETE FROM audit_records WHERE id IN (:a, :b)", a=ids[-1], b=ids[-2])


async def _delete_the_whole_chain(settings: Settings, ids: list[int]) -> None:
    await sql(settings, "DELETE FROM audit_records WHERE writer LIKE :g", g="%:g")


async def _replace_the_last_record(settings: Settings, ids: list[int]) -> None:
    # Delete the tail and forge a record at the checkpointed position: its MAC gives it away,
    # and so does the checkpoint.
    await sql(settings, "UPDATE audit_records SET chain_mac = :mac WHERE id = :id", id=ids[-1],
              mac=os.urandom(32))  # fmt: skip


TAMPERING: dict[str, tuple[Callable[[Settings, list[int]], Awaitable[None]], set[str]]] = {
    "edit a field": (_edit_a_field, {"edited"}),
    "delete a middle record": (_delete_a_middle_record, {"deleted"}),
    "insert a forged record": (_insert_a_forged_record, {"inserted"}),
    "append a forged record": (_append_a_forged_record, {"edited"}),
    "insert an unchained record": (_insert_an_unchained_record, {"unchained"}),
    "swap two records": (_swap_two_records, {"reordered"}),
    "delete the tail": (_delete_the_tail, {"truncated"}),
    "delete a whole chain": (_delete_the_whole_chain, {"truncated"}),
    "replace the last record": (_replace_the_last_record, {"edited", "truncated"}),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("tampering", list(TAMPERING))
async def test_tampering_is_reported(settings: Settings, tampering: str) -> None:
    await write_trail(settings)
    ids = await with_engine(settings, group_ids)
    assert len(ids) == DATA_CALLS
    tamper, kinds = TAMPERING[tampering]
    await tamper(settings, ids)
    code, out = await run_verify(settings)
    assert code == 1, out
    reported = {line.split(":", 1)[0] for line in out.splitlines()[:-1]}
    assert kinds <= reported, out
    assert "finding(s)" in out.splitlines()[-1]


@pytest.mark.asyncio
async def test_records_from_before_the_chain_are_counted_not_trusted(settings: Settings) -> None:
    # The shape migration 0004 leaves: old records without chain columns, then chained ones.
    async with running_broker(settings):
        pass
    await sql(
        settings,
        "INSERT INTO audit_records (time, writer, request_id, caller, operation, item_count,"
        " failed_count, key_ids, outcome) VALUES (:t, 'old:1:x', 'r', 'c', 'CreateResource', 1,"
        " 0, '', 'OK')",
        t=datetime(2026, 1, 1),
    )
    await write_trail(settings)
    code, out = await run_verify(settings)
    assert code == 0, out
    assert "1 unchained records from before the audit chain" in out


@pytest.mark.asyncio
async def test_checkpoint_file_and_shutdown_log(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.audit")
    await write_trail(settings)
    files = list((settings.data_dir / chain.CHECKPOINT_DIR).glob("*.json"))
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    body = json.loads(files[0].read_text())
    chains = {c["writer"][-2:]: c for c in body["chains"]}
    assert body["format"] == 1 and chains[":g"]["seq"] == DATA_CALLS and chains[":s"]["seq"] == 1
    logged = [r.getMessage() for r in caplog.records if "audit chain head" in r.getMessage()]
    assert any(f"seq={DATA_CALLS} mac={chains[':g']['mac']}" in m for m in logged), logged


@pytest.mark.asyncio
async def test_heads_are_checkpointed_while_the_broker_runs(settings: Settings) -> None:
    async with running_broker(settings) as b:
        await b.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
        await b.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name="resources/r1/models/m"))
        directory = settings.data_dir / chain.CHECKPOINT_DIR
        for _ in range(50):  # about once a second while heads move
            heads, errors = chain.read_checkpoints(settings.data_dir)
            if sorted(h.seq for h in heads) == [1, 1]:
                break
            await asyncio.sleep(0.1)
        assert not errors
        assert {h.writer for h in heads} == {h.writer for h in b.running.broker.audit.heads}
        assert {h.mac for h in heads} == {h.mac for h in b.running.broker.audit.heads}
        assert not list(directory.glob("*.tmp"))


@pytest.mark.asyncio
async def test_verify_never_creates_a_master_key(settings: Settings) -> None:
    await write_trail(settings)
    settings.master_key_file.unlink()
    with pytest.raises(ConfigurationError, match="does not exist"):
        await run_verify(settings)
    assert not settings.master_key_file.exists()


@pytest.mark.asyncio
async def test_verification_survives_master_key_rotation(settings: Settings) -> None:
    await write_trail(settings)
    args = ("--data-dir", str(settings.data_dir), "--database-url", settings.database_url)
    code, out, err = await run_keybroker("master-key", "rotate", *args)
    assert code == 0, (out, err)
    new_id = out.split(" -> ")[1].split(";")[0]
    # The rotation's own record is chained too, and the old records still verify under the
    # re-sealed audit key; so do records written afterwards under the new master key.
    code, out = await run_verify(settings)
    assert code == 0, out
    assert f"{DATA_CALLS + 2} chained records in 3 chains" in out
    await write_trail_more(settings)
    code, out = await run_verify(settings)
    assert code == 0, out

    async def key_rows(engine: AsyncEngine) -> list[Any]:
        async with engine.connect() as conn:
            return list(await conn.execute(text("SELECT id, master_key_id FROM audit_keys")))

    (row,) = await with_engine(settings, key_rows)  # one audit key, re-sealed, not replaced
    assert row[1] == new_id


async def write_trail_more(settings: Settings) -> None:
    async with running_broker(settings) as b:
        await b.stub.GenerateDataKey(pb.GenerateDataKeyRequest(name="resources/r1/models/x"))
        await b.stub.RotateResourceKey(
            pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
        )


@pytest.fixture
def token_settings(settings: Settings, softhsm_token: str) -> Settings:
    """A master key in the session's SoftHSM2 token (non-extractable: the audit key is sealed
    inside the token, never derived from key bytes)."""
    return replace(
        settings,
        master_key_pkcs11_label=f"mk-{uuid.uuid4().hex[:12]}",
        master_key_pkcs11_token=softhsm_token,
        pkcs11_module=softhsm.MODULE,
        pkcs11_pin=softhsm.PIN,
    )


@pytest.mark.asyncio
async def test_a_token_master_key_chains_and_survives_rotation(token_settings: Settings) -> None:
    await write_trail(token_settings)
    await rotate_offline(token_settings)
    await write_trail_more(token_settings)
    code, out = await run_verify(token_settings)
    assert code == 0, out
    # trail (state 1 + group 6), the rotation (1), then a group and a state record.
    assert f"{DATA_CALLS + 4} chained records in 5 chains" in out
    last = (await with_engine(token_settings, group_ids))[-1]
    await sql(token_settings, "UPDATE audit_records SET outcome = 'X' WHERE id = :id", id=last)
    code, out = await run_verify(token_settings)
    assert code == 1 and "edited:" in out, out


class Boom(Exception):
    pass


@pytest.mark.asyncio
async def test_a_rolled_back_state_change_does_not_break_the_chain(settings: Settings) -> None:
    async with running_broker(settings) as b:
        broker = b.running.broker

        async def doomed_change() -> None:
            async with broker.sessions.begin() as session:
                await broker.audit.record_in(session, AuditEvent("Doomed", "local:t", "req-x"))
                raise Boom

        with pytest.raises(Boom):
            await doomed_change()
        # Concurrent state changes and data-key calls, after the rollback.
        await asyncio.gather(
            *(
                b.stub.CreateResource(pb.CreateResourceRequest(resource_id=f"r{i}"))
                for i in range(4)
            )
        )
        await asyncio.gather(
            *(
                b.stub.GenerateDataKey(
                    pb.GenerateDataKeyRequest(name=f"resources/r{i % 4}/models/m")
                )
                for i in range(20)
            )
        )
        state = next(h for h in broker.audit.heads if h.writer.endswith(":s"))
        assert state.seq == 4  # the rolled-back record took no position
    code, out = await run_verify(settings)
    assert code == 0, out

    async def doomed(engine: AsyncEngine) -> int:
        async with engine.connect() as conn:
            q = "SELECT count(*) FROM audit_records WHERE operation = 'Doomed'"
            return int((await conn.execute(text(q))).scalar_one())

    assert await with_engine(settings, doomed) == 0


# -- ListAuditRecords ------------------------------------------------------------------------------


async def list_all(b: BrokerUnderTest, **fields: Any) -> list[pb.AuditRecord]:
    request = pb.ListAuditRecordsRequest(**fields)
    records: list[pb.AuditRecord] = []
    pages = 0
    while True:
        page = await b.stub.ListAuditRecords(request)
        pages += 1
        assert len(page.audit_records) <= (request.page_size or 50)
        records.extend(page.audit_records)
        if not page.next_page_token:
            return records
        request.page_token = page.next_page_token
        assert pages < 100


@pytest.mark.asyncio
async def test_list_audit_records_pages_and_filters(broker: BrokerUnderTest) -> None:
    b = broker
    for rid in ("r1", "r10"):  # r10 shares r1's prefix but is another resource
        await b.stub.CreateResource(pb.CreateResourceRequest(resource_id=rid))
        for i in range(3):
            await b.stub.GenerateDataKey(
                pb.GenerateDataKeyRequest(name=f"resources/{rid}/models/m{i}")
            )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await b.stub.DecryptDataKey(
            pb.DecryptDataKeyRequest(name="resources/r1/models/m0", wrapped_data_key=b"junk")
        )
    listed = await list_all(b, parent="resources/r1", page_size=2)
    # The listing calls are audited as reads of the resource: later pages see earlier ones.
    records = [r for r in listed if r.operation != "ListAuditRecords"]
    tail = [r.operation for r in listed[len(records) :]]
    assert tail and set(tail) == {"ListAuditRecords"}
    assert [r.operation for r in records] == ["CreateResource"] + ["GenerateDataKey"] * 3 + [
        "DecryptDataKey"
    ]
    assert all(
        r.resource == "resources/r1" or r.resource.startswith("resources/r1/") for r in listed
    )
    failed = records[-1]
    info = error_info(err.value)
    assert info is not None and info.reason
    assert (failed.outcome, failed.reason) == ("INVALID_ARGUMENT", info.reason)
    ok = records[1]
    assert ok.resource == "resources/r1/models/m0" and ok.outcome == "OK"
    assert ok.key_ids == ["resources/r1/resourceKeys/models/versions/1"]
    assert ok.name.startswith("resources/r1/auditRecords/") and ok.writer.endswith(":g")
    assert ok.chain_sequence >= 1 and len(ok.chain_mac) == 32
    times = [r.time.ToDatetime(tzinfo=UTC) for r in records]
    assert times == sorted(times)
    again = await list_all(b, parent="resources/r1", page_size=1000)
    assert [r.name for r in again[: len(listed)]] == [r.name for r in listed]
    # Each page was a call of its own; only the last page's record was not yet there to list.
    assert len(again) == len(listed) + 1
    assert len(await list_all(b, parent="resources/r10")) == 4
    # Time range: [start, end).
    middle = records[2].time
    later = await list_all(b, parent="resources/r1", start_time=middle)
    assert later[0].name == records[2].name
    earlier = await list_all(b, parent="resources/r1", end_time=middle)
    assert [r.name for r in earlier] == [r.name for r in records[:2]]
    future = pb.ListAuditRecordsRequest(parent="resources/r1")
    future.start_time.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    assert not (await b.stub.ListAuditRecords(future)).audit_records


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"parent": ""}, None),
        ({"parent": "resources/r1/models/m1"}, None),
        ({"parent": "resources/r1", "page_token": "bogus"}, "INVALID_PAGE_TOKEN"),
        ({"parent": "resources/r1", "page_size": -1}, "INVALID_PAGE_SIZE"),
    ],
)
async def test_list_audit_records_rejects_bad_requests(
    broker: BrokerUnderTest, fields: dict[str, Any], reason: str | None
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.ListAuditRecords(pb.ListAuditRecordsRequest(**fields))
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, reason)


@pytest.mark.asyncio
async def test_list_audit_records_rejects_an_inverted_range(broker: BrokerUnderTest) -> None:
    request = pb.ListAuditRecordsRequest(parent="resources/r1")
    request.start_time.FromDatetime(datetime(2026, 2, 1, tzinfo=UTC))
    request.end_time.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await broker.stub.ListAuditRecords(request)
    assert_error(err.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TIME_RANGE")


@pytest.mark.asyncio
async def test_cli_audit_list(broker: BrokerUnderTest) -> None:
    await broker.stub.CreateResource(pb.CreateResourceRequest(resource_id="r1"))
    address = f"127.0.0.1:{broker.running.port}"
    code, out, err = await run_keybroker("audit", "list", "resources/r1", "--address", address)
    assert code == 0, err
    (line,) = out.splitlines()
    assert "\tCreateResource\tresources/r1\tOK\t" in line
