"""A real SoftHSM2 token for the PKCS#11 provider tests, in a temporary directory.

SoftHSM2 reads SOFTHSM2_CONF, and scans its token directory, only when the module is initialised
(C_Initialize, on first load in the process): a token initialised afterwards stays invisible
until C_Finalize and C_Initialize again, which would close every open session. So a test session
calls `softhsm_conf()` and `init_token()` before anything loads the module, once, and tests tell
their keys apart by label, not by token. Both refuse (RuntimeError) once the module is loaded.

Every helper holds the provider's PKCS11_LOCK around its PKCS#11 calls (python-pkcs11 disables
the module's own locking). Login state belongs to the process, so a helper logs in only when
nobody is logged in yet, and then logs out again when done. If SoftHSM2 is not installed this
raises RuntimeError; it never skips (``scripts/install`` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import UserAlreadyLoggedIn
from pkcs11.types import Session
from pkcs11.util.ec import encode_named_curve_parameters
from pkcs11.util.rsa import decode_rsa_private_key, decode_rsa_public_key

from broker.providers.pkcs11_session import PKCS11_LOCK

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
# The test session's one token (tests/conftest.py: softhsm_token); tests use their own key labels.
TOKEN = "kb-test"
PIN = "kb-user-pin-4711"
SO_PIN = "kb-so-pin-0815"
_UTIL = "softhsm2-util"
_USAGE: dict[ObjectClass, tuple[Attribute, ...]] = {
    ObjectClass.SECRET_KEY: (
        Attribute.ENCRYPT,
        Attribute.DECRYPT,
        Attribute.WRAP,
        Attribute.UNWRAP,
    ),
    ObjectClass.PUBLIC_KEY: (Attribute.ENCRYPT, Attribute.WRAP),
    ObjectClass.PRIVATE_KEY: (Attribute.DECRYPT, Attribute.UNWRAP),
}
_NOT_EXTRACTABLE: dict[Attribute, Any] = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}


def _require_softhsm() -> str:
    util = shutil.which(_UTIL)
    if util is None or not Path(MODULE).is_file():
        raise RuntimeError(
            f"SoftHSM2 not found ({MODULE} and {_UTIL} are needed): run scripts/install"
        )
    return util


def module_loaded() -> bool:
    """Whether this process has the SoftHSM2 module loaded (by the provider or a helper)."""
    real = os.path.realpath(MODULE)
    maps = Path("/proc/self/maps").read_text().splitlines()
    return any(line.endswith(real) for line in maps)


def _refuse_if_loaded(what: str) -> None:
    if module_loaded():
        raise RuntimeError(
            f"{what} must happen before the SoftHSM2 module loads in this process: it reads "
            "SOFTHSM2_CONF and the token directory only in C_Initialize"
        )


def softhsm_conf(directory: Path) -> Path:
    """Writes a private SoftHSM2 configuration under `directory` and points SOFTHSM2_CONF at it."""
    _require_softhsm()
    _refuse_if_loaded("softhsm_conf()")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return conf


def init_token(label: str, so_pin: str, pin: str) -> None:
    """Initialises a token in the first free slot (softhsm2-util --init-token --free)."""
    util = _require_softhsm()
    if "SOFTHSM2_CONF" not in os.environ:
        raise RuntimeError("call softhsm_conf() first")
    _refuse_if_loaded("init_token()")
    args = ["--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", pin]
    done = subprocess.run([util, *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"softhsm2-util --init-token failed: {done.stdout}{done.stderr}")


@contextmanager
def open_session(token_label: str, pin: str) -> Iterator[Session]:
    """A read/write session on the token, holding PKCS11_LOCK until closed."""
    with PKCS11_LOCK:
        token = pkcs11.lib(MODULE).get_token(token_label=token_label)
        try:
            session = token.open(rw=True, user_pin=pin)
        except UserAlreadyLoggedIn:
            session = token.open(rw=True)
        try:
            yield session
        finally:
            session.close()  # logs out only if this session logged in


def create_aes_key(
    token_label: str,
    pin: str,
    label: str,
    key_id: bytes,
    *,
    bits: int = 256,
    value: bytes | None = None,
) -> None:
    """Generates an AES key in the token, or imports `value` (for known-answer tests)."""
    with open_session(token_label, pin) as session:
        if value is None:
            session.generate_key(
                KeyType.AES, bits, id=key_id, label=label, store=True, template=_NOT_EXTRACTABLE
            )
            return
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: value,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.LABEL: label,
                Attribute.ID: key_id,
                **dict.fromkeys(_USAGE[ObjectClass.SECRET_KEY], True),
                **_NOT_EXTRACTABLE,
            }
        )


def create_rsa_key(token_label: str, pin: str, label: str, key_id: bytes, bits: int) -> None:
    """Generates an RSA key pair in the token (RSA-4096 takes seconds: use it sparingly)."""
    with open_session(token_label, pin) as session:
        session.generate_keypair(
            KeyType.RSA, bits, id=key_id, label=label, store=True, private_template=_NOT_EXTRACTABLE
        )


def import_rsa_key(
    token_label: str, pin: str, label: str, key_id: bytes, key: rsa.RSAPrivateKey
) -> None:
    """Imports an RSA key pair made outside the token (for interoperability tests)."""
    private_der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id}
    with open_session(token_label, pin) as session:
        session.create_object(
            {
                **decode_rsa_private_key(private_der),
                **common,
                **_NOT_EXTRACTABLE,
                Attribute.PRIVATE: True,
            }
        )
        session.create_object({**decode_rsa_public_key(public_der), **common})


def create_ec_key(token_label: str, pin: str, label: str, key_id: bytes) -> None:
    """Generates a P-256 key pair in the token (a key type the provider must refuse)."""
    with open_session(token_label, pin) as session:
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        params.generate_keypair(store=True, label=label, id=key_id)


def set_key_usable(token_label: str, pin: str, label: str, key_id: bytes, usable: bool) -> None:
    """Switches CKA_ENCRYPT/DECRYPT/WRAP/UNWRAP on or off on every key object of label + id:
    how a customer revokes (and restores) a key in an HSM."""
    with open_session(token_label, pin) as session:
        found = 0
        for obj in list(session.get_objects({Attribute.LABEL: label, Attribute.ID: key_id})):
            usage = _USAGE.get(obj[Attribute.CLASS], ())
            for attribute in usage:
                obj[attribute] = usable
            found += bool(usage)
        if not found:
            raise RuntimeError(f"no key objects labelled {label!r} with id {key_id.hex()}")
