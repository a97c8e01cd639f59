"""Tink's AES-GCM-HKDF streaming format (workers.streaming_aead), as a threat model.

Round trips over the boundary sizes and chunkings, interoperability with the `tink` package in
both directions, frozen vectors, and every way an attacker can alter a stored object: bit flips,
truncation, extension, reordering, splicing, wrong key or associated data. For each, nothing that
did not authenticate is ever handed out, and what is handed out is whole authentic segments.

FROZEN_CIPHERTEXT was produced once by tink 1.16.1 (Python) and pasted in; nothing here
regenerates it. If it stops opening, objects already stored no longer open either.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import struct
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Sequence

import pytest
import tink  # type: ignore[import-untyped]
from cryptography.exceptions import AlreadyFinalized
from tink import proto_keyset_format, secret_key_access, streaming_aead
from tink.proto import (  # type: ignore[import-untyped]
    aes_gcm_hkdf_streaming_pb2,
    common_pb2,
    tink_pb2,
)

from workers.streaming_aead import (
    DEFAULT_SEGMENT_SIZE,
    HEADER_SIZE,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    NONCE_PREFIX_SIZE,
    SALT_SIZE,
    TAG_SIZE,
    StreamAuthenticationError,
    StreamDecryptor,
    StreamEncryptor,
    ciphertext_size,
    decrypt_stream,
    encrypt_stream,
)

KEY = bytes(range(32))
AD = b"resources/r1/objects/o1"
S = MIN_SEGMENT_SIZE
FIRST = S - HEADER_SIZE - TAG_SIZE
LATER = S - TAG_SIZE
MESSAGE = hashlib.shake_256(b"message").digest(FIRST + 2 * LATER + 300)
REJECTED = f"^{re.escape('stream did not authenticate')}$"


def plaintext(size: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)


def seal(data: bytes, segment_size: int = S, key: bytes = KEY, ad: bytes = AD) -> bytes:
    encryptor = StreamEncryptor(key, ad, segment_size)
    return encryptor.header + encryptor.update(data) + encryptor.finalize()


def open_(ciphertext: bytes, segment_size: int = S, key: bytes = KEY, ad: bytes = AD) -> bytes:
    decryptor = StreamDecryptor(key, ad, segment_size)
    return decryptor.update(ciphertext) + decryptor.finalize()


def cut(data: bytes, sizes: Iterable[int]) -> list[bytes]:
    """`data` in consecutive chunks of the given sizes (cycled), the last one possibly short."""
    sizes = list(sizes)
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        chunks.append(data[pos : pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return chunks


def random_sizes(seed: int, high: int) -> list[int]:
    """50 chunk sizes in [1, high], fixed by `seed`."""
    stream = plaintext(200, seed)
    return [1 + int.from_bytes(stream[i : i + 4], "big") % high for i in range(0, 200, 4)]


def split_segments(ciphertext: bytes, segment_size: int = S) -> tuple[bytes, list[bytes]]:
    """(header, ciphertext segments): segment 0 is shorter by the header."""
    header, body = ciphertext[:HEADER_SIZE], ciphertext[HEADER_SIZE:]
    first = segment_size - HEADER_SIZE
    segments = [body[:first]]
    segments += [body[i : i + segment_size] for i in range(first, len(body), segment_size)]
    return header, segments


def segment_starts(size: int) -> list[int]:
    """Plaintext offsets at which segments 0, 1, ... of a `size`-byte message start (S)."""
    return [0, *range(FIRST, max(size, 1), LATER)]


def flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


async def aiter_of(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


# -- tink, through a typed wrapper (tink ships no type information) --------------------------


class _Sink(io.BytesIO):
    """Tink's encrypting stream closes its destination; keep the bytes readable afterwards."""

    def close(self) -> None:
        pass


class TinkStreamingAead:
    """Tink's AES-GCM-HKDF streaming AEAD (HKDF-SHA256, derived key 32) from raw key bytes."""

    def __init__(self, key: bytes, segment_size: int) -> None:
        streaming_aead.register()
        params = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
            ciphertext_segment_size=segment_size,
            derived_key_size=32,
            hkdf_hash_type=common_pb2.SHA256,
        )
        key_proto = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(
            version=0, key_value=key, params=params
        )
        keyset = tink_pb2.Keyset(
            primary_key_id=1,
            key=[
                tink_pb2.Keyset.Key(
                    key_data=tink_pb2.KeyData(
                        type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                        value=key_proto.SerializeToString(),
                        key_material_type=tink_pb2.KeyData.SYMMETRIC,
                    ),
                    status=tink_pb2.ENABLED,
                    key_id=1,
                    output_prefix_type=tink_pb2.RAW,
                )
            ],
        )
        handle = proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)
        self._primitive = handle.primitive(streaming_aead.StreamingAead)

    def encrypt(self, data: bytes, associated_data: bytes) -> bytes:
        sink = _Sink()
        with self._primitive.new_encrypting_stream(sink, associated_data) as stream:
            stream.write(data)
        return sink.getvalue()

    def decrypt(self, ciphertext: bytes, associated_data: bytes) -> bytes:
        source = io.BytesIO(ciphertext)
        with self._primitive.new_decrypting_stream(source, associated_data) as stream:
            data: bytes = stream.read()
        return data


# -- round trips -------------------------------------------------------------------------------

SIZES = [
    0,
    1,
    FIRST - 1,
    FIRST,
    FIRST + 1,
    FIRST + LATER,
    FIRST + 2 * LATER,
    FIRST + 4 * LATER,
    FIRST + LATER + 1,
    FIRST + 4 * LATER + 1,
    FIRST + 3 * LATER - 1,
]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_one_shot(size: int) -> None:
    data = plaintext(size)
    ciphertext = seal(data)
    assert len(ciphertext) == ciphertext_size(size, S)
    assert open_(ciphertext) == data


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("chunking", ["bytes", "random", "spanning"])
def test_round_trip_chunked(size: int, chunking: str) -> None:
    data = plaintext(size, seed=size)
    sizes = {"bytes": [1], "random": random_sizes(size, 2 * S), "spanning": [3 * S + 17]}
    chunk_sizes = sizes[chunking]
    encryptor = StreamEncryptor(KEY, AD, S)
    ciphertext = encryptor.header
    for chunk in cut(data, chunk_sizes):
        ciphertext += encryptor.update(chunk)
    ciphertext += encryptor.finalize()
    assert ciphertext == encryptor.header + _same_salt_one_shot(encryptor.header, data)
    decryptor = StreamDecryptor(KEY, AD, S)
    opened = b"".join(decryptor.update(chunk) for chunk in cut(ciphertext, chunk_sizes))
    assert opened + decryptor.finalize() == data


def _same_salt_one_shot(header: bytes, data: bytes) -> bytes:
    salt, prefix = header[1:33], header[33:]
    encryptor = KnownAnswerEncryptor(KEY, AD, S, salt=salt, nonce_prefix=prefix)
    return encryptor.update(data) + encryptor.finalize()


def test_round_trip_default_segment_size() -> None:
    size = 3 * (1 << 20) + 1
    data = plaintext(size)
    ciphertext = seal(data, segment_size=1 << 20)
    assert len(ciphertext) == ciphertext_size(size)
    assert open_(ciphertext, segment_size=1 << 20) == data


def test_update_hands_out_whole_segments_and_holds_back_the_last_full_one() -> None:
    encryptor = StreamEncryptor(KEY, AD, S)
    assert encryptor.update(plaintext(FIRST)) == b""
    assert len(encryptor.update(b"x")) == S - HEADER_SIZE
    assert encryptor.update(plaintext(LATER - 1)) == b""
    assert len(encryptor.update(plaintext(3 * LATER))) == 3 * S
    last = encryptor.finalize()
    assert len(last) == LATER + TAG_SIZE

    data = plaintext(FIRST + LATER)
    ciphertext = seal(data)
    decryptor = StreamDecryptor(KEY, AD, S)
    assert decryptor.update(ciphertext[: HEADER_SIZE + FIRST + TAG_SIZE]) == b""
    assert decryptor.update(ciphertext[HEADER_SIZE + FIRST + TAG_SIZE : -1]) == data[:FIRST]
    assert decryptor.update(ciphertext[-1:]) == b""
    assert decryptor.finalize() == data[FIRST:]


def test_each_message_gets_a_fresh_salt_and_nonce_prefix() -> None:
    headers = {StreamEncryptor(KEY, AD, S).header for _ in range(100)}
    assert len(headers) == 100
    assert all(len(h) == HEADER_SIZE and h[0] == HEADER_SIZE for h in headers)


def test_empty_message_is_one_segment_marked_last() -> None:
    ciphertext = seal(b"")
    assert len(ciphertext) == HEADER_SIZE + TAG_SIZE == ciphertext_size(0, S)
    assert open_(ciphertext) == b""


@pytest.mark.parametrize("size", [*SIZES, 10 * LATER + 5])
@pytest.mark.parametrize("segment_size", [S, 4096, 1 << 20])
def test_ciphertext_size(size: int, segment_size: int) -> None:
    assert ciphertext_size(size, segment_size) == len(seal(plaintext(size), segment_size))


@pytest.mark.asyncio
@pytest.mark.parametrize("chunk_size", [1, 999, S, 5 * S + 3])
async def test_async_round_trip(chunk_size: int) -> None:
    for size in SIZES:
        data = plaintext(size)
        ciphertext = [
            c async for c in encrypt_stream(KEY, AD, aiter_of(cut(data, [chunk_size])), S)
        ]
        assert all(ciphertext)
        joined = b"".join(ciphertext)
        assert len(joined) == ciphertext_size(size, S)
        chunks = aiter_of(cut(joined, [chunk_size]))
        opened = [p async for p in decrypt_stream(KEY, AD, chunks, S)]
        assert b"".join(opened) == data


@pytest.mark.asyncio
async def test_async_helpers_yield_per_segment_from_a_large_chunk() -> None:
    data = plaintext(FIRST + 5 * LATER)
    ciphertext = [c async for c in encrypt_stream(KEY, AD, aiter_of([data]), S)]
    assert [len(c) for c in ciphertext] == [HEADER_SIZE, *[S - HEADER_SIZE], *[S] * 5]
    opened = [p async for p in decrypt_stream(KEY, AD, aiter_of([b"".join(ciphertext)]), S)]
    assert [len(p) for p in opened] == [FIRST, *[LATER] * 5]


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("key_size", [0, 16, 24, 31, 33, 64])
def test_key_must_be_32_bytes(key_size: int) -> None:
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        StreamEncryptor(bytes(key_size), AD, S)
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        StreamDecryptor(bytes(key_size), AD, S)


@pytest.mark.parametrize("segment_size", [0, 1024, MIN_SEGMENT_SIZE - 1, MAX_SEGMENT_SIZE + 1])
def test_segment_size_limits(segment_size: int) -> None:
    with pytest.raises(ValueError, match="segment_size"):
        StreamEncryptor(KEY, AD, segment_size)
    with pytest.raises(ValueError, match="segment_size"):
        StreamDecryptor(KEY, AD, segment_size)
    with pytest.raises(ValueError, match="segment_size"):
        ciphertext_size(1, segment_size)


def test_segment_size_bounds_are_accepted() -> None:
    assert open_(seal(b"abc", MIN_SEGMENT_SIZE), MIN_SEGMENT_SIZE) == b"abc"
    assert open_(seal(b"abc", MAX_SEGMENT_SIZE), MAX_SEGMENT_SIZE) == b"abc"


def test_negative_plaintext_size() -> None:
    with pytest.raises(ValueError, match="plaintext_size"):
        ciphertext_size(-1, S)


def test_no_use_after_finalize() -> None:
    encryptor = StreamEncryptor(KEY, AD, S)
    ciphertext = encryptor.header + encryptor.finalize()
    with pytest.raises(AlreadyFinalized):
        encryptor.update(b"x")
    with pytest.raises(AlreadyFinalized):
        encryptor.finalize()
    decryptor = StreamDecryptor(KEY, AD, S)
    assert decryptor.update(ciphertext) + decryptor.finalize() == b""
    with pytest.raises(AlreadyFinalized):
        decryptor.update(b"x")
    with pytest.raises(AlreadyFinalized):
        decryptor.finalize()


# -- interoperability with tink ----------------------------------------------------------------

TINK_SEGMENT = 4096
TINK_FIRST = TINK_SEGMENT - HEADER_SIZE - TAG_SIZE
TINK_LATER = TINK_SEGMENT - TAG_SIZE
TINK_SIZES = [
    0,
    1,
    TINK_FIRST - 1,
    TINK_FIRST,
    TINK_FIRST + 1,
    TINK_FIRST + 3 * TINK_LATER,
    TINK_FIRST + 3 * TINK_LATER + 1,
    100_000,
]


@pytest.fixture(scope="module")
def tink_aead() -> TinkStreamingAead:
    return TinkStreamingAead(KEY, TINK_SEGMENT)


@pytest.mark.parametrize("size", TINK_SIZES)
@pytest.mark.parametrize("ad", [AD, b""])
def test_tink_encrypts_we_decrypt(tink_aead: TinkStreamingAead, size: int, ad: bytes) -> None:
    data = plaintext(size, seed=size)
    ciphertext = tink_aead.encrypt(data, ad)
    assert len(ciphertext) == ciphertext_size(size, TINK_SEGMENT)
    assert open_(ciphertext, TINK_SEGMENT, ad=ad) == data
    decryptor = StreamDecryptor(KEY, ad, TINK_SEGMENT)
    chunks = cut(ciphertext, random_sizes(size, 3 * TINK_SEGMENT))
    assert b"".join(decryptor.update(c) for c in chunks) + decryptor.finalize() == data


@pytest.mark.parametrize("size", TINK_SIZES)
@pytest.mark.parametrize("ad", [AD, b""])
def test_we_encrypt_tink_decrypts(tink_aead: TinkStreamingAead, size: int, ad: bytes) -> None:
    data = plaintext(size, seed=size)
    encryptor = StreamEncryptor(KEY, ad, TINK_SEGMENT)
    chunks = cut(data, random_sizes(size, 3 * TINK_SEGMENT))
    ciphertext = encryptor.header + b"".join(encryptor.update(c) for c in chunks)
    ciphertext += encryptor.finalize()
    assert tink_aead.decrypt(ciphertext, ad) == data


def test_tink_rejects_what_we_reject(tink_aead: TinkStreamingAead) -> None:
    data = plaintext(TINK_FIRST + TINK_LATER)
    ciphertext = seal(data, TINK_SEGMENT)
    for bad in (ciphertext[:-TINK_SEGMENT], flipped(ciphertext, 8 * 100)):
        with pytest.raises(tink.TinkError):
            tink_aead.decrypt(bad, AD)
    with pytest.raises(tink.TinkError):
        tink_aead.decrypt(ciphertext, AD + b"x")


# -- frozen vectors ----------------------------------------------------------------------------

FROZEN_KEY = bytes(range(32))
FROZEN_AD = b"resources/r1/objects/o1"
FROZEN_SEGMENT = 1080
FROZEN_PLAINTEXT = bytes(i % 251 for i in range(2100))
FROZEN_CIPHERTEXT = bytes.fromhex(
    "288e0f95992a941fba39a66cd5c6f5310d09d034f565998608bec2c07da24a9ca6f928cbd71cc0cb805ed18ede5c4765"
    "17bd8ee5da75845646501519c2428b91d6e80fde82f6b1ef51f8b7d9a77fca7ac48abd569764c457ba08e3ac33d10f03"
    "84bc399cca6eea696e84c4d1e4d1ff43ef1c52e76fbcb84c824ea0dc2ce057be425c57824299c42a8d2e3dad0bb1211a"
    "5a69d082b628693cc271ae6411b03518333b455aba2927b3cffa93fa4a8fcabdae196441a62ed4f5af6578776a9dbe6d"
    "62b3c0fd053d591b6008087f9f6faf6f5f9029f4f5daa42073c06b2be376171a0150eea42b910febcd5ca9c69b5c8efa"
    "e06d1a86ad9a079977b29a0013acf893c75840c9256300603f4e3cbe90f466776b86c8657fac4d0d3aba7bdf3e06f097"
    "080c7dea6f56462f30446b08c49dbadf0205dc324883322cf2cc867f9aa478be607083de2bb43f3adcad4a6cbd34f08b"
    "fd7bdd852af4456f10e27df14a1d5a6378563fb3cdd13aa8b4f3657f89fc1239f8f463408d096c9d2ac9850577fe456a"
    "b27310107f0a659b88afe91bb52b8e3db7c82b0f08fd01286bfa107422967059438652e79295fd4c7154c7c245118b82"
    "d6280427de54df1d15ca5989e544a351ca35b22d1b7a07c1f2f9f0f5e20d69d9b413d8116ff47fcad6a81053092298f6"
    "0edbd3c9381f63b8579575fbdc021648aad7985bf9e033ca7148bdd987af20d4c221a51ce2996cca79c4338919a81bea"
    "927772d3882e69ec8c554715322cba329b6e82e09e61b2dd0314a732bf5a1f39aa516a464b7eca4943568ec8da015020"
    "de60b728fd99bb8c941db3c4d6b941b3a82cd8977a21f61e29e2fd1eb9f167222dd9d314e8e78a4da3f60c67e22445f6"
    "38f0b560fb8e9c43cc0622debcf1f92740c9730733095318d1f4aa605b4ece9ed089cb376feef1161169ab42492c3112"
    "f5348c721146fecc062d740798d87a9b2667bf81a42c55175dca4edaebac0686ca87414b6171add3731826af5ff6dd60"
    "674937b311735e3792e838c1b82a67f9401906b2ccdd6c9ca800a34f0da3b2723240db620524f4c520be310016f2e86b"
    "f3c16723e3bf00efe0977209c607306afe5032e42176593f81ce13b609ce90b6ac70c72f402eece8a29d69624168d0a0"
    "47d5666f5ea9689f1b44a247c040877169830f5e4f7dfd684bc2e3a7753e26a5d500a8bdac049ad5d5e968702319b35a"
    "9c76bdd0db2dbaaaf632385749b984109de3fc5f3e1a7d0c574701884c7fd6285c39f486c5e07ba4815eb12ac0dad5fb"
    "14224e0c0d7f66962dfb9fa25de109383d6892a65d53ca1b82a1aefbeb06162ac26ffd3e9c3bd6fa05d1ee4acee8c1f5"
    "6f5e826bd7bcc2647c89ebf32b9b05d631f9859db8565ae8edb2f736b40fd7f58e686dfff758a632dbc687c050ce00dc"
    "cbcb01b63b8079992d9e6d3fe07d72685a33fd00f677807daa48994cd9461ac4e05fa1993723b9412d6c710a9ddb94d4"
    "d142f7d487bf7d9807944ad64bbd5b33810055ddb8bb8b37bd76f86287592caef9ae141394990619af25b85d8a7bfe79"
    "fee83b9c209fcea9e4d0a2b1c478bcbf172a43c6a61b6e487923c66f464762e6e9b667389a4720f7063a4c99bffba3e5"
    "26a81095186c773e5bc2be26c890e49214ddbb24adc35fbf48dad1501266d30fc9d4ab6fefbe0ba63a2b8a6f05693a41"
    "def6ba50edf0143f937b3e7bd8cfccdf611a5be7c55b43fb5d840e89b73d1eee41696588fad6a82ec627e0e3dd59232e"
    "91140ab1e7f7c9a000a630cb0a94f62d947c8f73f8bc76836b5388ef8e092ddc8611f6a1d272ae244831a68af22833d0"
    "02c1060e610be7052f6428b918c43feaf557825e0531a76fac2f0eb97eca0eb1a29e5d5eac9fdf5b2d416a9a6b7b357e"
    "43970bd161d4660d7344166568a563370bebaf7cdb202cc2e74b361d98dac24df553d07ef53f86275e37861ef216f09b"
    "1c7efeed0195faa12505cb0b656eb54c3bbfec5f2f7674f8ef09669ed00b1bf191cf83d325aa3bc6e4946532f2a49264"
    "79c76ca4c281e830d7cbaef547dfdff2f4bb657d8920ebd0c487d10eaa39dd43d0a13aad2ba743017ce7459adcfd3b7b"
    "38d9c12c6e226421a402aa2ba00ffdc0c26db1d63ec6c106f2f8f27ece6cdf333f240ec740d82184e5d86bff855842f1"
    "85132783722834003b537f711c231987a5d72425f4fbf5ea974eac6cc25776aab2b7925de0c0e436bbf68615f0bea60c"
    "d8cedeb53e6d0d0672638c062b61cbae98132a053b9485c5e1168a90009935a02b6d04094e582da7cf9401d8585c35b1"
    "9e183f92345c246110454ee13d1ebf21f9f973b5d5285133808fffd390b389ea758d3f747d61a5b5762fc5bbc5a7ff60"
    "587baf208d76c5bf6788edd51a4019c3d36cda0a0ade30e197496aec4d46d088cf3a1dcfe99bf67b6e2b23fecdb69d2a"
    "4bf0bec3d5047057f1e2491dd2610b13c3b0ddc451862f38c911c226bfdf4687065b8da203b07b533d17801d0f0f9abb"
    "33924dba4bb048d916cb63060d42894dbc82e86f72c1cb19b0f3b60d930ec0a829b14d6dcc9b3b3f516262ca578501c5"
    "6a913c36a346aa194151576043f568d051e1aa0cd06f1539a55a60ba817202421f64f7601af3401f2dd08e94103bf45d"
    "760434394f2f2debc608cefafab8466e0006c0f98f59133a6200800b1d51b67e794645f72d82f74fba03e0a2a5874c17"
    "a166cc546a508fd40761413e561e2e1f6def63ea830becb82f5833f002a6b72dfabc52e25aa229d05d6d48634ef7365b"
    "91f6b6f0cb2a6dbca2720c177c460bc6fd9abc2e9d2219b071494ffe65a59fbdd6d42cdd62ce21625c732201d7367173"
    "0fdab987cb66ca44ee472a42b03bd5e4f518e2c318a2b89e33168c2b02e241e54d48bcdc90d620b61612b9fc155f252f"
    "feb39c75ef4504e63898b651e1f1f24c1747273eaa59b4a619634c706ef69e21d85191bdde8c7aa9649eb4a8f57c761b"
    "017fd17317c4148b786f05d7faf15e0a9e9cef3bd20a456006b407e1f1ca70bd56c5818da3e9f9fe6f8f03961dc31020"
    "c580cafb67d3e72ca6dce628bd37eefe485114711e05c2ee273f0ee5"
)


def test_frozen_vector_opens() -> None:
    assert len(FROZEN_CIPHERTEXT) == ciphertext_size(len(FROZEN_PLAINTEXT), FROZEN_SEGMENT)
    assert len(split_segments(FROZEN_CIPHERTEXT, FROZEN_SEGMENT)[1]) == 3
    decryptor = StreamDecryptor(FROZEN_KEY, FROZEN_AD, FROZEN_SEGMENT)
    assert decryptor.update(FROZEN_CIPHERTEXT) + decryptor.finalize() == FROZEN_PLAINTEXT


def test_frozen_vector_is_what_we_write() -> None:
    salt, prefix = FROZEN_CIPHERTEXT[1:33], FROZEN_CIPHERTEXT[33:40]
    encryptor = KnownAnswerEncryptor(
        FROZEN_KEY, FROZEN_AD, FROZEN_SEGMENT, salt=salt, nonce_prefix=prefix
    )
    out = encryptor.header
    for chunk in cut(FROZEN_PLAINTEXT, [1, 700, 13]):
        out += encryptor.update(chunk)
    assert out + encryptor.finalize() == FROZEN_CIPHERTEXT


# -- threat model ------------------------------------------------------------------------------


def feed(decryptor: StreamDecryptor, chunks: Iterable[bytes], into: list[bytes]) -> None:
    """Decrypts `chunks` into `into`, finalizing at the end: what a consumer would have seen."""
    for chunk in chunks:
        into.append(decryptor.update(chunk))
    into.append(decryptor.finalize())


def assert_rejected(ciphertext: bytes, bad_from: int, segment_size: int = S) -> None:
    """`ciphertext` (meant to hold MESSAGE) fails to open, in one shot and streamed; before
    failing, only whole authentic segments ending at or before plaintext offset `bad_from` were
    handed out."""
    boundaries = set(segment_starts(len(MESSAGE)))

    def check(handed_out: bytes) -> None:
        assert MESSAGE.startswith(handed_out)
        assert len(handed_out) in boundaries
        assert len(handed_out) <= bad_from

    with pytest.raises(StreamAuthenticationError) as caught:
        open_(ciphertext, segment_size)
    assert str(caught.value) == "stream did not authenticate"
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None

    for sizes in ([1], [97], [segment_size], [len(ciphertext) + 1], random_sizes(3, 3 * S)):
        decryptor = StreamDecryptor(KEY, AD, segment_size)
        handed_out: list[bytes] = []
        with pytest.raises(StreamAuthenticationError, match=REJECTED):
            feed(decryptor, cut(ciphertext, sizes), handed_out)
        check(b"".join(handed_out))
        with pytest.raises(StreamAuthenticationError):
            decryptor.update(b"")
        with pytest.raises(StreamAuthenticationError):
            decryptor.finalize()

        yielded: list[bytes] = []

        async def consume(chunk_sizes: Sequence[int] = sizes, into: list[bytes] = yielded) -> None:
            chunks = aiter_of(cut(ciphertext, chunk_sizes))
            async for piece in decrypt_stream(KEY, AD, chunks, segment_size):
                into.append(piece)

        with pytest.raises(StreamAuthenticationError, match=REJECTED):
            asyncio.run(consume())
        check(b"".join(yielded))


def sealed_message() -> tuple[bytes, list[bytes]]:
    ciphertext = seal(MESSAGE)
    header, segments = split_segments(ciphertext)
    assert [len(s) for s in segments] == [S - HEADER_SIZE, S, S, 300 + TAG_SIZE]
    return header, segments


def test_the_threat_model_message_opens() -> None:
    header, segments = sealed_message()
    assert open_(header + b"".join(segments)) == MESSAGE


@pytest.mark.parametrize(
    ("key", "ad", "segment_size"),
    [
        (bytes(32), AD, S),
        (KEY[:-1] + b"\x00", AD, S),
        (KEY, b"", S),
        (KEY, AD + b"\x00", S),
        (KEY, AD[:-1], S),
        (KEY, b"resources/r1/objects/o2", S),
        (KEY, AD, S + 1),
        (KEY, AD, 2 * S),
    ],
)
def test_wrong_key_associated_data_or_segment_size(
    key: bytes, ad: bytes, segment_size: int
) -> None:
    ciphertext = seal(MESSAGE)
    with pytest.raises(StreamAuthenticationError, match=REJECTED):
        open_(ciphertext, segment_size, key=key, ad=ad)
    handed_out: list[bytes] = []
    with pytest.raises(StreamAuthenticationError):
        feed(StreamDecryptor(key, ad, segment_size), cut(ciphertext, [S]), handed_out)
    assert b"".join(handed_out) == b""


def test_every_header_bit_is_authenticated() -> None:
    ciphertext = seal(MESSAGE)
    for bit in range(8 * HEADER_SIZE):
        with pytest.raises(StreamAuthenticationError):
            open_(flipped(ciphertext, bit))


def test_flipped_header_fails_before_any_plaintext() -> None:
    ciphertext = seal(MESSAGE)
    for bit in (0, 5 * 8 + 3, 8 * HEADER_SIZE - 1):
        assert_rejected(flipped(ciphertext, bit), bad_from=0)


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("where", ["first", "middle", "tag_first", "tag_last"])
def test_flipped_bit_in_a_segment(index: int, where: str) -> None:
    header, segments = sealed_message()
    segment = segments[index]
    offset = {
        "first": 0,
        "middle": (len(segment) - TAG_SIZE) // 2,
        "tag_first": len(segment) - TAG_SIZE,
        "tag_last": len(segment) - 1,
    }[where]
    segments[index] = flipped(segment, 8 * offset + 6)
    assert_rejected(header + b"".join(segments), bad_from=segment_starts(len(MESSAGE))[index])


def test_every_truncation_fails() -> None:
    ciphertext = seal(MESSAGE)
    for length in range(len(ciphertext)):
        with pytest.raises(StreamAuthenticationError):
            open_(ciphertext[:length])


@pytest.mark.parametrize(
    "length",
    [
        0,
        1,
        HEADER_SIZE - 1,
        HEADER_SIZE,
        HEADER_SIZE + 1,
        HEADER_SIZE + TAG_SIZE,
        S // 2,
        S - 1,
        S,
        S + 1,
        S + S // 2,
        2 * S,
        2 * S + 1,
        3 * S,
        3 * S + TAG_SIZE,
        3 * S + 300 + TAG_SIZE - 1,
    ],
)
def test_truncation_hands_out_only_authentic_segments(length: int) -> None:
    ciphertext = seal(MESSAGE)
    assert length < len(ciphertext)
    complete = 0 if length < S else 1 + (length - S) // S
    assert_rejected(ciphertext[:length], bad_from=segment_starts(len(MESSAGE))[complete])


def test_empty_message_truncated_or_extended() -> None:
    ciphertext = seal(b"")
    for length in range(len(ciphertext)):
        with pytest.raises(StreamAuthenticationError):
            open_(ciphertext[:length])
    for extra in (b"\x00", bytes(TAG_SIZE), bytes(S)):
        with pytest.raises(StreamAuthenticationError):
            open_(ciphertext + extra)


@pytest.mark.parametrize("extra", [b"\x00", bytes(TAG_SIZE), os.urandom(S), os.urandom(S + 1)])
def test_appended_bytes(extra: bytes) -> None:
    header, segments = sealed_message()
    last = segment_starts(len(MESSAGE))[-1]
    assert_rejected(header + b"".join(segments) + extra, bad_from=last)


def test_appended_copy_of_the_last_segment() -> None:
    header, segments = sealed_message()
    last = segment_starts(len(MESSAGE))[-1]
    assert_rejected(header + b"".join(segments) + segments[-1], bad_from=last)


def test_last_flag_stops_extension_and_truncation_at_a_boundary() -> None:
    """Two messages under one salt and nonce prefix (possible only through the test hook), one
    extending the other: the only difference in their shared segments is the last flag, and it
    alone must stop splicing one into the other."""
    short = MESSAGE[: FIRST + LATER]
    salt, prefix = os.urandom(32), os.urandom(7)
    sealed = []
    for data in (short, MESSAGE):
        encryptor = KnownAnswerEncryptor(KEY, AD, S, salt=salt, nonce_prefix=prefix)
        sealed.append(encryptor.header + encryptor.update(data) + encryptor.finalize())
    short_header, short_segments = split_segments(sealed[0])
    header, segments = split_segments(sealed[1])
    assert header == short_header
    assert short_segments[0] == segments[0]
    assert short_segments[1] != segments[1]
    assert_rejected(header + b"".join(short_segments + segments[2:]), bad_from=FIRST)
    # MESSAGE cut after its second segment reads as `short` but for the last flag.
    with pytest.raises(StreamAuthenticationError):
        open_(header + b"".join(segments[:2]))


@pytest.mark.parametrize(("a", "b"), [(1, 2), (0, 1), (2, 3)])
def test_swapped_segments(a: int, b: int) -> None:
    header, segments = sealed_message()
    segments[a], segments[b] = segments[b], segments[a]
    assert_rejected(header + b"".join(segments), bad_from=segment_starts(len(MESSAGE))[a])


@pytest.mark.parametrize("index", range(4))
def test_dropped_segment(index: int) -> None:
    header, segments = sealed_message()
    del segments[index]
    assert_rejected(header + b"".join(segments), bad_from=segment_starts(len(MESSAGE))[index])


@pytest.mark.parametrize("index", range(3))
def test_repeated_segment(index: int) -> None:
    header, segments = sealed_message()
    segments.insert(index, segments[index])
    assert_rejected(header + b"".join(segments), bad_from=segment_starts(len(MESSAGE))[index + 1])


@pytest.mark.parametrize("index", range(4))
def test_segment_spliced_from_another_message(index: int) -> None:
    header, segments = sealed_message()
    _, others = split_segments(seal(MESSAGE))
    segments[index] = others[index]
    assert_rejected(header + b"".join(segments), bad_from=segment_starts(len(MESSAGE))[index])


def test_header_from_another_message() -> None:
    _, segments = sealed_message()
    other_header, _ = split_segments(seal(MESSAGE))
    assert_rejected(other_header + b"".join(segments), bad_from=0)


# -- memory ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_memory_is_bounded_by_a_few_segments() -> None:
    """64 MiB through encrypt_stream and decrypt_stream in 1 MiB chunks, never held whole."""
    chunk_size, chunks = 1 << 20, 64
    tail = os.urandom(chunk_size - 4)
    sent, received = hashlib.sha256(), hashlib.sha256()
    total = 0

    async def source() -> AsyncIterator[bytes]:
        for i in range(chunks):
            chunk = struct.pack(">I", i) + tail
            sent.update(chunk)
            yield chunk

    tracemalloc.start()
    try:
        ciphertext = encrypt_stream(KEY, AD, source())
        async for piece in decrypt_stream(KEY, AD, ciphertext):
            received.update(piece)
            total += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == chunks * chunk_size
    assert received.digest() == sent.digest()
    assert peak < 8 * chunk_size, f"peak traced memory {peak / chunk_size:.1f} MiB"


class KnownAnswerEncryptor(StreamEncryptor):
    """Known-answer tests only: a fixed salt and nonce prefix. Reusing them for two messages
    under one key reuses GCM nonces and destroys confidentiality and integrity."""

    def __init__(
        self,
        key: bytes,
        associated_data: bytes,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        *,
        salt: bytes,
        nonce_prefix: bytes,
    ) -> None:
        if len(salt) != SALT_SIZE or len(nonce_prefix) != NONCE_PREFIX_SIZE:
            raise ValueError("bad salt or nonce prefix length")
        self._start(key, associated_data, segment_size, salt, nonce_prefix)
