"""The dev vault: a file-backed key vault inside the data directory, for trying customer-managed
keys with `keybroker up` alone. NOT FOR PRODUCTION: its keys sit in a file beside the data they
protect, which defeats the point of a customer-managed key.

Store: `<data dir>/dev-vault.json` (mode 0600), rewritten atomically (temp file, fsync, rename):

    {"soft_delete": bool, "purge_protection": bool,
     "keys": {NAME: {"deleted": bool,
                     "versions": [{"version": HEX, "kty": "RSA" | "AES", "size": BITS,
                                   "enabled": bool, "material": BASE64}]}}}

`material` is the AES key, or the RSA private key as PKCS#8 DER. The vault's name in a key
reference is "dev". Wrapped format, version 1:

    0x01 || 0x01 || nonce (12) || AES-256-GCM(key, nonce, plaintext, aad = key id)   (AES keys)
    0x01 || 0x02 || RSA-OAEP-SHA256(public key, plaintext)                          (RSA keys)
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.providers.interface import (
    KeyDescription,
    KeyNotFound,
    KeyReference,
    KeyUnavailable,
    RootKeyProvider,
    WrappedKeyInvalid,
)

FILE_NAME = "dev-vault.json"
VAULT_NAME = "dev"
FORMAT_V1 = 0x01
_AES_GCM, _RSA_OAEP_256 = 0x01, 0x02
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@dataclass(frozen=True)
class DevKeyVersion:
    version: str
    kty: str
    size: int
    enabled: bool


class DevVaultStore:
    """Reads and edits the vault file (the CLI's `keybroker dev-vault ...` and the provider)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"soft_delete": True, "purge_protection": True, "keys": {}}
        return cast(dict[str, Any], json.loads(self.path.read_text()))

    def save(self, vault: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".dev-vault-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(vault, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def create_key(self, name: str, kty: str, size: int) -> DevKeyVersion:
        """Adds a key, or a new version of an existing key."""
        kty = kty.upper()
        if kty == "AES" and size == 256:
            material = os.urandom(32)
        elif kty == "RSA" and size in (2048, 3072, 4096):
            material = rsa.generate_private_key(65537, size).private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        else:
            raise ValueError("the dev vault makes AES-256 and RSA-2048/3072/4096 keys")
        vault = self.load()
        entry = vault["keys"].setdefault(name, {"deleted": False, "versions": []})
        entry["deleted"] = False
        version: dict[str, Any] = {
            "version": os.urandom(8).hex(),
            "kty": kty,
            "size": size,
            "enabled": True,
            "material": base64.b64encode(material).decode(),
        }
        entry["versions"].append(version)
        self.save(vault)
        return DevKeyVersion(version["version"], kty, size, True)

    def set_enabled(self, name: str, version: str, enabled: bool) -> None:
        """Enables or disables one version ("" = every version) of a key."""
        vault = self.load()
        for v in _entry(vault, name)["versions"]:
            if version in ("", v["version"]):
                v["enabled"] = enabled
        self.save(vault)

    def set_deleted(self, name: str, deleted: bool) -> None:
        vault = self.load()
        _entry(vault, name)["deleted"] = deleted
        self.save(vault)

    def set_flags(self, *, soft_delete: bool, purge_protection: bool) -> None:
        vault = self.load()
        vault["soft_delete"], vault["purge_protection"] = soft_delete, purge_protection
        self.save(vault)

    def versions(self, name: str) -> list[DevKeyVersion]:
        return [
            DevKeyVersion(v["version"], v["kty"], v["size"], v["enabled"])
            for v in _entry(self.load(), name)["versions"]
        ]


def _entry(vault: dict[str, Any], name: str) -> dict[str, Any]:
    entry = vault["keys"].get(name)
    if entry is None:
        raise KeyError(name)
    return cast(dict[str, Any], entry)


def dev_vault_provider(data_dir: Path) -> RootKeyProvider:
    """The dev vault of a data directory, as a root-key provider."""
    return _DevVaultProvider(DevVaultStore(data_dir / FILE_NAME))


class _DevVaultProvider:
    name = "dev-vault"

    def __init__(self, store: DevVaultStore) -> None:
        self._store = store

    def _version(self, key: KeyReference) -> tuple[dict[str, Any], dict[str, Any]]:
        if key.vault != VAULT_NAME:
            raise KeyNotFound(f"the dev vault is named {VAULT_NAME!r}")
        vault = self._store.load()
        entry = vault["keys"].get(key.key_name)
        if entry is None or entry["deleted"] or not entry["versions"]:
            raise KeyNotFound(f"no key {key.key_name!r} in the dev vault")
        versions = entry["versions"]
        if not key.version:
            return vault, versions[-1]
        for v in versions:
            if v["version"] == key.version:
                return vault, cast(dict[str, Any], v)
        raise KeyNotFound(f"no version {key.version!r} of {key.key_name!r} in the dev vault")

    def _usable(self, key: KeyReference) -> dict[str, Any]:
        _, version = self._version(key)
        if not version["enabled"]:
            raise KeyUnavailable(f"{key.key_id} is disabled")
        return version

    async def wrap(self, key: KeyReference, plaintext: bytes) -> bytes:
        version = await asyncio.to_thread(self._usable, key)
        material = base64.b64decode(version["material"])
        if version["kty"] == "AES":
            nonce = os.urandom(12)
            sealed = AESGCM(material).encrypt(nonce, plaintext, key.key_id.encode())
            return bytes([FORMAT_V1, _AES_GCM]) + nonce + sealed
        private = cast(rsa.RSAPrivateKey, serialization.load_der_private_key(material, None))
        return bytes([FORMAT_V1, _RSA_OAEP_256]) + private.public_key().encrypt(plaintext, _OAEP)

    async def unwrap(self, key: KeyReference, wrapped: bytes) -> bytes:
        version = await asyncio.to_thread(self._usable, key)
        material = base64.b64decode(version["material"])
        expected = _AES_GCM if version["kty"] == "AES" else _RSA_OAEP_256
        if len(wrapped) < 2 or wrapped[0] != FORMAT_V1 or wrapped[1] != expected:
            raise WrappedKeyInvalid("not a dev-vault wrapped key for this key")
        try:
            if expected == _AES_GCM:
                return AESGCM(material).decrypt(wrapped[2:14], wrapped[14:], key.key_id.encode())
            private = cast(rsa.RSAPrivateKey, serialization.load_der_private_key(material, None))
            return private.decrypt(wrapped[2:], _OAEP)
        except (InvalidTag, ValueError):
            raise WrappedKeyInvalid("wrapped key does not authenticate") from None

    async def describe(self, key: KeyReference) -> KeyDescription:
        vault, version = await asyncio.to_thread(self._version, key)
        return KeyDescription(
            reference=key.at(version["version"]),
            key_type=version["kty"],
            key_size=version["size"],
            enabled=version["enabled"],
            recoverable=bool(vault["soft_delete"] and vault["purge_protection"]),
        )
