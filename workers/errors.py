"""The workers' own errors (the rest come from broker.core.errors)."""

from __future__ import annotations

import grpc

from broker.core.errors import KeybrokerError, NotFound

ANALYZE_RESULT_NOT_FOUND = "analyze result does not exist"


class StoredObjectCorrupt(KeybrokerError):
    """A stored object (or its wrapped data key) failed to authenticate. One fixed message."""

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self) -> None:
        super().__init__("STORED_OBJECT_CORRUPT", "stored object failed to authenticate")


def analyze_result_not_found() -> NotFound:
    """The seed's answer for an unknown, deleted or expired analyze result."""
    return NotFound("ANALYZE_RESULT_NOT_FOUND", ANALYZE_RESULT_NOT_FOUND)


def model_not_found(name: str) -> NotFound:
    return NotFound("MODEL_NOT_FOUND", f"{name} does not exist")
