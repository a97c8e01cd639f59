"""The threat model of the data-key RPCs, against a real broker on SQLite and PostgreSQL.

Every rejected call is checked three ways: its precise status and ErrorInfo reason, that stored
state is byte-for-byte unchanged (`state_digest`), and that no key material appears in anything
the client receives. Authentication failures must be indistinguishable: one status, one message.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, cast

import grpc
import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.api import key_broker_pb2 as pb
from broker.core.errors import ERROR_DOMAIN
from broker.core.limits import MAX_ASSOCIATED_DATA_LENGTH, MAX_BATCH_SIZE, MAX_WRAPPED_KEY_LENGTH
from tests.harness import BrokerUnderTest, assert_error, audit_rows, state_digest

FIXED_MESSAGE = "wrapped data key could not be decrypted"
MODEL = "resources/r1/models/m1"
RESULT = "resources/r1/analyzeResults/a1"
AD = b"ctx"

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

if TYPE_CHECKING:
    from broker.api.key_broker_pb2_grpc import KeyBrokerAsyncStub as Stub


def flipped(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def retargeted(wrapped: bytes, version: int) -> bytes:
    """The same bytes with the version field rewritten."""
    return wrapped[:1] + struct.pack(">I", version) + wrapped[5:]


def duration(seconds: int = 0, nanos: int = 0) -> Duration:
    return Duration(seconds=seconds, nanos=nanos)


@dataclass
class Probe:
    """A broker under attack, and what must never leak from it."""

    broker: BrokerUnderTest
    secrets: list[bytes] = field(default_factory=list)

    @property
    def stub(self) -> Stub:
        return self.broker.stub

    async def create(self, resource_id: str = "r1") -> None:
        await self.stub.CreateResource(pb.CreateResourceRequest(resource_id=resource_id))

    async def key(self, name: str = MODEL, ad: bytes = AD) -> pb.GenerateDataKeyResponse:
        reply = await self.stub.GenerateDataKey(
            pb.GenerateDataKeyRequest(name=name, associated_data=ad)
        )
        self.secrets += [reply.plaintext_data_key, reply.wrapped_data_key]
        return reply

    async def rotate(self, name: str = "resources/r1/resourceKeys/models") -> None:
        await self.stub.RotateResourceKey(pb.RotateResourceKeyRequest(name=name))

    @asynccontextmanager
    async def unchanged(self) -> AsyncIterator[None]:
        """Stored state is identical before and after the block."""
        before = await state_digest(self.broker.engine)
        yield
        assert await state_digest(self.broker.engine) == before

    def assert_no_secrets(self, message: str, blob: bytes) -> None:
        for secret in self.secrets:
            for form in (secret.hex(), secret.hex().upper()):
                assert form not in message
                assert form.encode() not in blob
            assert secret not in blob
            assert secret not in message.encode("utf-8", "surrogateescape")

    async def fails(
        self,
        call: Awaitable[object],
        code: grpc.StatusCode,
        reason: str,
        message: str | None = None,
    ) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        exc = err.value
        assert_error(exc, code, reason)
        if message is not None:
            assert exc.details() == message
        status = rpc_status.from_call(cast(grpc.Call, exc))
        assert status is not None
        metadata = b"".join(
            v if isinstance(v, bytes) else v.encode() for _, v in exc.trailing_metadata() or ()
        )
        self.assert_no_secrets(exc.details() or "", status.SerializeToString() + metadata)
        return exc

    async def fixed_error(self, name: str, wrapped: bytes, ad: bytes = AD) -> None:
        """Decrypt and re-wrap both fail with the one authentication error."""
        await self.fails(
            self.stub.DecryptDataKey(
                pb.DecryptDataKeyRequest(name=name, wrapped_data_key=wrapped, associated_data=ad)
            ),
            INVALID,
            "DECRYPTION_FAILED",
            FIXED_MESSAGE,
        )
        await self.fails(
            self.stub.RewrapDataKey(
                pb.RewrapDataKeyRequest(name=name, wrapped_data_key=wrapped, associated_data=ad)
            ),
            INVALID,
            "DECRYPTION_FAILED",
            FIXED_MESSAGE,
        )

    def item(self, status: status_pb2.Status) -> tuple[grpc.StatusCode, str, str]:
        """(code, reason, message) of a failed batch item."""
        assert status.code != grpc.StatusCode.OK.value[0]
        code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
        assert code != grpc.StatusCode.INTERNAL
        assert len(status.details) == 1
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info)
        assert info.domain == ERROR_DOMAIN
        self.assert_no_secrets(status.message, status.SerializeToString())
        return code, info.reason, status.message


@pytest_asyncio.fixture
async def probe(broker: BrokerUnderTest) -> AsyncIterator[Probe]:
    p = Probe(broker)
    yield p
    # Nothing the attacks did was an unexpected error, and no key material reached the trail.
    rows = await audit_rows(broker.engine)
    assert [r for r in rows if r["outcome"] == "INTERNAL" or r["reason"] == "INTERNAL"] == []
    for row in rows:
        p.assert_no_secrets(repr(row), repr(row).encode())


# -- authentication failures: one fixed error ------------------------------------------------------


@pytest.mark.asyncio
async def test_wrong_object_name(probe: Probe) -> None:
    await probe.create()
    key = await probe.key()
    async with probe.unchanged():
        for name in ("resources/r1/models/m2", "resources/r1/models/M1", "resources/r1/models/m1."):
            await probe.fixed_error(name, key.wrapped_data_key)


@pytest.mark.asyncio
async def test_key_under_the_other_purposes_name(probe: Probe) -> None:
    await probe.create()
    model = await probe.key("resources/r1/models/x1")
    result = await probe.key("resources/r1/analyzeResults/x1")
    async with probe.unchanged():
        await probe.fixed_error("resources/r1/analyzeResults/x1", model.wrapped_data_key)
        await probe.fixed_error("resources/r1/models/x1", result.wrapped_data_key)


@pytest.mark.asyncio
async def test_another_resources_key_under_this_resources_name(probe: Probe) -> None:
    await probe.create("r1")
    await probe.create("r2")
    await probe.key(MODEL)
    theirs = await probe.key("resources/r2/models/m1")
    async with probe.unchanged():
        await probe.fixed_error(MODEL, theirs.wrapped_data_key)


@pytest.mark.asyncio
async def test_wrong_associated_data(probe: Probe) -> None:
    await probe.create()
    key = await probe.key(ad=AD)
    unbound = await probe.key(ad=b"")
    async with probe.unchanged():
        for ad in (b"", b"ctx2", b"CTX", b"ctx\x00", b"\x00ctx"):
            await probe.fixed_error(MODEL, key.wrapped_data_key, ad)
        await probe.fixed_error(MODEL, unbound.wrapped_data_key, b"\x00")


@pytest.mark.asyncio
async def test_key_retargeted_to_another_version_after_rotation(probe: Probe) -> None:
    await probe.create()
    v1 = await probe.key()
    await probe.rotate()
    v2 = await probe.key()
    assert v2.wrapped_data_key[1:5] == b"\x00\x00\x00\x02"
    async with probe.unchanged():
        await probe.fixed_error(MODEL, retargeted(v1.wrapped_data_key, 2))
        await probe.fixed_error(MODEL, retargeted(v2.wrapped_data_key, 1))


@pytest.mark.asyncio
async def test_every_flipped_bit_of_a_wrapped_key(probe: Probe) -> None:
    await probe.create()
    key = await probe.key()
    good = key.wrapped_data_key
    assert len(good) == 65 and good[:5] == b"\x01\x00\x00\x00\x01"

    expected: list[tuple[grpc.StatusCode, str]] = []
    for bit in range(len(good) * 8):
        byte, damaged = bit // 8, flipped(good, bit)
        if byte == 0:
            expected.append((INVALID, "UNSUPPORTED_FORMAT_VERSION"))
        elif byte <= 4 and struct.unpack(">I", damaged[1:5])[0] != 0:
            # Only version 1 exists: every other version is an unknown key id (a precise error).
            expected.append((NOT_FOUND, "KEY_VERSION_NOT_FOUND"))
        else:
            expected.append((INVALID, "DECRYPTION_FAILED"))
    assert Counter(expected) == {
        (INVALID, "UNSUPPORTED_FORMAT_VERSION"): 8,
        (NOT_FOUND, "KEY_VERSION_NOT_FOUND"): 31,
        (INVALID, "DECRYPTION_FAILED"): 1 + 60 * 8,
    }

    damaged_keys = [flipped(good, bit) for bit in range(len(good) * 8)]
    async with probe.unchanged():
        for rpc in ("decrypt", "rewrap"):
            got: list[tuple[grpc.StatusCode, str, str]] = []
            for start in range(0, len(damaged_keys), MAX_BATCH_SIZE):
                chunk = damaged_keys[start : start + MAX_BATCH_SIZE]
                results: Sequence[pb.DecryptDataKeyResult | pb.RewrapDataKeyResult]
                if rpc == "decrypt":
                    results = (
                        await probe.stub.BatchDecryptDataKeys(
                            pb.BatchDecryptDataKeysRequest(
                                requests=[
                                    pb.DecryptDataKeyRequest(
                                        name=MODEL, wrapped_data_key=w, associated_data=AD
                                    )
                                    for w in chunk
                                ]
                            )
                        )
                    ).results
                else:
                    results = (
                        await probe.stub.BatchRewrapDataKeys(
                            pb.BatchRewrapDataKeysRequest(
                                requests=[
                                    pb.RewrapDataKeyRequest(
                                        name=MODEL, wrapped_data_key=w, associated_data=AD
                                    )
                                    for w in chunk
                                ]
                            )
                        )
                    ).results
                assert len(results) == len(chunk)
                for result in results:
                    assert not result.HasField("response")
                    got.append(probe.item(result.status))
            for bit, ((code, reason, _), want) in enumerate(zip(got, expected, strict=True)):
                assert (code, reason) == want, (rpc, bit)
            assert {m for _, r, m in got if r == "DECRYPTION_FAILED"} == {FIXED_MESSAGE}


@pytest.mark.asyncio
async def test_truncated_and_extended_wrapped_keys(probe: Probe) -> None:
    await probe.create()
    good = (await probe.key()).wrapped_data_key
    async with probe.unchanged():
        for length in range(1, len(good)):
            await probe.fixed_error(MODEL, good[:length])
        await probe.fixed_error(MODEL, good + b"\x00")
        await probe.fixed_error(MODEL, good + good)
        # The longest accepted length is still just a failed authentication.
        await probe.fixed_error(MODEL, good.ljust(MAX_WRAPPED_KEY_LENGTH, b"\x00"))


# -- structural faults: precise errors -------------------------------------------------------------


@pytest.mark.asyncio
async def test_empty_and_oversized_fields(probe: Probe) -> None:
    await probe.create()
    good = (await probe.key()).wrapped_data_key
    too_long_ad = b"a" * (MAX_ASSOCIATED_DATA_LENGTH + 1)
    async with probe.unchanged():
        for wrapped, reason in (
            (b"", "MISSING_FIELD"),
            (good.ljust(MAX_WRAPPED_KEY_LENGTH + 1, b"\x00"), "FIELD_TOO_LONG"),
            (b"\x00" * (MAX_WRAPPED_KEY_LENGTH + 1), "FIELD_TOO_LONG"),
            (b"\x02" + good[1:], "UNSUPPORTED_FORMAT_VERSION"),
        ):
            await probe.fails(
                probe.stub.DecryptDataKey(
                    pb.DecryptDataKeyRequest(name=MODEL, wrapped_data_key=wrapped)
                ),
                INVALID,
                reason,
            )
            await probe.fails(
                probe.stub.RewrapDataKey(
                    pb.RewrapDataKeyRequest(name=MODEL, wrapped_data_key=wrapped)
                ),
                INVALID,
                reason,
            )
        await probe.fails(
            probe.stub.GenerateDataKey(
                pb.GenerateDataKeyRequest(name=MODEL, associated_data=too_long_ad)
            ),
            INVALID,
            "FIELD_TOO_LONG",
        )
        await probe.fails(
            probe.stub.DecryptDataKey(
                pb.DecryptDataKeyRequest(
                    name=MODEL, wrapped_data_key=good, associated_data=too_long_ad
                )
            ),
            INVALID,
            "FIELD_TOO_LONG",
        )
        await probe.fails(
            probe.stub.RewrapDataKey(
                pb.RewrapDataKeyRequest(
                    name=MODEL, wrapped_data_key=good, associated_data=too_long_ad
                )
            ),
            INVALID,
            "FIELD_TOO_LONG",
        )
    # The limit itself is accepted.
    longest = b"a" * MAX_ASSOCIATED_DATA_LENGTH
    key = await probe.key(ad=longest)
    reply = await probe.stub.DecryptDataKey(
        pb.DecryptDataKeyRequest(
            name=MODEL, wrapped_data_key=key.wrapped_data_key, associated_data=longest
        )
    )
    assert reply.plaintext_data_key == key.plaintext_data_key


BAD_NAMES = [
    "",
    "resources/",
    "resources/R1/models/m",
    "resources/r1/models/",
    "resources/r1/widgets/w",
    "resources/r1/models/m/extra",
    "../etc",
    "resources/r1/models/" + "m" * 280,
    "resources/r1/models/" + "m" * 237,
    "resources/r1/models/" + "m" * 236,
    "resources/r\u00e9sum\u00e9/models/m",
    "resources/r1/models/\uff4d1",
    "r\u00e9sources/r1",
    "resources/r1/models/" + "\u00e9" * 300,
    "resources/r1/models/m1\n",
    "resources/r1\x00",
    "/resources/r1",
    "resources//models/m",
    "resources/r1/",
    " resources/r1",
    "resources/r-/models/m",
    "resources/r1/models/.m",
    "resources/r1/resourceKeys/models/versions/1/../2",
]

WRONG_KIND = {
    "object": [
        "resources/r1",
        "resources/r1/resourceKeys/models",
        "resources/r1/resourceKeys/models/versions/1",
    ],
    "resource": ["r1", MODEL, "resources/r1/resourceKeys/models"],
    "key": [
        "resources/r1",
        MODEL,
        "resources/r1/resourceKeys/widgets",
        "resources/r1/resourceKeys/analyzeResults",
        "resources/r1/resourceKeys/models/versions/1",
    ],
    "version": [
        "resources/r1",
        "resources/r1/resourceKeys/models",
        "resources/r1/resourceKeys/models/versions/0",
        "resources/r1/resourceKeys/models/versions/01",
        "resources/r1/resourceKeys/models/versions/-1",
        "resources/r1/resourceKeys/models/versions/1234567890",
    ],
}


def name_reason(name: str) -> str:
    if not name:
        return "MISSING_FIELD"
    if len(name) > 256:
        return "FIELD_TOO_LONG"
    return "INVALID_NAME"


def name_rpcs(wrapped: bytes) -> list[tuple[str, Callable[[Stub, str], Awaitable[object]]]]:
    """(kind of name expected, a call that sends `name` in its name field)."""
    return [
        ("object", lambda s, n: s.GenerateDataKey(pb.GenerateDataKeyRequest(name=n))),
        (
            "object",
            lambda s, n: s.DecryptDataKey(
                pb.DecryptDataKeyRequest(name=n, wrapped_data_key=wrapped, associated_data=AD)
            ),
        ),
        (
            "object",
            lambda s, n: s.RewrapDataKey(
                pb.RewrapDataKeyRequest(name=n, wrapped_data_key=wrapped, associated_data=AD)
            ),
        ),
        ("resource", lambda s, n: s.GetResource(pb.GetResourceRequest(name=n))),
        ("resource", lambda s, n: s.DeleteResource(pb.DeleteResourceRequest(name=n))),
        ("resource", lambda s, n: s.UndeleteResource(pb.UndeleteResourceRequest(name=n))),
        ("key", lambda s, n: s.RotateResourceKey(pb.RotateResourceKeyRequest(name=n))),
        (
            "key",
            lambda s, n: s.ListResourceKeyVersions(pb.ListResourceKeyVersionsRequest(parent=n)),
        ),
        (
            "version",
            lambda s, n: s.DestroyResourceKeyVersion(pb.DestroyResourceKeyVersionRequest(name=n)),
        ),
        (
            "version",
            lambda s, n: s.RestoreResourceKeyVersion(pb.RestoreResourceKeyVersionRequest(name=n)),
        ),
    ]


@pytest.mark.asyncio
async def test_malformed_and_wrong_kind_names(probe: Probe) -> None:
    await probe.create()
    await probe.rotate()  # so that a well-formed Destroy of version 1 would have succeeded
    key = await probe.key()
    calls = 0
    async with probe.unchanged():
        for kind, rpc in name_rpcs(key.wrapped_data_key):
            for name in BAD_NAMES + WRONG_KIND[kind]:
                await probe.fails(rpc(probe.stub, name), INVALID, name_reason(name))
                calls += 1
    assert calls > 250
    # A batch item gets the same precise error as a single call.
    reply = await probe.stub.BatchGenerateDataKeys(
        pb.BatchGenerateDataKeysRequest(
            requests=[pb.GenerateDataKeyRequest(name=n) for n in BAD_NAMES]
        )
    )
    assert [probe.item(r.status)[:2] for r in reply.results] == [
        (INVALID, name_reason(n)) for n in BAD_NAMES
    ]


@pytest.mark.asyncio
async def test_unknown_resource_and_version(probe: Probe) -> None:
    await probe.create()
    key = await probe.key()
    wrapped = key.wrapped_data_key
    s = probe.stub
    nope = "resources/nope"
    async with probe.unchanged():
        for call in (
            s.GetResource(pb.GetResourceRequest(name=nope)),
            s.GetStatus(pb.GetStatusRequest(name=nope)),
            s.DeleteResource(pb.DeleteResourceRequest(name=nope)),
            s.UndeleteResource(pb.UndeleteResourceRequest(name=nope)),
            s.GenerateDataKey(pb.GenerateDataKeyRequest(name=f"{nope}/models/m1")),
            s.DecryptDataKey(
                pb.DecryptDataKeyRequest(name=f"{nope}/models/m1", wrapped_data_key=wrapped)
            ),
            s.RewrapDataKey(
                pb.RewrapDataKeyRequest(name=f"{nope}/models/m1", wrapped_data_key=wrapped)
            ),
            s.RotateResourceKey(pb.RotateResourceKeyRequest(name=f"{nope}/resourceKeys/models")),
            s.ListResourceKeyVersions(
                pb.ListResourceKeyVersionsRequest(parent=f"{nope}/resourceKeys/results")
            ),
            s.DestroyResourceKeyVersion(
                pb.DestroyResourceKeyVersionRequest(name=f"{nope}/resourceKeys/models/versions/1")
            ),
            s.RestoreResourceKeyVersion(
                pb.RestoreResourceKeyVersionRequest(name=f"{nope}/resourceKeys/models/versions/1")
            ),
        ):
            await probe.fails(call, NOT_FOUND, "RESOURCE_NOT_FOUND")
        v9 = "resources/r1/resourceKeys/models/versions/9"
        await probe.fails(
            s.DestroyResourceKeyVersion(pb.DestroyResourceKeyVersionRequest(name=v9)),
            NOT_FOUND,
            "KEY_VERSION_NOT_FOUND",
        )
        await probe.fails(
            s.RestoreResourceKeyVersion(pb.RestoreResourceKeyVersionRequest(name=v9)),
            NOT_FOUND,
            "KEY_VERSION_NOT_FOUND",
        )
        for version in (2, 9, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF):
            await probe.fails(
                s.DecryptDataKey(
                    pb.DecryptDataKeyRequest(
                        name=MODEL,
                        wrapped_data_key=retargeted(wrapped, version),
                        associated_data=AD,
                    )
                ),
                NOT_FOUND,
                "KEY_VERSION_NOT_FOUND",
            )


@pytest.mark.asyncio
async def test_batch_limits(probe: Probe) -> None:
    await probe.create()
    key = await probe.key()
    n = MAX_BATCH_SIZE + 1
    gen = [pb.GenerateDataKeyRequest(name=MODEL)] * n
    dec = [pb.DecryptDataKeyRequest(name=MODEL, wrapped_data_key=key.wrapped_data_key)] * n
    rew = [pb.RewrapDataKeyRequest(name=MODEL, wrapped_data_key=key.wrapped_data_key)] * n
    s = probe.stub
    async with probe.unchanged():
        for reason, size in (("BATCH_TOO_LARGE", n), ("MISSING_FIELD", 0)):
            await probe.fails(
                s.BatchGenerateDataKeys(pb.BatchGenerateDataKeysRequest(requests=gen[:size])),
                INVALID,
                reason,
            )
            await probe.fails(
                s.BatchDecryptDataKeys(pb.BatchDecryptDataKeysRequest(requests=dec[:size])),
                INVALID,
                reason,
            )
            await probe.fails(
                s.BatchRewrapDataKeys(pb.BatchRewrapDataKeysRequest(requests=rew[:size])),
                INVALID,
                reason,
            )
    # Exactly the limit is accepted.
    reply = await s.BatchGenerateDataKeys(
        pb.BatchGenerateDataKeysRequest(requests=gen[:MAX_BATCH_SIZE])
    )
    assert all(r.status.code == 0 for r in reply.results)
    assert len(reply.results) == MAX_BATCH_SIZE


@pytest.mark.asyncio
async def test_create_resource_rejections(probe: Probe) -> None:
    await probe.create("r1")
    s = probe.stub
    bad_ids = {
        "": "MISSING_FIELD",
        "r" * 300: "FIELD_TOO_LONG",
        "r" * 64: "INVALID_NAME",
        "R1": "INVALID_NAME",
        "1r": "INVALID_NAME",
        "r-": "INVALID_NAME",
        "-r": "INVALID_NAME",
        "r_1": "INVALID_NAME",
        "r 1": "INVALID_NAME",
        "r1\n": "INVALID_NAME",
        "r\u00e9": "INVALID_NAME",
        "resources/r2": "INVALID_NAME",
        "../etc": "INVALID_NAME",
    }
    then = Timestamp(seconds=1_600_000_000)
    async with probe.unchanged():
        for resource_id, reason in bad_ids.items():
            await probe.fails(
                s.CreateResource(pb.CreateResourceRequest(resource_id=resource_id)),
                INVALID,
                reason,
            )
            await probe.fails(
                s.ImportResource(
                    pb.ImportResourceRequest(resource_id=resource_id, create_time=then)
                ),
                INVALID,
                reason,
            )
        await probe.fails(
            s.CreateResource(pb.CreateResourceRequest(resource_id="r1")),
            grpc.StatusCode.ALREADY_EXISTS,
            "RESOURCE_ALREADY_EXISTS",
        )
        await probe.fails(
            s.ImportResource(pb.ImportResourceRequest(resource_id="r1", create_time=then)),
            grpc.StatusCode.ALREADY_EXISTS,
            "RESOURCE_ALREADY_EXISTS",
        )
    # Names are never reused, not even after destruction.
    await s.DeleteResource(pb.DeleteResourceRequest(name="resources/r1", pending_window=duration()))
    async with probe.unchanged():
        await probe.fails(
            s.CreateResource(pb.CreateResourceRequest(resource_id="r1")),
            grpc.StatusCode.ALREADY_EXISTS,
            "RESOURCE_ALREADY_EXISTS",
        )


@pytest.mark.asyncio
async def test_paging_and_window_rejections(probe: Probe) -> None:
    await probe.create()
    await probe.rotate()
    s = probe.stub
    parent = "resources/r1/resourceKeys/models"
    v1 = f"{parent}/versions/1"

    def token(raw: str) -> str:
        import base64

        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    async with probe.unchanged():
        for size in (-1, -(2**31)):
            await probe.fails(
                s.ListResources(pb.ListResourcesRequest(page_size=size)),
                INVALID,
                "INVALID_PAGE_SIZE",
            )
            await probe.fails(
                s.ListResourceKeyVersions(
                    pb.ListResourceKeyVersionsRequest(parent=parent, page_size=size)
                ),
                INVALID,
                "INVALID_PAGE_SIZE",
            )
        garbage = ["garbage", "!!!", "\u00e9", "x" * 600, token("r:"), token(":r1")]
        for page_token in [*garbage, token("v:1")]:
            await probe.fails(
                s.ListResources(pb.ListResourcesRequest(page_token=page_token)),
                INVALID,
                "INVALID_PAGE_TOKEN",
            )
        for page_token in [*garbage, token("r:r1"), token("v:abc"), token("v:1234567890")]:
            await probe.fails(
                s.ListResourceKeyVersions(
                    pb.ListResourceKeyVersionsRequest(parent=parent, page_token=page_token)
                ),
                INVALID,
                "INVALID_PAGE_TOKEN",
            )
        windows = [
            duration(-1),
            duration(nanos=-1),
            duration(-86400 * 7),
            duration(11 * 365 * 86400),
            duration(121 * 86400),
        ]
        for window in windows:
            await probe.fails(
                s.DeleteResource(
                    pb.DeleteResourceRequest(name="resources/r1", pending_window=window)
                ),
                INVALID,
                "INVALID_PENDING_WINDOW",
            )
            await probe.fails(
                s.DestroyResourceKeyVersion(
                    pb.DestroyResourceKeyVersionRequest(name=v1, pending_window=window)
                ),
                INVALID,
                "INVALID_PENDING_WINDOW",
            )


@pytest.mark.asyncio
async def test_data_keys_of_a_resource_scheduled_for_deletion(probe: Probe) -> None:
    await probe.create()
    key = await probe.key()
    s = probe.stub
    # Warm the cache: scheduling the deletion must reach it.
    await s.DecryptDataKey(
        pb.DecryptDataKeyRequest(
            name=MODEL, wrapped_data_key=key.wrapped_data_key, associated_data=AD
        )
    )
    await s.DeleteResource(pb.DeleteResourceRequest(name="resources/r1"))
    dec = pb.DecryptDataKeyRequest(
        name=MODEL, wrapped_data_key=key.wrapped_data_key, associated_data=AD
    )
    rew = pb.RewrapDataKeyRequest(
        name=MODEL, wrapped_data_key=key.wrapped_data_key, associated_data=AD
    )
    scheduled = "RESOURCE_DELETE_SCHEDULED"
    async with probe.unchanged():
        await probe.fails(
            s.GenerateDataKey(pb.GenerateDataKeyRequest(name=MODEL)), PRECONDITION, scheduled
        )
        await probe.fails(
            s.GenerateDataKey(pb.GenerateDataKeyRequest(name=RESULT)), PRECONDITION, scheduled
        )
        await probe.fails(s.DecryptDataKey(dec), PRECONDITION, scheduled)
        await probe.fails(s.RewrapDataKey(rew), PRECONDITION, scheduled)
        batch = await s.BatchDecryptDataKeys(pb.BatchDecryptDataKeysRequest(requests=[dec]))
        assert probe.item(batch.results[0].status)[:2] == (PRECONDITION, scheduled)
        await probe.fails(
            s.RotateResourceKey(
                pb.RotateResourceKeyRequest(name="resources/r1/resourceKeys/models")
            ),
            PRECONDITION,
            "RESOURCE_NOT_ACTIVE",
        )
        await probe.fails(
            s.DeleteResource(pb.DeleteResourceRequest(name="resources/r1")),
            PRECONDITION,
            "RESOURCE_NOT_ACTIVE",
        )
    # Nothing was lost: undeleting brings the key back.
    await s.UndeleteResource(pb.UndeleteResourceRequest(name="resources/r1"))
    reply = await s.DecryptDataKey(dec)
    assert reply.plaintext_data_key == key.plaintext_data_key


@pytest.mark.asyncio
async def test_time_does_not_matter_to_authentication(probe: Probe) -> None:
    """A damaged key stays damaged after rotation by age (the cache is refilled, not bypassed)."""
    await probe.create()
    key = await probe.key()
    damaged = flipped(key.wrapped_data_key, 8 * 40)
    await probe.fixed_error(MODEL, damaged)
    probe.broker.clock.advance(timedelta(days=91))
    from broker.lifecycle.janitor import tick

    assert await tick(probe.broker.running.broker.lifecycle) == (0, 0, 2)
    async with probe.unchanged():
        await probe.fixed_error(MODEL, damaged)


@pytest.mark.asyncio
async def test_malformed_names_do_not_disturb_other_callers(probe: Probe) -> None:
    """Rejected input never reaches the audit trail unvalidated: on PostgreSQL a NUL or an
    over-long name there once failed the whole group commit, and every call in the group."""
    await probe.create()
    key = await probe.key()
    s = probe.stub
    good = pb.DecryptDataKeyRequest(
        name=MODEL, wrapped_data_key=key.wrapped_data_key, associated_data=AD
    )
    bad = {
        "resources/r1/models/m1\x00": "INVALID_NAME",
        "resources/r1/models/" + "m" * 300: "FIELD_TOO_LONG",
    }
    calls: list[Awaitable[pb.DecryptDataKeyResponse]] = []
    for i in range(100):
        calls.append(s.DecryptDataKey(good))
        calls.append(
            s.DecryptDataKey(
                pb.DecryptDataKeyRequest(
                    name=list(bad)[i % 2], wrapped_data_key=key.wrapped_data_key
                )
            )
        )
    async with probe.unchanged():
        results = await asyncio.gather(*calls, return_exceptions=True)
    for i, result in enumerate(results):
        if i % 2 == 0:
            assert isinstance(result, pb.DecryptDataKeyResponse), result
            assert result.plaintext_data_key == key.plaintext_data_key
        else:
            assert isinstance(result, grpc.aio.AioRpcError)
            assert_error(result, INVALID, bad[list(bad)[(i // 2) % 2]])
    rejected = [
        r
        for r in await audit_rows(probe.broker.engine)
        if r["operation"] == "DecryptDataKey" and r["outcome"] == "INVALID_ARGUMENT"
    ]
    assert len(rejected) == 100
    assert {r["resource"] for r in rejected} == {None}
