"""The filesystem blob store against its contract: no partial blob is ever visible, whatever
happens to the writer (an error in its stream, cancellation, SIGKILL), and keys stay inside the
store."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest
from anyio.streams.memory import MemoryObjectSendStream

from workers.blobs import BlobNotFound, BlobStore
from workers.fs_blobs import filesystem_blob_store

KEY = "r1/models/m1/0f8fad5b-d9cb-469f-a165-70867728950e"
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
def store(root: Path) -> BlobStore:
    return filesystem_blob_store(root)


async def stream(data: bytes, sizes: Iterable[int] = (MIB,)) -> AsyncIterator[bytes]:
    """`data` cut into pieces of the given sizes, cycled."""
    sizes = list(sizes)
    offset, i = 0, 0
    while offset < len(data):
        yield data[offset : offset + sizes[i % len(sizes)]]
        offset += sizes[i % len(sizes)]
        i += 1


async def read_all(store: BlobStore, key: str, chunk_size: int = MIB) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, chunk_size)])


def listing(root: Path) -> list[str]:
    """Everything under `root`, blobs, temporaries and directories alike."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(".tmp-*"))


def temporary_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in temporaries(root))


async def wait_for_temporary_bytes(root: Path, n: int) -> None:
    """Until writers have put at least `n` bytes into temporaries under `root`."""
    with anyio.fail_after(30):
        # Polled: the writer may be another process, and the store has no event to wait on.
        while temporary_bytes(root) < n:  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def assert_absent(store: BlobStore, key: str) -> None:
    assert not await store.exists(key)
    with pytest.raises(BlobNotFound):
        await store.size(key)
    with pytest.raises(BlobNotFound):
        await read_all(store, key)


# Round trips


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("data", "sizes"),
    [
        (b"", (1,)),
        (b"hello, blob", (3,)),
        (os.urandom(5 * MIB + 7), (1, 4093, 65537, 1_000_003, 3 * MIB)),
        # Past the intermediate fdatasync (every 8 MiB) with a write in flight at each batch.
        (os.urandom(19 * MIB + 3), (MIB, 2 * MIB + 1)),
    ],
    ids=["empty", "small", "5MiB-odd-chunks", "19MiB-with-syncs"],
)
async def test_round_trip(store: BlobStore, root: Path, data: bytes, sizes: tuple[int]) -> None:
    assert await store.write(KEY, stream(data, sizes)) == len(data)
    assert await store.exists(KEY)
    assert await store.size(KEY) == len(data)
    assert await read_all(store, KEY) == data
    pieces = [chunk async for chunk in store.read(KEY, chunk_size=777_777)]
    assert b"".join(pieces) == data
    assert all(0 < len(p) <= 777_777 for p in pieces)
    assert temporaries(root) == []


@pytest.mark.asyncio
async def test_empty_chunks_make_an_empty_blob(store: BlobStore) -> None:
    async def empties() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b""

    assert await store.write(KEY, empties()) == 0
    assert await store.size(KEY) == 0
    assert [chunk async for chunk in store.read(KEY)] == []


@pytest.mark.asyncio
async def test_write_replaces(store: BlobStore, root: Path) -> None:
    await store.write(KEY, stream(os.urandom(3 * MIB)))
    await store.write(KEY, stream(b"second"))
    assert await read_all(store, KEY) == b"second"
    assert await store.size(KEY) == 6
    assert temporaries(root) == []


@pytest.mark.asyncio
async def test_a_reader_finishes_the_version_it_started_on(store: BlobStore) -> None:
    old = os.urandom(3 * MIB)
    await store.write(KEY, stream(old))
    async with aclosing(store.read(KEY, chunk_size=MIB)) as reader:
        first = await anext(reader)
        await store.write(KEY, stream(b"new"))
        second = await anext(reader)
        assert await store.delete(KEY)
        rest = [chunk async for chunk in reader]
    assert first + second + b"".join(rest) == old
    await assert_absent(store, KEY)


@pytest.mark.asyncio
async def test_concurrent_writers_of_one_key_leave_one_whole_version(
    store: BlobStore, root: Path
) -> None:
    versions = [bytes([i]) * (MIB + i) for i in range(12)]
    async with anyio.create_task_group() as tg:
        for v in versions:
            tg.start_soon(store.write, KEY, stream(v, (65536,)))
    assert await read_all(store, KEY) in versions
    assert temporaries(root) == []


@pytest.mark.asyncio
async def test_writes_and_deletes_racing_in_one_directory(store: BlobStore, root: Path) -> None:
    # Deletes prune the directory a concurrent write has just made; the write must still land.
    async def write_then_delete(i: int) -> None:
        key = f"r1/results/x/{i}"
        for _ in range(10):
            assert await store.write(key, stream(b"data")) == 4
            assert await store.delete(key)

    async with anyio.create_task_group() as tg:
        for i in range(16):
            tg.start_soon(write_then_delete, i)
    assert listing(root) == []


# Delete and not found


@pytest.mark.asyncio
async def test_delete_is_idempotent_and_prunes_empty_directories(
    store: BlobStore, root: Path
) -> None:
    sibling = "r1/models/m1/other"
    await store.write(KEY, stream(b"one"))
    await store.write(sibling, stream(b"two"))
    assert await store.delete(KEY)
    assert not await store.delete(KEY)
    await assert_absent(store, KEY)
    assert listing(root) == ["r1", "r1/models", "r1/models/m1", "r1/models/m1/other"]
    assert await store.delete(sibling)
    assert listing(root) == []
    assert not await store.delete("never/written")


@pytest.mark.asyncio
async def test_missing_blobs_are_not_found(store: BlobStore) -> None:
    await assert_absent(store, KEY)
    await store.write("a/b/c", stream(b"x"))
    # A directory on the way to a blob, and a path through a blob, are not blobs.
    await assert_absent(store, "a/b")
    await assert_absent(store, "a/b/c/d")
    assert not await store.delete("a/b")
    assert not await store.delete("a/b/c/d")
    assert await read_all(store, "a/b/c") == b"x"


@pytest.mark.asyncio
async def test_a_key_that_is_a_path_prefix_of_another_is_refused(
    store: BlobStore, root: Path
) -> None:
    await store.write("a/b/c", stream(b"x"))
    with pytest.raises(ValueError, match="prefix"):
        await store.write("a/b", stream(b"y"))
    with pytest.raises(ValueError, match="in the way"):
        await store.write("a/b/c/d", stream(b"y"))
    assert await read_all(store, "a/b/c") == b"x"
    assert temporaries(root) == []


# Keys


BAD_KEYS = [
    "",
    "../x",
    "/abs",
    "a/../b",
    "a/..",
    "..",
    ".",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    ".tmp-0123456789abcdef",
    "a/.tmp-x",
    ".hidden",
    "a" * 600,
    "a" * 513,
    "a/" + "b" * 256,
    "a\x00b",
    "a b",
    "a\\b",
    "a:b",
    "a\nb",
    "é",
    "ключ/1",
    "a\u2044b",
    "a\uff0fb",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_are_refused_by_every_method(store: BlobStore, root: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.write(key, stream(b"x"))
    with pytest.raises(ValueError, match="invalid blob key"):
        store.read(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.delete(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.exists(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        await store.size(key)
    assert listing(root) == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "key",
    [
        KEY,
        "a",
        "AZaz09-_.",
        "v1.2/x..y/z.",
        "a" * 255 + "/" + "b" * 254 + "/c",  # 512 characters
    ],
)
async def test_good_keys_round_trip(store: BlobStore, key: str) -> None:
    await store.write(key, stream(b"x"))
    assert await read_all(store, key) == b"x"
    assert await store.delete(key)


# A writer that fails, is cancelled or is slow


async def failing_stream(data: bytes) -> AsyncIterator[bytes]:
    async for chunk in stream(data):
        yield chunk
    raise RuntimeError("upstream broke")


@pytest.mark.asyncio
async def test_a_stream_that_raises_leaves_nothing(store: BlobStore, root: Path) -> None:
    with pytest.raises(RuntimeError, match="upstream broke"):
        await store.write(KEY, failing_stream(os.urandom(3 * MIB)))
    await assert_absent(store, KEY)
    assert temporaries(root) == []
    assert listing(root) == []


@pytest.mark.asyncio
async def test_a_stream_that_raises_keeps_the_previous_blob(store: BlobStore, root: Path) -> None:
    await store.write(KEY, stream(b"previous"))
    with pytest.raises(RuntimeError, match="upstream broke"):
        await store.write(KEY, failing_stream(os.urandom(3 * MIB)))
    assert await read_all(store, KEY) == b"previous"
    assert temporaries(root) == []


async def feed(send: MemoryObjectSendStream[bytes], data: bytes) -> None:
    for offset in range(0, len(data), MIB):
        await send.send(data[offset : offset + MIB])


@pytest.mark.asyncio
@pytest.mark.parametrize("cancel_by", ["anyio-scope", "asyncio-task"])
async def test_a_cancelled_write_leaves_the_previous_blob(
    store: BlobStore, root: Path, cancel_by: str
) -> None:
    await store.write(KEY, stream(b"previous"))
    send, receive = anyio.create_memory_object_stream[bytes]()
    with send, receive:
        if cancel_by == "anyio-scope":
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.write, KEY, receive)
                await feed(send, os.urandom(3 * MIB))
                await wait_for_temporary_bytes(root, 3 * MIB)
                tg.cancel_scope.cancel()
        else:
            task = asyncio.ensure_future(store.write(KEY, receive))
            await feed(send, os.urandom(3 * MIB))
            await wait_for_temporary_bytes(root, 3 * MIB)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert await read_all(store, KEY) == b"previous"
    assert temporaries(root) == []


@pytest.mark.asyncio
async def test_nothing_is_visible_until_the_write_completes(store: BlobStore, root: Path) -> None:
    data = os.urandom(4 * MIB)
    send, receive = anyio.create_memory_object_stream[bytes]()
    with receive:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.write, KEY, receive)
            with send:
                for written in range(MIB, len(data) + 1, MIB):
                    await send.send(data[written - MIB : written])
                    await wait_for_temporary_bytes(root, written)
                    await assert_absent(store, KEY)
            # The stream has ended; the blob appears once the write has committed it.
    assert await read_all(store, KEY) == data
    assert temporaries(root) == []


@pytest.mark.asyncio
async def test_readers_see_the_old_blob_while_a_replacement_is_written(
    store: BlobStore, root: Path
) -> None:
    old, new = os.urandom(2 * MIB), os.urandom(3 * MIB)
    await store.write(KEY, stream(old))
    send, receive = anyio.create_memory_object_stream[bytes]()
    with receive:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.write, KEY, receive)
            with send:
                await feed(send, new)
                await wait_for_temporary_bytes(root, len(new))
                assert await read_all(store, KEY) == old
                assert await store.size(KEY) == len(old)
    assert await read_all(store, KEY) == new


# Modes


@pytest.mark.asyncio
async def test_files_are_0600_and_directories_0700(store: BlobStore, root: Path) -> None:
    send, receive = anyio.create_memory_object_stream[bytes]()
    with receive:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.write, KEY, receive)
            with send:
                await send.send(b"x" * MIB)
                await wait_for_temporary_bytes(root, MIB)
                [temp] = temporaries(root)
                assert stat.S_IMODE(temp.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / KEY).stat().st_mode) == 0o600
    for directory in [root, root / "r1", root / "r1/models", root / "r1/models/m1"]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


# Crash clean-up


def plant_temporary(root: Path, directory: str, age: float) -> Path:
    """What a writer killed mid-write leaves: a temporary that nobody holds."""
    (root / directory).mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = root / directory / ".tmp-deadbeefdeadbeef"
    temp.write_bytes(b"partial")
    then = time.time() - age
    os.utime(temp, (then, then))
    return temp


@pytest.mark.asyncio
async def test_the_sweep_removes_stale_temporaries_only(store: BlobStore, root: Path) -> None:
    await store.write(KEY, stream(b"kept"))
    old = plant_temporary(root, "r1/models/m1", age=7200)
    recent = plant_temporary(root, "r1/results/a", age=60)
    assert await store.remove_stale_temporaries(older_than=3600) == 1
    assert not old.exists()
    assert recent.exists()
    assert await store.remove_stale_temporaries(older_than=3600) == 0
    assert await store.remove_stale_temporaries(older_than=0) == 1
    assert temporaries(root) == []
    # Directories left empty go too; blobs stay.
    assert not (root / "r1/results").exists()
    assert await read_all(store, KEY) == b"kept"


@pytest.mark.asyncio
async def test_the_sweep_leaves_a_write_in_progress_alone(store: BlobStore, root: Path) -> None:
    data = os.urandom(2 * MIB)
    send, receive = anyio.create_memory_object_stream[bytes]()
    with receive:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.write, KEY, receive)
            with send:
                await feed(send, data)
                await wait_for_temporary_bytes(root, len(data))
                [temp] = temporaries(root)
                os.utime(temp, (0, 0))
                assert await store.remove_stale_temporaries(older_than=0) == 0
                assert temp.exists()
    assert await read_all(store, KEY) == data


WRITER = """
import asyncio, sys
from pathlib import Path
from workers.fs_blobs import filesystem_blob_store

async def slowly():
    for _ in range(4096):
        yield bytes(1 << 20)
        await asyncio.sleep(0.005)

asyncio.run(filesystem_blob_store(Path(sys.argv[1])).write(sys.argv[2], slowly()))
"""


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_writer_killed_mid_write_leaves_only_a_temporary_the_sweep_removes(
    store: BlobStore, root: Path
) -> None:
    async with await anyio.open_process(
        [sys.executable, "-c", WRITER, str(root), KEY], cwd=REPO
    ) as writer:
        try:
            await wait_for_temporary_bytes(root, 16 * MIB)
            await assert_absent(store, KEY)
            # The writer's lock keeps its temporary safe from the sweep while it lives.
            assert await store.remove_stale_temporaries(older_than=0) == 0
        finally:
            writer.send_signal(signal.SIGKILL)
            await writer.wait()
    assert writer.returncode == -signal.SIGKILL
    await assert_absent(store, KEY)
    assert len(temporaries(root)) == 1
    assert await store.remove_stale_temporaries(older_than=0) == 1
    assert temporaries(root) == []
    assert listing(root) == []
