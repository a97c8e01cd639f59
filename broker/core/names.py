"""Resource names (AIP-122): the only place that parses or builds them.

    resources/{resource}
    resources/{resource}/resourceKeys/{purpose}
    resources/{resource}/resourceKeys/{purpose}/versions/{version}
    resources/{resource}/models/{model}
    resources/{resource}/analyzeResults/{analyze_result}

{resource} is 1-63 characters of lower-case letters, digits and hyphens, starting with a letter
and not ending with a hyphen (RFC 1034). Object ids are 1-64 characters of letters, digits and
`._~-`, starting with a letter or digit. Purpose is `models` or `results`; an object's purpose
follows from its collection and a caller cannot choose it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from broker.core.errors import InvalidArgument
from broker.core.limits import MAX_NAME_LENGTH

_RESOURCE_ID = r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?"
_OBJECT_ID = r"[A-Za-z0-9][A-Za-z0-9._~-]{0,63}"
RESOURCE_ID_RE = re.compile(_RESOURCE_ID)
_RESOURCE_RE = re.compile(rf"resources/({_RESOURCE_ID})")
_KEY_RE = re.compile(rf"resources/({_RESOURCE_ID})/resourceKeys/(models|results)")
_VERSION_RE = re.compile(
    rf"resources/({_RESOURCE_ID})/resourceKeys/(models|results)/versions/([1-9][0-9]{{0,8}})"
)
_OBJECT_RE = re.compile(rf"resources/({_RESOURCE_ID})/(models|analyzeResults)/({_OBJECT_ID})")


class Purpose(enum.Enum):
    """What a resource key protects. The value is the name segment and the stored form."""

    MODELS = "models"
    RESULTS = "results"


_COLLECTION_PURPOSE = {"models": Purpose.MODELS, "analyzeResults": Purpose.RESULTS}


@dataclass(frozen=True, slots=True)
class ObjectName:
    """A stored object's name, e.g. resources/r1/models/m1."""

    name: str
    resource_id: str
    purpose: Purpose
    object_id: str


@dataclass(frozen=True, slots=True)
class KeyVersionName:
    """resources/{resource}/resourceKeys/{purpose}/versions/{version}."""

    resource_id: str
    purpose: Purpose
    version: int

    def __str__(self) -> str:
        return key_version_name(self.resource_id, self.purpose, self.version)


def _check(field: str, value: str) -> None:
    if not value:
        raise InvalidArgument("MISSING_FIELD", f"{field} is required")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            "FIELD_TOO_LONG", f"{field} is longer than {MAX_NAME_LENGTH} characters"
        )


def _malformed(field: str, expected: str) -> InvalidArgument:
    return InvalidArgument("INVALID_NAME", f"{field} must be of the form {expected}")


def check_resource_id(resource_id: str, field: str = "resource_id") -> str:
    """Validates a bare {resource} id."""
    _check(field, resource_id)
    if not RESOURCE_ID_RE.fullmatch(resource_id):
        raise InvalidArgument(
            "INVALID_NAME",
            f"{field} must be 1-63 lower-case letters, digits or hyphens, starting with a letter",
        )
    return resource_id


def parse_resource(name: str, field: str = "name") -> str:
    """resources/{resource} -> resource id."""
    _check(field, name)
    m = _RESOURCE_RE.fullmatch(name)
    if not m:
        raise _malformed(field, "resources/{resource}")
    return m.group(1)


def parse_resource_key(name: str, field: str = "name") -> tuple[str, Purpose]:
    """resources/{resource}/resourceKeys/{purpose} -> (resource id, purpose)."""
    _check(field, name)
    m = _KEY_RE.fullmatch(name)
    if not m:
        raise _malformed(field, "resources/{resource}/resourceKeys/{models|results}")
    return m.group(1), Purpose(m.group(2))


def parse_key_version(name: str, field: str = "name") -> KeyVersionName:
    """resources/{resource}/resourceKeys/{purpose}/versions/{version}."""
    _check(field, name)
    m = _VERSION_RE.fullmatch(name)
    if not m:
        raise _malformed(field, "resources/{resource}/resourceKeys/{models|results}/versions/{n}")
    return KeyVersionName(m.group(1), Purpose(m.group(2)), int(m.group(3)))


def parse_object(name: str, field: str = "name") -> ObjectName:
    """An object name -> its parts; the purpose follows from the collection."""
    _check(field, name)
    m = _OBJECT_RE.fullmatch(name)
    if not m:
        raise _malformed(
            field,
            "resources/{resource}/models/{model} or resources/{resource}/analyzeResults/{id}",
        )
    return ObjectName(name, m.group(1), _COLLECTION_PURPOSE[m.group(2)], m.group(3))


def resource_name(resource_id: str) -> str:
    return f"resources/{resource_id}"


def key_version_name(resource_id: str, purpose: Purpose, version: int) -> str:
    return f"resources/{resource_id}/resourceKeys/{purpose.value}/versions/{version}"
