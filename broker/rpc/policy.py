"""The authorization policy: which authenticated identities hold which roles, on which resources.

A policy file is TOML (`.toml`) or JSON (any other name), read once at start-up:

    # TOML
    [identities."spiffe://keybroker.local/admin"]
    roles = ["admin"]

    [identities."spiffe://keybroker.local/app"]
    roles = ["data-plane"]
    resources = ["r1", "resources/r2"]      # optional: only these resources

    // JSON: the same shape
    {"identities": {"spiffe://keybroker.local/auditor": {"roles": ["auditor"]}}}

- An identity is what broker.core.identity reports for a caller: its client certificate's SAN URI
  (else its first SAN DNS name). Matching is exact.
- `roles`: a non-empty list of `admin` (resources, customer-managed keys, rotation, version
  destruction and restore, re-wrap and re-encrypt jobs), `data-plane` (data keys, Storage
  objects) and `auditor` (reading the audit trail). broker.rpc.authz maps every RPC to the roles
  that may call it.
- `resources` (optional): resource ids, bare or as `resources/{id}`. When present, every role of
  the grant applies to those resources only, and calls that name no single resource (listing all
  resources) are refused. Absent: all resources.
- Anything else (an unknown key, role, or a malformed resource id) is refused at start-up: a typo
  must not silently grant or drop access. An identity not in the file holds no role; it may still
  call what broker.rpc.authz allows any authenticated caller (GetStatus, health, reflection).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.core.errors import ConfigurationError
from broker.core.names import RESOURCE_ID_RE

ADMIN = "admin"
DATA_PLANE = "data-plane"
AUDITOR = "auditor"
ROLES = frozenset({ADMIN, DATA_PLANE, AUDITOR})


@dataclass(frozen=True, slots=True)
class Grant:
    """One identity's roles, limited to `resources` (resource ids) unless that is None."""

    roles: frozenset[str]
    resources: frozenset[str] | None = None

    def covers(self, resource_id: str) -> bool:
        return self.resources is None or resource_id in self.resources


@dataclass(frozen=True)
class Policy:
    """Identity -> grant, as read from a policy file (see the module docstring)."""

    grants: Mapping[str, Grant]

    def grant(self, identity: str) -> Grant | None:
        return self.grants.get(identity)


def parse_policy(document: Mapping[str, Any], source: str = "policy") -> Policy:
    """A Policy from a parsed TOML or JSON document; ConfigurationError names the fault."""
    if not isinstance(document, Mapping) or set(document) - {"identities"}:
        raise ConfigurationError(f"{source}: the only top-level key is `identities`")
    identities = document.get("identities", {})
    if not isinstance(identities, Mapping):
        raise ConfigurationError(f"{source}: `identities` must be a table of identity -> grant")
    grants: dict[str, Grant] = {}
    for identity, entry in identities.items():
        where = f"{source}: identity {identity!r}"
        if not identity or not isinstance(entry, Mapping):
            raise ConfigurationError(f"{where}: must be a non-empty name with a table of roles")
        unknown = set(entry) - {"roles", "resources"}
        if unknown:
            raise ConfigurationError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        roles = entry.get("roles")
        if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
            raise ConfigurationError(f"{where}: `roles` must be a non-empty list of role names")
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise ConfigurationError(
                f"{where}: unknown role {bad[0]!r} (roles: {', '.join(sorted(ROLES))})"
            )
        resources = entry.get("resources")
        limited: frozenset[str] | None = None
        if resources is not None:
            if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
                raise ConfigurationError(f"{where}: `resources` must be a list of resource ids")
            ids = [r.removeprefix("resources/") for r in resources]
            bad = [r for r in ids if not RESOURCE_ID_RE.fullmatch(r)]
            if bad:
                raise ConfigurationError(f"{where}: {bad[0]!r} is not a resource id")
            limited = frozenset(ids)
        grants[identity] = Grant(frozenset(roles), limited)
    return Policy(grants)


def load_policy(path: Path) -> Policy:
    """Reads a policy file: TOML when its name ends in .toml, JSON otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the policy file {path}: {exc.strerror}") from None
    try:
        toml = path.suffix == ".toml"
        document = tomllib.loads(raw.decode("utf-8")) if toml else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"policy file {path} does not parse: {exc}") from None
    return parse_policy(document, str(path))
