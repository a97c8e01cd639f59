"""Blobs as files: the embedded default blob store (the contract: workers.blobs.BlobStore).

Layout: blob `key` is the file `root/<key>`, mode 0600, in directories of mode 0700 that are made
on demand and removed again when their last blob goes. A write streams into `.tmp-<random>` in
the blob's own directory while holding an exclusive flock on it, fsyncs the file, renames it over
`root/<key>` and fsyncs the directory. A writer killed mid-write leaves only its temporary; the
kernel drops its lock, and `remove_stale_temporaries` takes unlocked temporaries away.

All file I/O runs in worker threads: writes in batches of about 1 MiB, reads one chunk per hop.
A write overlaps with receiving: each batch is written (and every _SYNC_EVERY bytes flushed to
disk with fdatasync) in a thread while the next batch is being gathered and encrypted, one batch
in flight at most. Without the intermediate flushes nearly the whole object reached the disk only
at the final fsync, after the last byte was received: at the disk's ~0.9 GB/s here that alone
cost about as long as receiving and encrypting a 256 MiB model.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterable
from pathlib import Path

import anyio
from anyio import to_thread

from workers.blobs import DEFAULT_READ_CHUNK, BlobNotFound, BlobStore, check_key

_TEMP_PREFIX = ".tmp-"
_WRITE_BATCH = 1 << 20
_SYNC_EVERY = 8 << 20
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_CREATE_ATTEMPTS = 8


def filesystem_blob_store(root: Path) -> BlobStore:
    """A blob store keeping its blobs under `root` (created, mode 0700, if missing)."""
    root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    return _FilesystemBlobStore(root.absolute())


class _FilesystemBlobStore:
    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, key: str) -> Path:
        return self._root / check_key(key)

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        path = self._path(key)
        # Shielded: a cancellation must not lose the descriptor on its way back from the thread.
        with anyio.CancelScope(shield=True):
            fd, temp = await to_thread.run_sync(self._open_temporary, path)
        loop = asyncio.get_running_loop()
        # The batch being written (in the default executor) while the next one gathers.
        in_flight: asyncio.Future[None] | None = None
        try:
            total = unsynced = 0
            batch = bytearray()
            async for chunk in chunks:
                batch += chunk
                if len(batch) >= _WRITE_BATCH:
                    if in_flight is not None:
                        await in_flight
                    total += len(batch)
                    unsynced += len(batch)
                    sync = unsynced >= _SYNC_EVERY
                    unsynced = 0 if sync else unsynced
                    # Handed over whole (no copy): this side gathers into a fresh buffer.
                    in_flight = loop.run_in_executor(None, _write_batch, fd, batch, sync)
                    batch = bytearray()
            if in_flight is not None:
                await in_flight
            in_flight = None
            total += len(batch)
            await to_thread.run_sync(_write_and_sync, fd, batch)
            # Once the data is durable, publishing is quick and must not be left half done.
            with anyio.CancelScope(shield=True):
                await to_thread.run_sync(self._publish, temp, path)
            return total
        except BaseException:
            with anyio.CancelScope(shield=True):
                if in_flight is not None:
                    # The thread may still be writing to fd: let it finish before the file goes.
                    await asyncio.wait([in_flight])
                    if not in_flight.cancelled():
                        in_flight.exception()  # retrieved: the error being raised comes first
                await to_thread.run_sync(self._discard, temp)
            raise
        finally:
            # Closed last: the lock keeps the sweep off the temporary until it is gone.
            os.close(fd)

    def read(self, key: str, chunk_size: int = DEFAULT_READ_CHUNK) -> AsyncGenerator[bytes, None]:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        return self._stream(key, self._path(key), chunk_size)

    async def _stream(self, key: str, path: Path, chunk_size: int) -> AsyncGenerator[bytes, None]:
        # One descriptor for the whole stream: a concurrent replace or delete cannot tear it.
        with anyio.CancelScope(shield=True):
            fd = await to_thread.run_sync(_open_blob, path)
        if fd is None:
            raise BlobNotFound(key)
        try:
            while chunk := await to_thread.run_sync(os.read, fd, chunk_size):
                yield chunk
        finally:
            os.close(fd)

    async def delete(self, key: str) -> bool:
        return await to_thread.run_sync(self._delete, self._path(key))

    async def exists(self, key: str) -> bool:
        return await to_thread.run_sync(_regular_size, self._path(key)) is not None

    async def size(self, key: str) -> int:
        size = await to_thread.run_sync(_regular_size, self._path(key))
        if size is None:
            raise BlobNotFound(key)
        return size

    async def remove_stale_temporaries(self, older_than: float) -> int:
        if older_than < 0:
            raise ValueError("older_than must not be negative")
        return await to_thread.run_sync(self._sweep, time.time() - older_than)

    def _open_temporary(self, path: Path) -> tuple[int, Path]:
        if path.is_dir():
            raise ValueError(f"blob key {path.relative_to(self._root)} is a prefix of other keys")
        # A concurrent delete may prune a directory on the way between its creation and the open.
        for _ in range(_CREATE_ATTEMPTS):
            temp = path.parent / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
            try:
                self._make_directories(path.parent)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
            except FileNotFoundError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, temp
        raise OSError(f"could not create a temporary in {path.parent}")

    def _make_directories(self, directory: Path) -> None:
        current = self._root
        for part in directory.relative_to(self._root).parts:
            parent, current = current, current / part
            try:
                os.mkdir(current, _DIR_MODE)
            except FileExistsError:
                # FileNotFoundError when pruned meanwhile: the caller tries again.
                if not stat.S_ISDIR(os.stat(current).st_mode):
                    key = current.relative_to(self._root)
                    raise ValueError(f"blob {key} is in the way of a longer key") from None
            else:
                # The new entry must be durable before a blob inside it can be.
                _fsync_directory(parent)

    def _publish(self, temp: Path, path: Path) -> None:
        os.replace(temp, path)
        self._fsync_nearest(path.parent)

    def _discard(self, temp: Path) -> None:
        temp.unlink(missing_ok=True)
        self._prune(temp.parent)

    def _delete(self, path: Path) -> bool:
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        self._fsync_nearest(path.parent)
        self._prune(path.parent)
        return True

    def _fsync_nearest(self, directory: Path) -> None:
        """Makes the last change in `directory` durable, or its removal if a concurrent delete
        pruned it: the nearest surviving ancestor records that."""
        while True:
            try:
                _fsync_directory(directory)
            except FileNotFoundError:
                if directory == self._root:
                    raise
                directory = directory.parent
            else:
                return

    def _prune(self, directory: Path) -> None:
        """Removes `directory` and its parents below the root while they are empty."""
        while directory != self._root:
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = directory.parent

    def _sweep(self, cutoff: float) -> int:
        removed, touched = 0, set[str]()
        for directory, _, files in os.walk(self._root):
            for name in files:
                if name.startswith(_TEMP_PREFIX) and _remove_if_abandoned(
                    Path(directory, name), cutoff
                ):
                    removed += 1
                    touched.add(directory)
        for directory in touched:
            self._prune(Path(directory))
        return removed


def _write_all(fd: int, data: bytes | bytearray) -> None:
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])


def _write_batch(fd: int, data: bytearray, sync: bool) -> None:
    _write_all(fd, data)
    if sync:
        os.fdatasync(fd)


def _write_and_sync(fd: int, data: bytearray) -> None:
    _write_all(fd, data)
    os.fsync(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_blob(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _regular_size(path: Path) -> int | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _remove_if_abandoned(temp: Path, cutoff: float) -> bool:
    """Unlinks a temporary untouched since `cutoff` whose writer is gone (its lock released)."""
    try:
        fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_mtime >= cutoff:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            os.unlink(temp)
        except FileNotFoundError:
            return False  # its writer published it just before letting go of the lock
        return True
    finally:
        os.close(fd)
