"""The service master key in a PKCS#11 token instead of the key file (`master_key_pkcs11_label`).

Versions are AES-256 secret keys under one CKA_LABEL (`master_key_pkcs11_label`) in the token
labelled `master_key_pkcs11_token`, one CKA_ID per version, reached through the PKCS#11 provider's
module and user PIN (`pkcs11_module`, `pkcs11_pin`). A version's key id, stored beside every root
key it seals, is `pkcs11:{token}/{label}/{cka_id hex}`; the greatest CKA_ID (as an unsigned
number) is the newest version. The broker generates CKA_ID 01 on a fresh database and the next
CKA_ID on rotation (sensitive, non-extractable, encrypt/decrypt only); it never destroys a version.

`TokenAead` has AESGCM's shape (broker.keys.key_wrapping.Aead), so root keys are wrapped in the same
format whichever master key wraps them: CKM_AES_GCM runs inside the token with the nonce and
associated data that key wrapping chooses (128-bit tag; ciphertext || tag, the bytes AESGCM
produces), and a ciphertext that does not authenticate raises cryptography's InvalidTag. A key the
token will not use (CKA_ENCRYPT/CKA_DECRYPT switched off, removed, PIN refused) raises
MasterKeyUnavailable (FAILED_PRECONDITION: an operator must act, retrying does not help); a token
that fails or loses its session twice raises MasterKeyTokenFailed (UNAVAILABLE: retry later).

Calls are synchronous, on the caller's thread (the event loop's): the master key is used only on a
key-cache miss (to unwrap a resource's root key) and by admin operations (CreateResource, start-up,
rotation), never per data key. A local token answers in well under a millisecond; a network HSM
stalls the loop for one round trip per miss. Every call holds
broker.providers.pkcs11_session.PKCS11_LOCK (python-pkcs11 turns the module's own locking off).
A `TokenKeys` opens one read/write session on first use and keeps it (reopening a stale one
once); when the process is logged in already (the PKCS#11 provider's session), it opens without
a PIN. Key objects are looked up on every call, so a
key switched off in the token is refused on the next call and works again once switched on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Final, TypeVar

import pkcs11
from cryptography.exceptions import InvalidTag
from pkcs11 import Attribute, GCMParams, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.types import DecryptMixin, EncryptMixin, SecretKey, Session

from broker.core.errors import ConfigurationError, FailedPrecondition, Unavailable
from broker.core.settings import Settings
from broker.keys.master_key import MasterKey
from broker.providers.pkcs11_session import (
    CIPHERTEXT_REFUSED,
    DECRYPT_FAILED,
    PIN_REFUSED,
    TokenFault,
    run_on_session,
)

log = logging.getLogger(__name__)

KEY_BYTES: Final = 32
FIRST_VERSION: Final = b"\x01"
MAX_KEY_ID_CHARS: Final = 64
"""resources.master_key_id is VARCHAR(64)."""
_TAG_BYTES: Final = 16
_NONCE_BYTES: Final = 12
_PROBE_AAD: Final = b"keybroker/master-key/pkcs11-probe"
_NEW_KEY_TEMPLATE: Final[dict[Attribute, Any]] = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
}

_T = TypeVar("_T")


class MasterKeyUnavailable(FailedPrecondition):
    """The token will not use the master key (switched off or removed in the token, or the PIN
    was refused): an operator must act. `detail` is for the log, never for clients."""

    def __init__(self, detail: str) -> None:
        super().__init__("MASTER_KEY_UNAVAILABLE", "the service master key is unavailable")
        self.detail = detail


class MasterKeyTokenFailed(Unavailable):
    """The master key's token failed or lost its session; retrying later may work."""

    def __init__(self, detail: str) -> None:
        super().__init__("MASTER_KEY_TOKEN_UNAVAILABLE", "the service master key's token failed")
        self.detail = detail


MasterKeyError = (MasterKeyUnavailable, MasterKeyTokenFailed)


def token_keys(settings: Settings) -> TokenKeys:
    """The master key versions the settings name (nothing is opened yet)."""
    label = settings.master_key_pkcs11_label
    missing = [
        name
        for name, value in (
            ("master_key_pkcs11_token", settings.master_key_pkcs11_token),
            ("pkcs11_module", settings.pkcs11_module),
        )
        if not value
    ]
    if missing:
        unset = " and ".join(f"{m} (KEYBROKER_{m.upper()})" for m in missing)
        raise ConfigurationError(f"master_key_pkcs11_label is {label!r}, but {unset} is not set")
    return TokenKeys(
        settings.pkcs11_module, settings.pkcs11_pin, settings.master_key_pkcs11_token, label
    )


def version_order(cka_id: bytes) -> tuple[int, int]:
    """CKA_IDs compare as unsigned big-endian numbers (01 < ff < 0100)."""
    return int.from_bytes(cka_id, "big"), len(cka_id)


def next_version(versions: list[bytes]) -> bytes:
    """The CKA_ID after the greatest of `versions`, in as few bytes as it needs."""
    n = max((int.from_bytes(v, "big") for v in versions), default=0) + 1
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


class TokenKeys:
    """The master key versions under one label in one token, through one session (see the
    module docstring)."""

    def __init__(self, module_path: str, pin: str, token_label: str, key_label: str) -> None:
        self.token_label = token_label
        self.key_label = key_label
        self._module_path = module_path
        self._pin = pin
        # Touched only under PKCS11_LOCK.
        self._session: Session | None = None
        self._pin_refused = False

    def key_id(self, cka_id: bytes) -> str:
        key_id = f"pkcs11:{self.token_label}/{self.key_label}/{cka_id.hex()}"
        if len(key_id) > MAX_KEY_ID_CHARS:
            raise ConfigurationError(
                f"master key id {key_id} is longer than {MAX_KEY_ID_CHARS} characters: "
                "choose a shorter master_key_pkcs11_label"
            )
        return key_id

    def master_key(self, cka_id: bytes) -> MasterKey:
        key_id = self.key_id(cka_id)
        return MasterKey(key_id, TokenAead(self, cka_id, key_id))

    # --- start-up and administration (failures become ConfigurationError) ---------------------

    def versions(self) -> list[bytes]:
        """The CKA_IDs of the secret keys under the label, oldest first."""

        def op(session: Session) -> set[bytes]:
            template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self.key_label}
            return {o.id for o in session.get_objects(template) if isinstance(o, SecretKey)}

        ids = self._admin(op, "list the master keys in")
        ids.discard(b"")
        return sorted(ids, key=version_order)

    def generate(self, cka_id: bytes) -> MasterKey:
        """Generates an AES-256 key under the label with this CKA_ID; returns it checked."""
        key_id = self.key_id(cka_id)

        def op(session: Session) -> None:
            session.generate_key(
                KeyType.AES,
                KEY_BYTES * 8,
                id=cka_id,
                label=self.key_label,
                store=True,
                template=_NEW_KEY_TEMPLATE,
            )

        self._admin(op, f"generate {key_id} in")
        return self.check(cka_id)

    def check(self, cka_id: bytes) -> MasterKey:
        """The version, once it proved to be one AES-256 key that the token uses for AES-GCM
        with the caller's nonce (some tokens choose their own IV, which would make every seal
        unopenable); ConfigurationError if not."""
        key = self.master_key(cka_id)

        def op(session: Session) -> None:
            secret = self.secret_key(session, cka_id, key.key_id)
            bits = int(secret[Attribute.VALUE_LEN]) * 8
            if secret.key_type != KeyType.AES or bits != KEY_BYTES * 8:
                raise ConfigurationError(
                    f"master key {key.key_id} is {secret.key_type!r} ({bits} bits), not AES-256"
                )

        self._admin(op, f"look up {key.key_id} in")
        nonce, probe = os.urandom(_NONCE_BYTES), os.urandom(KEY_BYTES)
        try:
            sealed = key.aead.encrypt(nonce, probe, _PROBE_AAD)
            opened = key.aead.decrypt(nonce, sealed, _PROBE_AAD)
        except MasterKeyError as exc:
            raise ConfigurationError(f"master key {key.key_id}: {exc.detail}") from None
        except InvalidTag:
            sealed = opened = b""
        if len(sealed) != len(probe) + _TAG_BYTES or opened != probe:
            raise ConfigurationError(
                f"master key {key.key_id}: the token's AES-GCM does not round-trip with the "
                "caller's nonce; this token cannot hold the master key"
            )
        return key

    def _admin(self, op: Callable[[Session], _T], what: str) -> _T:
        try:
            return self.run(op)
        except MasterKeyError as exc:
            raise ConfigurationError(
                f"cannot {what} PKCS#11 token {self.token_label!r}: {exc.detail}"
            ) from None

    # --- every call ---------------------------------------------------------------------------

    def run(self, op: Callable[[Session], _T]) -> _T:
        """Runs `op` on the session under PKCS11_LOCK, reopening a stale session once; token
        failures become MasterKeyUnavailable or MasterKeyTokenFailed."""

        def fault(kind: TokenFault, exc: p11.PKCS11Error) -> Exception:
            name = type(exc).__name__
            if kind is TokenFault.STALE_SESSION:
                return MasterKeyTokenFailed(f"the token lost its session ({name})")
            if kind is TokenFault.KEY_HANDLE:
                return MasterKeyTokenFailed("the key object changed during the call")
            if kind is TokenFault.NOT_PERMITTED:
                return MasterKeyUnavailable("the key is switched off in the token")
            return MasterKeyTokenFailed(f"the token failed ({name})")

        return run_on_session(self._open, self._forget_session, op, fault)

    def _forget_session(self) -> None:
        self._session = None

    def _open(self) -> Session:
        if self._session is not None:
            return self._session
        if self._pin_refused:
            # Trying again could lock the token: a wrong PIN does not become right.
            raise MasterKeyUnavailable("the token refused the configured PIN")
        try:
            token = pkcs11.lib(self._module_path).get_token(token_label=self.token_label)
            try:
                session = token.open(rw=True, user_pin=self._pin)
            except p11.UserAlreadyLoggedIn:
                session = token.open(rw=True)
        except p11.NoSuchToken as exc:
            raise MasterKeyUnavailable("no token has this label") from exc
        except p11.MultipleTokensReturned as exc:
            raise MasterKeyUnavailable("several tokens have this label") from exc
        except PIN_REFUSED as exc:
            self._pin_refused = True
            raise MasterKeyUnavailable(
                f"the token refused the configured PIN ({type(exc).__name__})"
            ) from exc
        except p11.PKCS11Error as exc:
            raise MasterKeyTokenFailed(f"cannot open the token ({type(exc).__name__})") from exc
        self._session = session
        return session

    def secret_key(self, session: Session, cka_id: bytes, key_id: str) -> SecretKey:
        """The key object, looked up now (its usage attributes change at runtime)."""
        template = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.LABEL: self.key_label,
            Attribute.ID: cka_id,
        }
        found = [o for o in session.get_objects(template) if isinstance(o, SecretKey)]
        if not found:
            raise MasterKeyUnavailable(f"the token no longer holds {key_id}")
        if len(found) > 1:
            raise MasterKeyUnavailable(f"several key objects in the token are {key_id}")
        return found[0]


class TokenAead:
    """AES-256-GCM under one master key version, inside the token (see the module docstring)."""

    def __init__(self, keys: TokenKeys, cka_id: bytes, key_id: str) -> None:
        self._keys = keys
        self._cka_id = cka_id
        self._key_id = key_id

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        def op(session: Session) -> bytes:
            secret = self._keys.secret_key(session, self._cka_id, self._key_id)
            if not isinstance(secret, EncryptMixin):
                raise MasterKeyUnavailable(f"{self._key_id} is switched off (CKA_ENCRYPT)")
            out = secret.encrypt(
                data, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, associated_data)
            )
            assert isinstance(out, bytes)  # bytes in, bytes out (iterables stream)
            return out

        return self._run(op)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        def op(session: Session) -> bytes:
            secret = self._keys.secret_key(session, self._cka_id, self._key_id)
            if not isinstance(secret, DecryptMixin):
                raise MasterKeyUnavailable(f"{self._key_id} is switched off (CKA_DECRYPT)")
            params = GCMParams(nonce, associated_data)
            try:
                out = secret.decrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            except (*DECRYPT_FAILED, *CIPHERTEXT_REFUSED):
                # Ambiguous (SoftHSM reports a failed tag as CKR_GENERAL_ERROR): if the token
                # still answers for the key (raising here if not), the ciphertext was at fault.
                again = self._keys.secret_key(session, self._cka_id, self._key_id)
                if not isinstance(again, DecryptMixin):
                    raise MasterKeyUnavailable(
                        f"{self._key_id} is switched off (CKA_DECRYPT)"
                    ) from None
                raise InvalidTag from None
            assert isinstance(out, bytes)  # bytes in, bytes out (iterables stream)
            return out

        return self._run(op)

    def _run(self, op: Callable[[Session], bytes]) -> bytes:
        try:
            return self._keys.run(op)
        except MasterKeyError as exc:
            log.warning(
                "master key %s (PKCS#11 token %r): %s",
                self._key_id,
                self._keys.token_label,
                exc.detail,
            )
            raise
