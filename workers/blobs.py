"""The blob store contract: where the workers keep encrypted objects as opaque bytes.

Implementations: the filesystem (`workers.fs_blobs`, the embedded default); Azure Blob Storage
later, behind the same five operations and the crash sweep.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Protocol

MAX_KEY_LENGTH = 512
MAX_SEGMENT_LENGTH = 255
"""A filesystem's limit for one name; keys stay portable to every store."""
DEFAULT_READ_CHUNK = 1 << 20

_KEY_CHARS = re.compile(r"[A-Za-z0-9_./-]+")


class BlobNotFound(LookupError):
    """No blob is stored under the key."""


def check_key(key: str) -> str:
    """Returns `key` if it is a valid blob key, else raises ValueError.

    A key is 1 to MAX_KEY_LENGTH characters of ASCII letters, digits and `-_./`, split by `/`
    into non-empty segments of at most MAX_SEGMENT_LENGTH characters. No segment may start with
    `.`: that excludes `.` and `..` (no key escapes the store or aliases another) and keeps the
    names stores use for their own temporaries out of the key space.
    """
    if not key or len(key) > MAX_KEY_LENGTH or not _KEY_CHARS.fullmatch(key):
        raise ValueError(f"invalid blob key {key!r:.80}")
    for segment in key.split("/"):
        if not segment or segment.startswith(".") or len(segment) > MAX_SEGMENT_LENGTH:
            raise ValueError(f"invalid blob key {key!r:.80}")
    return key


class BlobStore(Protocol):
    """Opaque bytes under opaque keys. Implementations are safe to call concurrently.

    Every method validates its key with `check_key` (ValueError when invalid). Keys are made by
    the workers and never reused; one key must not be a path prefix of another ("a/b" beside
    "a/b/c"): a store on a filesystem cannot hold both and raises ValueError on such a write.

    Atomic visibility: a blob becomes visible only when `write` has stored and made durable all
    of it. Until then every reader sees the previous blob under the key, or none; a reader that
    started before a replace reads the old blob to its end. No partial blob is ever visible, not
    even after a crash or power loss mid-write.

    Durability: when `write` or `delete` returns, its effect survives a crash.
    """

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Streams `chunks` into the blob `key`, replacing any blob there atomically, and returns
        the number of bytes written.

        If `chunks` raises, the task is cancelled or an I/O error occurs before the commit,
        the key is unchanged and the temporary is removed. The commit itself (the final rename
        and sync) is not interrupted by cancellation; only an I/O error there leaves it unknown
        whether the new blob is visible, and the caller writes again."""
        ...

    def read(self, key: str, chunk_size: int = DEFAULT_READ_CHUNK) -> AsyncGenerator[bytes, None]:
        """Streams the blob in pieces of at most `chunk_size` bytes (an empty blob yields
        nothing). Raises ValueError at the call, BlobNotFound from the first iteration. The whole
        stream comes from one version of the blob, whatever replaces or deletes it meanwhile.
        A generator, so that a caller leaving early can close it (`contextlib.aclosing`) and the
        store releases the blob at once."""
        ...

    async def delete(self, key: str) -> bool:
        """Removes the blob; True if there was one. Idempotent: deleting a missing blob is not an
        error."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether a complete blob is visible under `key`."""
        ...

    async def size(self, key: str) -> int:
        """The blob's length in bytes. Raises BlobNotFound."""
        ...

    async def remove_stale_temporaries(self, older_than: float) -> int:
        """Crash clean-up: removes the temporaries that writers killed mid-write left behind,
        untouched for more than `older_than` seconds, and returns how many it removed. Never
        touches a visible blob or the temporary of a write still in progress. A store whose
        backend discards unfinished uploads by itself returns 0."""
        ...
