"""The broker's errors: one small hierarchy, each class carrying its gRPC status code.

Every message here is safe to send to a client: it names the faulty field or rule, never key
material, plaintext or the reason an authentication failed. One interceptor
(`broker.rpc.interceptors.ErrorInterceptor`) turns these into a status with a google.rpc.ErrorInfo
whose `reason` is the `reason` below and whose domain is `ERROR_DOMAIN`.
"""

from __future__ import annotations

import grpc

ERROR_DOMAIN = "keybroker"


class KeybrokerError(Exception):
    """Base class: a client-safe message, a gRPC status code and an ErrorInfo reason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        # Versioned key ids involved (for the audit record; never sent to the client).
        self.key_ids: tuple[str, ...] = ()


class InvalidArgument(KeybrokerError):
    """A request field is missing, malformed or too large."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KeybrokerError):
    """The named resource, key version or object does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(KeybrokerError):
    """The name is taken (names are never reused, not even after destruction)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(KeybrokerError):
    """The target exists but its state forbids the call (scheduled for deletion, current, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(KeybrokerError):
    """A limit was reached; retrying later may work."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(KeybrokerError):
    """A dependency (database, key vault) could not be reached; retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


DECRYPTION_FAILED_MESSAGE = "wrapped data key could not be decrypted"


class DecryptionFailed(InvalidArgument):
    """Authentication of a wrapped key failed. One fixed message, whatever the cause: no oracle."""

    def __init__(self) -> None:
        super().__init__("DECRYPTION_FAILED", DECRYPTION_FAILED_MESSAGE)


class StoredKeyCorrupt(KeybrokerError):
    """Stored key material failed to authenticate: the database (or a key file) was damaged or
    tampered with. Not the caller's fault, and nothing is said about which layer failed."""

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self) -> None:
        super().__init__("STORED_KEY_CORRUPT", "stored key material failed to authenticate")


class ConfigurationError(Exception):
    """The broker cannot start with these settings or this data directory; the message says why."""
