"""Streaming AEAD throughput: workers.streaming_aead against raw AES-GCM and against tink.

On the same random bytes, with 1 MiB segments (Tink's AES-GCM-HKDF format, as stored objects use):
- ours: StreamEncryptor / StreamDecryptor fed 1 MiB chunks, the way a worker streams an object;
- raw AES-GCM: one cryptography AESGCM object sealing / opening the same plaintext segments with
  a counter nonce, no buffering, no output assembly: the ceiling for any implementation;
- tink: the `tink` package's streaming AEAD on the same format, through BytesIO, given the whole
  message in one write and read back in one read.

Each figure is the best of `repeats` runs, in MB/s (10**6 bytes of plaintext per second). The
figures move with the machine; compare the ratios, which are measured side by side.

Run: python -m tests.benchmarks.stream [SIZE_MB]
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.workers.test_streaming_aead import TinkStreamingAead
from workers.streaming_aead import (
    HEADER_SIZE,
    TAG_SIZE,
    StreamDecryptor,
    StreamEncryptor,
)

SEGMENT_SIZE = 1 << 20
CHUNK_SIZE = 1 << 20
AD = b"resources/bench/objects/o1"


def _best_seconds(work: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def _chunks(data: bytes) -> list[memoryview]:
    view = memoryview(data)
    return [view[i : i + CHUNK_SIZE] for i in range(0, len(view), CHUNK_SIZE)]


def run(size_mb: int, repeats: int = 5) -> dict[str, float]:
    key = os.urandom(32)
    data = os.urandom(size_mb << 20)

    # Outputs stay a list of pieces, as a worker would write them out; joining them would time
    # a copy of the whole object.
    def ours_encrypt() -> list[bytes]:
        encryptor = StreamEncryptor(key, AD, SEGMENT_SIZE)
        out = [encryptor.header]
        out += [encryptor.update(chunk) for chunk in _chunks(data)]
        out.append(encryptor.finalize())
        return out

    ciphertext = b"".join(ours_encrypt())

    def ours_decrypt() -> list[bytes]:
        decryptor = StreamDecryptor(key, AD, SEGMENT_SIZE)
        out = [decryptor.update(chunk) for chunk in _chunks(ciphertext)]
        out.append(decryptor.finalize())
        return out

    assert b"".join(ours_decrypt()) == data

    aead = AESGCM(key)
    first = SEGMENT_SIZE - HEADER_SIZE - TAG_SIZE
    later = SEGMENT_SIZE - TAG_SIZE
    view = memoryview(data)
    bounds = [0, *range(first, len(data), later), len(data)]
    segments = [view[a:b] for a, b in itertools.pairwise(bounds)]

    def raw_encrypt() -> list[bytes]:
        return [aead.encrypt(i.to_bytes(12, "big"), s, None) for i, s in enumerate(segments)]

    sealed = raw_encrypt()

    def raw_decrypt() -> list[bytes]:
        return [aead.decrypt(i.to_bytes(12, "big"), s, None) for i, s in enumerate(sealed)]

    tink_aead = TinkStreamingAead(key, SEGMENT_SIZE)
    tink_ciphertext = tink_aead.encrypt(data, AD)
    assert tink_aead.decrypt(ciphertext, AD) == data

    size = len(data) / 1e6
    figures = {
        "ours_encrypt": size / _best_seconds(ours_encrypt, repeats),
        "ours_decrypt": size / _best_seconds(ours_decrypt, repeats),
        "raw_aesgcm_encrypt": size / _best_seconds(raw_encrypt, repeats),
        "raw_aesgcm_decrypt": size / _best_seconds(raw_decrypt, repeats),
        "tink_encrypt": size / _best_seconds(lambda: tink_aead.encrypt(data, AD), repeats),
        "tink_decrypt": size
        / _best_seconds(lambda: tink_aead.decrypt(tink_ciphertext, AD), repeats),
    }
    return {"size_mb": float(size_mb)} | {f"{k}_MBps": round(v, 1) for k, v in figures.items()}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 64), indent=2))
