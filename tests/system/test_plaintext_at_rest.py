"""Plaintext never at rest: marker plaintexts pushed through every path (models and analyze
results through Storage, data keys handed to clients by the single and batch RPCs, the data keys
Storage made for its own objects) are then looked for in every file under the data directory
(SQLite database, -wal and -shm included, blobs, key files), in a pg_dump of the PostgreSQL
database, and in the logs captured at DEBUG: raw, hex (either case) and base64 (standard and
URL-safe, at every alignment). Zero hits. A planted marker shows the scan can find one.

Also: every server command runs with core dumps disabled (RLIMIT_CORE 0, set in broker.cli),
since a core dump of a broker or a worker would hold plaintext keys.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import resource
import subprocess
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from broker.api import key_broker_pb2 as pb
from broker.api import storage_pb2 as spb
from broker.core.settings import Settings
from tests.harness import BrokerUnderTest, free_port, running_broker
from tests.pg_cluster import postgres_bin_dir
from tests.system.test_process import start_up, wait_serving

RESOURCE = "resources/pt"


def forms(secret: bytes) -> list[bytes]:
    """The ways `secret` could show up in a file or a log: raw, hex, and base64 at each of the
    three alignments it could have inside a longer encoded string (the partial edge groups
    dropped, so a match means at least the secret's middle bytes are there)."""
    found = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    for shift in range(3):
        part = secret[shift:]
        part = part[: len(part) - len(part) % 3]
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            found.append(encode(part))
    return [f for f in found if len(f) >= 16]


def hits(haystack: bytes, secrets: dict[str, bytes]) -> list[str]:
    """Which secrets (by label) appear in `haystack`, in any of their forms."""
    return [label for label, secret in secrets.items() if any(f in haystack for f in forms(secret))]


def scan_files(root: Path, secrets: dict[str, bytes]) -> dict[str, list[str]]:
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            where = hits(path.read_bytes(), secrets)
            if where:
                found[str(path.relative_to(root))] = where
    return found


def marker(label: str) -> bytes:
    """A distinctive plaintext: a label and random bytes, printable so that logs could show it."""
    return f"KBMARK-{label}-{os.urandom(12).hex()}-".encode()


async def _parts(messages: Iterable[Any]) -> AsyncIterator[Any]:
    for m in messages:
        yield m


async def push_everything(kb: BrokerUnderTest) -> dict[str, bytes]:
    """Sends marker plaintexts down every path; returns every secret to look for, by label."""
    secrets: dict[str, bytes] = {}
    await kb.stub.CreateResource(pb.CreateResourceRequest(resource_id="pt"))
    model_text = marker("model")
    model_data = model_text * 400  # several segments
    model = f"{RESOURCE}/models/m1"
    await kb.storage.UploadModel(
        _parts(
            [spb.UploadModelRequest(header=spb.UploadModelRequest.Header(name=model))]
            + [
                spb.UploadModelRequest(chunk=model_data[i : i + 5000])
                for i in range(0, len(model_data), 5000)
            ]
        )
    )
    secrets["model"] = model_text
    results = {}
    for result_id in ("kept", "deleted"):
        result_text = marker(f"result-{result_id}")
        operation = await kb.storage.CreateAnalyzeOperation(
            spb.CreateAnalyzeOperationRequest(
                parent=RESOURCE, model=model, analyze_result_id=result_id
            )
        )
        name = operation.operation.name
        header = spb.UploadAnalyzeResultRequest.Header(name=name)
        await kb.storage.UploadAnalyzeResult(
            _parts(
                [
                    spb.UploadAnalyzeResultRequest(header=header),
                    spb.UploadAnalyzeResultRequest(chunk=result_text * 50),
                ]
            )
        )
        results[result_id] = name
        secrets[f"result-{result_id}"] = result_text
    # Read back (the paths that decrypt), then delete one result (the shredding path).
    for part in [m async for m in kb.storage.DownloadModel(spb.DownloadModelRequest(name=model))]:
        if part.WhichOneof("part") == "chunk":
            assert model_text in part.chunk or len(part.chunk) < len(model_text)
    download = spb.DownloadAnalyzeResultRequest(name=results["kept"])
    assert [m async for m in kb.storage.DownloadAnalyzeResult(download)]
    await kb.storage.DeleteAnalyzeResult(spb.DeleteAnalyzeResultRequest(name=results["deleted"]))

    # Data keys handed to clients: single, batch, decrypted again, re-wrapped.
    single = await kb.stub.GenerateDataKey(
        pb.GenerateDataKeyRequest(name=f"{RESOURCE}/models/m9", associated_data=b"ad")
    )
    secrets["data key"] = single.plaintext_data_key
    batch = await kb.stub.BatchGenerateDataKeys(
        pb.BatchGenerateDataKeysRequest(
            requests=[
                pb.GenerateDataKeyRequest(name=f"{RESOURCE}/analyzeResults/b{i}") for i in range(5)
            ]
        )
    )
    for i, result in enumerate(batch.results):
        secrets[f"batch data key {i}"] = result.response.plaintext_data_key
    again = await kb.stub.DecryptDataKey(
        pb.DecryptDataKeyRequest(
            name=f"{RESOURCE}/models/m9",
            wrapped_data_key=single.wrapped_data_key,
            associated_data=b"ad",
        )
    )
    assert again.plaintext_data_key == single.plaintext_data_key
    await kb.stub.BatchDecryptDataKeys(
        pb.BatchDecryptDataKeysRequest(
            requests=[
                pb.DecryptDataKeyRequest(
                    name=f"{RESOURCE}/analyzeResults/b{i}",
                    wrapped_data_key=r.response.wrapped_data_key,
                )
                for i, r in enumerate(batch.results)
            ]
        )
    )
    await kb.stub.RotateResourceKey(
        pb.RotateResourceKeyRequest(name=f"{RESOURCE}/resourceKeys/models")
    )
    await kb.stub.RewrapDataKey(
        pb.RewrapDataKeyRequest(
            name=f"{RESOURCE}/models/m9",
            wrapped_data_key=single.wrapped_data_key,
            associated_data=b"ad",
        )
    )
    # The data keys Storage made for its own objects (opened here the way Storage opens them).
    async with kb.engine.connect() as conn:
        stored = (
            await conn.execute(
                text(
                    "SELECT name, wrapped_data_key FROM models UNION ALL "
                    "SELECT name, wrapped_data_key FROM analyze_operations "
                    "WHERE wrapped_data_key IS NOT NULL"
                )
            )
        ).all()
    assert len(stored) == 2  # the model and the kept result
    for name, wrapped in stored:
        key = await kb.stub.DecryptDataKey(
            pb.DecryptDataKeyRequest(name=name, wrapped_data_key=bytes(wrapped))
        )
        secrets[f"object key of {name}"] = key.plaintext_data_key
    return secrets


def pg_dump_binary() -> Path:
    """pg_dump of the cluster's own version (beside its initdb, symlinks resolved)."""
    found = postgres_bin_dir().joinpath("initdb").resolve().with_name("pg_dump")
    assert found.is_file(), f"no pg_dump beside {postgres_bin_dir()}/initdb"
    return found


def pg_dump(database_url: str) -> bytes:
    url = database_url.replace("postgresql+asyncpg://", "postgresql://")
    done = subprocess.run(
        [str(pg_dump_binary()), "--no-owner", f"--dbname={url}"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert b"CREATE TABLE public.models" in done.stdout
    return done.stdout


@pytest.mark.asyncio
async def test_no_plaintext_at_rest_or_in_logs(
    settings: Settings, db_kind: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    config = replace(settings, segment_size=4096, log_level="DEBUG")
    async with running_broker(config, with_storage=True) as kb:
        secrets = await push_everything(kb)
        await kb.running.broker.service.detached.wait_all()
        # While the server runs: the SQLite WAL and shared-memory files exist now.
        running = scan_files(config.data_dir, secrets)
        names = {p.name for p in config.data_dir.rglob("*")}
        if db_kind == "sqlite":
            assert {"keybroker.db", "keybroker.db-wal", "keybroker.db-shm"} <= names, names
        dump = pg_dump(config.database_url) if db_kind == "postgresql" else b""
    assert running == {}, f"plaintext found under the data directory: {running}"
    assert scan_files(config.data_dir, secrets) == {}  # after shutdown (WAL checkpointed)
    assert hits(dump, secrets) == []
    logs = caplog.text.encode() + b"".join(
        (r.getMessage() + (r.exc_text or "")).encode() for r in caplog.records
    )
    assert len(caplog.records) > 10, "DEBUG logging captured nothing: the scan would prove nothing"
    assert hits(logs, secrets) == []
    # The scan can fail: a marker and a data key planted in a file, base64 in a log line, found.
    planted = tmp_path / "planted"
    planted.mkdir()
    key = secrets["data key"]
    (planted / "f").write_bytes(b"xx" + secrets["model"] + b"yy" + base64.b64encode(b"q" + key))
    assert sorted(scan_files(planted, secrets)["f"]) == ["data key", "model"]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_server_processes_disable_core_dumps(tmp_path: Path) -> None:
    """`keybroker up` (broker and workers in one process) runs with RLIMIT_CORE 0, soft and hard,
    whatever limit it was started with (here: core dumps allowed, so the 0 is its own doing)."""
    before = resource.getrlimit(resource.RLIMIT_CORE)
    allowed = before[1] if before[1] != 0 else resource.RLIM_INFINITY  # raising needs root
    resource.setrlimit(resource.RLIMIT_CORE, (allowed, allowed))
    port = free_port()
    try:
        proc = start_up(tmp_path / "data", port)
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, before)
    try:
        await wait_serving(port, proc)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()  # noqa: ASYNC240 -- procfs
        (line,) = [x for x in limits.splitlines() if x.startswith("Max core file size")]
        soft, hard = line.split()[4:6]
        assert (soft, hard) == ("0", "0"), line
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 20)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
