"""The service master key: a key file in the data directory that seals service-managed root keys
(or, with `master_key_pkcs11_label` set, a key in a PKCS#11 token: broker.keys.master_key_pkcs11).

File format, version 1 (85 bytes, mode 0600):

    b"KBMK" || 0x01 || key id (16 random bytes) || key (32 bytes)
         || check (HMAC-SHA256(key, b"keybroker/master-key/v1" || key id), 32 bytes)

The check value catches a damaged or edited file before any root key is touched; the key id
(reported as `masterKeys/{hex}`) is stored beside every sealed root key, so a file that does not
belong to the database is refused too. During `keybroker master-key rotate` the new key waits in
`master.key.next` until the database has been re-wrapped under it; see
`broker.keys.master_key_setup`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.core.errors import ConfigurationError
from broker.keys.key_wrapping import Aead

MAGIC = b"KBMK"
FORMAT_V1 = 0x01
KEY_ID_SIZE = 16
KEY_SIZE = 32
_CHECK_LABEL = b"keybroker/master-key/v1"
FILE_SIZE = len(MAGIC) + 1 + KEY_ID_SIZE + KEY_SIZE + 32
FILE_NAME = "master.key"
NEXT_FILE_NAME = "master.key.next"


@dataclass(frozen=True)
class MasterKey:
    """One master key: its id and the AES-256-GCM object that seals root keys with it.

    From the key file: `masterKeys/{hex}` and an AESGCM keyed with the file's key. From a PKCS#11
    token: `pkcs11:{token}/{label}/{cka_id hex}` and an object running AES-GCM inside the token
    (broker.keys.master_key_pkcs11); sealed root keys have the same format either way."""

    key_id: str
    aead: Aead = field(repr=False)


def _check_value(key: bytes, raw_id: bytes) -> bytes:
    return hmac.new(key, _CHECK_LABEL + raw_id, hashlib.sha256).digest()


def _key_id(raw_id: bytes) -> str:
    return f"masterKeys/{raw_id.hex()}"


def encode_file(raw_id: bytes, key: bytes) -> bytes:
    """The version-1 file bytes for a key id and key."""
    return MAGIC + bytes([FORMAT_V1]) + raw_id + key + _check_value(key, raw_id)


def decode_file(data: bytes, path: Path) -> MasterKey:
    """Parses and checks version-1 file bytes; ConfigurationError says what is wrong (not how)."""
    if len(data) != FILE_SIZE or not data.startswith(MAGIC) or data[4] != FORMAT_V1:
        raise ConfigurationError(f"master key file {path} is not a keybroker master key (v1)")
    raw_id = data[5 : 5 + KEY_ID_SIZE]
    key = data[5 + KEY_ID_SIZE : 5 + KEY_ID_SIZE + KEY_SIZE]
    check = data[5 + KEY_ID_SIZE + KEY_SIZE :]
    if not hmac.compare_digest(check, _check_value(key, raw_id)):
        raise ConfigurationError(f"master key file {path} is damaged (check value mismatch)")
    return MasterKey(_key_id(raw_id), AESGCM(key))


def write_new(path: Path) -> MasterKey:
    """Creates a new master key file at `path` (mode 0600, fsynced; never overwrites)."""
    raw_id, key = os.urandom(KEY_ID_SIZE), os.urandom(KEY_SIZE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, encode_file(raw_id, key))
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return MasterKey(_key_id(raw_id), AESGCM(key))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path) -> MasterKey:
    """Reads a master key file, refusing one that group or others may access."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigurationError(f"master key file {path} does not exist") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"master key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    return decode_file(path.read_bytes(), path)


def replace(next_path: Path, path: Path) -> None:
    """Atomically makes the file at `next_path` the master key file at `path`."""
    os.replace(next_path, path)
    _fsync_dir(path.parent)
