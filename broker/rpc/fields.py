"""Fields every keybroker API converts the same way: timestamps, page sizes and page tokens
(AIP-158: opaque to callers, refused when they are not one the call returned)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from broker.core.errors import InvalidArgument
from broker.core.limits import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE


def timestamp(value: datetime) -> Timestamp:
    """A protobuf Timestamp of an aware datetime."""
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def duration(value: timedelta) -> Duration:
    """A protobuf Duration of a timedelta."""
    message = Duration()
    message.FromTimedelta(value)
    return message


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(kind: str, position: str) -> str:
    """Page tokens are opaque to callers: `kind:position`, base64url without padding."""
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def decode_page_token(kind: str, token: str) -> str | None:
    """The position in a token of this kind; None for an empty token."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    prefix, _, position = raw.partition(":")
    if prefix != kind or not position or len(token) > 512:
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not one this call returned")
    return position
