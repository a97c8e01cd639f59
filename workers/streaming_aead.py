"""Streaming encryption of stored objects in Tink's AES-GCM-HKDF streaming AEAD format.

Memory stays bounded by a few segments whatever the object size, and the output interoperates
with Tink's `AesGcmHkdfStreamingKey` (HKDF-SHA256, derived key size 32, ciphertext offset 0,
ciphertext segment size S). `StreamEncryptor` documents the format.
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterable, AsyncIterator, Callable

from cryptography.exceptions import AlreadyFinalized, InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
_NONCE_SIZE = NONCE_PREFIX_SIZE + 4 + 1
HEADER_SIZE = 1 + SALT_SIZE + NONCE_PREFIX_SIZE
TAG_SIZE = 16
MIN_SEGMENT_SIZE = 1024 + HEADER_SIZE + TAG_SIZE
MAX_SEGMENT_SIZE = 64 << 20
DEFAULT_SEGMENT_SIZE = 1 << 20
_MAX_SEGMENTS = 1 << 32
_MESSAGE = "stream did not authenticate"

BytesLike = bytes | bytearray | memoryview


class StreamAuthenticationError(Exception):
    """The ciphertext did not authenticate: wrong key or associated data, damaged, truncated,
    extended or reordered. The message is always the same and says nothing about which."""

    def __init__(self) -> None:
        super().__init__(_MESSAGE)


def _check_segment_size(segment_size: int) -> None:
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(
            f"segment_size must be between {MIN_SEGMENT_SIZE} and {MAX_SEGMENT_SIZE} bytes"
        )


def _segment_aead(key: bytes, associated_data: bytes, salt: BytesLike) -> AESGCM:
    if len(key) != KEY_SIZE:
        raise ValueError(f"key must be {KEY_SIZE} bytes")
    hkdf = HKDF(algorithm=SHA256(), length=KEY_SIZE, salt=bytes(salt), info=associated_data)
    return AESGCM(hkdf.derive(key))


def ciphertext_size(plaintext_size: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The exact ciphertext size (header included) of a `plaintext_size`-byte message."""
    _check_segment_size(segment_size)
    if plaintext_size < 0:
        raise ValueError("plaintext_size must not be negative")
    first = segment_size - HEADER_SIZE - TAG_SIZE
    later = segment_size - TAG_SIZE
    segments = 1 + max(0, -(-(plaintext_size - first) // later))
    return HEADER_SIZE + plaintext_size + segments * TAG_SIZE


class _Segmenter:
    """Cuts a byte stream into segments of `first` bytes, then `later` bytes each, and always
    holds back the last full segment: only the end of the stream says whether it is the final
    one, which is sealed and opened differently. Holds at most one segment, in one buffer that
    is reused (allocating a fresh segment-sized buffer each time costs as much as the copy)."""

    def __init__(self, first: int, later: int) -> None:
        self._limit = first
        self._later = later
        self._buffer = bytearray()
        self._filled = 0

    def _keep(self, view: memoryview) -> None:
        # Through a memoryview: bytearray slice assignment would copy `view` to a temporary.
        room = len(self._buffer) - self._filled
        if len(view) <= room:
            memoryview(self._buffer)[self._filled : self._filled + len(view)] = view
        else:
            memoryview(self._buffer)[self._filled :] = view[:room]
            self._buffer += view[room:]
        self._filled += len(view)

    def feed(self, data: BytesLike, process: Callable[[BytesLike], bytes]) -> bytes:
        """Calls `process` on each segment that is now known not to be the final one and
        returns the concatenated results."""
        view = memoryview(data)
        out: list[bytes] = []
        if self._filled:
            need = self._limit - self._filled
            if len(view) <= need:
                self._keep(view)
                return b""
            self._keep(view[:need])
            out.append(process(memoryview(self._buffer)[: self._limit]))
            self._filled = 0
            self._limit = self._later
            view = view[need:]
        while len(view) > self._limit:
            limit = self._limit
            out.append(process(view[:limit]))
            self._limit = self._later
            view = view[limit:]
        self._keep(view)
        return out[0] if len(out) == 1 else b"".join(out)

    def rest(self) -> memoryview:
        """The held-back bytes: the final segment once the stream has ended."""
        return memoryview(self._buffer)[: self._filled]

    def clear(self) -> None:
        self._buffer = bytearray()
        self._filled = 0


class StreamEncryptor:
    """Encrypts one message of any length, a segment at a time.

    Ciphertext = `header` || the outputs of `update` || the output of `finalize`, in that order:

        header  = 0x28 (the header length, 40) || salt (32 random bytes) || nonce prefix (7 random)
        key_s   = HKDF-SHA256(ikm = key, salt = salt, info = associated_data, length = 32)
        segment i (i = 0, 1, ...) = AES-256-GCM(key_s, nonce_i, plaintext_i, aad = empty)
                                    (len(plaintext_i) + 16 bytes: ciphertext || tag)
        nonce_i = nonce prefix || uint32 big-endian i || 0x01 on the last segment, else 0x00

    The associated data goes only into HKDF. Plaintext segment 0 holds `segment_size - 56` bytes
    and the others `segment_size - 16`, so every ciphertext segment but the last (header counted
    with segment 0) is exactly `segment_size` bytes. The last segment may be short but is never
    empty unless the whole message is: a message that ends on a boundary marks its last full
    segment as last, and an empty message is one empty segment marked last (56 bytes in all).
    The last-flag and the index in the nonce are what make truncation, extension and reordering
    fail to authenticate. This is exactly Tink's AES-GCM-HKDF streaming AEAD (HKDF-SHA256, 32-byte
    derived key, ciphertext offset 0) with ciphertext segment size `segment_size`.

    A fresh salt per message gives each message its own segment key, so the 7-byte random
    prefix and the counter never repeat a nonce under one segment key.
    """

    def __init__(
        self, key: bytes, associated_data: bytes, segment_size: int = DEFAULT_SEGMENT_SIZE
    ) -> None:
        self._start(
            key,
            associated_data,
            segment_size,
            os.urandom(SALT_SIZE),
            os.urandom(NONCE_PREFIX_SIZE),
        )

    def _start(
        self,
        key: bytes,
        associated_data: bytes,
        segment_size: int,
        salt: bytes,
        nonce_prefix: bytes,
    ) -> None:
        _check_segment_size(segment_size)
        self._aead = _segment_aead(key, associated_data, salt)
        self.header = bytes((HEADER_SIZE,)) + salt + nonce_prefix
        self._nonce = bytearray(nonce_prefix.ljust(_NONCE_SIZE, b"\0"))
        self._index = 0
        self._segments = _Segmenter(segment_size - HEADER_SIZE - TAG_SIZE, segment_size - TAG_SIZE)
        self._finalized = False

    def _seal(self, segment: BytesLike, last: bool = False) -> bytes:
        if self._index >= _MAX_SEGMENTS:
            raise ValueError("message too long for this segment size")
        struct.pack_into(">IB", self._nonce, NONCE_PREFIX_SIZE, self._index, last)
        self._index += 1
        return self._aead.encrypt(self._nonce, segment, None)

    def update(self, data: BytesLike) -> bytes:
        """Encrypts `data` and returns the ciphertext segments it completed (often none).

        A full segment is held back until more data arrives or `finalize` is called, because
        the last segment must be marked as last.
        """
        if self._finalized:
            raise AlreadyFinalized("stream already finalized")
        return self._segments.feed(data, self._seal)

    def finalize(self) -> bytes:
        """Returns the last segment, marked as last. The encryptor cannot be used afterwards."""
        if self._finalized:
            raise AlreadyFinalized("stream already finalized")
        self._finalized = True
        last = self._seal(self._segments.rest(), last=True)
        self._segments.clear()
        return last


class StreamDecryptor:
    """Decrypts one message in the format of `StreamEncryptor`, returning only plaintext of
    segments that authenticated.

    Any failure raises `StreamAuthenticationError` and leaves the decryptor unusable. Plaintext
    returned by `update` is authentic but may be followed by a failure in a later segment or in
    `finalize` (a truncated stream is only detected there): a consumer that must not act on a
    partial object waits for `finalize` to return before committing to it.
    """

    def __init__(
        self, key: bytes, associated_data: bytes, segment_size: int = DEFAULT_SEGMENT_SIZE
    ) -> None:
        _check_segment_size(segment_size)
        if len(key) != KEY_SIZE:
            raise ValueError(f"key must be {KEY_SIZE} bytes")
        self._key = key
        self._associated_data = associated_data
        self._aead: AESGCM | None = None
        self._nonce = bytearray(_NONCE_SIZE)
        self._index = 0
        self._header = bytearray()
        self._segments = _Segmenter(segment_size - HEADER_SIZE, segment_size)
        self._finalized = False
        self._failed = False

    def _check_usable(self) -> None:
        if self._failed:
            raise StreamAuthenticationError from None
        if self._finalized:
            raise AlreadyFinalized("stream already finalized")

    def _fail(self) -> StreamAuthenticationError:
        self._failed = True
        self._segments.clear()
        return StreamAuthenticationError()

    def _open(self, segment: BytesLike, last: bool = False) -> bytes:
        if self._index >= _MAX_SEGMENTS or self._aead is None:
            raise InvalidTag
        struct.pack_into(">IB", self._nonce, NONCE_PREFIX_SIZE, self._index, last)
        plaintext = self._aead.decrypt(self._nonce, segment, None)
        self._index += 1
        return plaintext

    def _read_header(self, header: bytearray) -> None:
        if header[0] != HEADER_SIZE:
            raise InvalidTag
        self._aead = _segment_aead(self._key, self._associated_data, header[1 : 1 + SALT_SIZE])
        self._nonce = bytearray(header[1 + SALT_SIZE :].ljust(_NONCE_SIZE, b"\0"))

    def update(self, data: BytesLike) -> bytes:
        """Consumes ciphertext and returns the plaintext of the segments it completed and that
        authenticated. A full segment is held back until more data arrives or `finalize` is
        called, since it may be the last one and must then be checked as such."""
        self._check_usable()
        view = memoryview(data)
        try:
            if self._aead is None:
                taken = HEADER_SIZE - len(self._header)
                self._header += view[:taken]
                view = view[taken:]
                if len(self._header) < HEADER_SIZE:
                    return b""
                self._read_header(self._header)
            return self._segments.feed(view, self._open)
        except InvalidTag:
            raise self._fail() from None

    def finalize(self) -> bytes:
        """Checks and returns the last segment. Raises `StreamAuthenticationError` if the stream
        is truncated or damaged. The decryptor cannot be used afterwards."""
        self._check_usable()
        try:
            plaintext = self._open(self._segments.rest(), last=True)
        except InvalidTag:
            raise self._fail() from None
        self._finalized = True
        self._segments.clear()
        return plaintext


def _pieces(chunk: bytes, size: int) -> list[memoryview]:
    """`chunk` cut into views of at most `size` bytes, so a large chunk yields per segment."""
    view = memoryview(chunk)
    return [view[i : i + size] for i in range(0, len(view), size)] or [view]


async def encrypt_stream(
    key: bytes,
    associated_data: bytes,
    chunks: AsyncIterable[bytes],
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> AsyncIterator[bytes]:
    """Yields the ciphertext of the concatenated `chunks`: the header, then each segment as it
    completes. The event loop is not released while a chunk is encrypted: chunk size bounds the
    pause (AES-GCM runs at a few GB/s)."""
    encryptor = StreamEncryptor(key, associated_data, segment_size)
    yield encryptor.header
    async for chunk in chunks:
        for piece in _pieces(chunk, segment_size):
            out = encryptor.update(piece)
            if out:
                yield out
    yield encryptor.finalize()


async def decrypt_stream(
    key: bytes,
    associated_data: bytes,
    chunks: AsyncIterable[bytes],
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> AsyncIterator[bytes]:
    """Yields the plaintext of each segment once it has authenticated, and raises
    `StreamAuthenticationError` at the first segment that does not (or at the end if the stream
    is truncated): nothing from a bad segment or after it is ever yielded. The caller must not
    treat the object as complete until the iterator is exhausted without error."""
    decryptor = StreamDecryptor(key, associated_data, segment_size)
    async for chunk in chunks:
        for piece in _pieces(chunk, segment_size):
            out = decryptor.update(piece)
            if out:
                yield out
    last = decryptor.finalize()
    if last:
        yield last
