"""Root keys in a PKCS#11 HSM, through python-pkcs11 (tested against SoftHSM2).

A `KeyReference` names a key as: vault = the token label, key_name = CKA_LABEL, version = CKA_ID
in lower-case hex. A key version is either one AES-256 secret key or one RSA key pair (2048, 3072
or 4096 bits) under that label and id; a new version is a new CKA_ID under the same label.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

import pkcs11
from pkcs11 import MGF, Attribute, GCMParams, KeyType, Mechanism
from pkcs11 import exceptions as p11
from pkcs11.types import DecryptMixin, EncryptMixin, PrivateKey, PublicKey, SecretKey, Session

from broker.providers.interface import (
    KeyDescription,
    KeyNotFound,
    KeyReference,
    KeyUnavailable,
    ProviderUnavailable,
    RootKeyProvider,
    UnsupportedKey,
    WrappedKeyInvalid,
)
from broker.providers.pkcs11_session import (
    CIPHERTEXT_REFUSED,
    DECRYPT_FAILED,
    OAEP_PARAMS_REFUSED,
    PIN_REFUSED,
    TokenFault,
    run_on_session,
)

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as pkcs11_lib

FORMAT_VERSION: Final = 1
MECHANISM_AES_GCM: Final = 1
MECHANISM_RSA_OAEP_SHA256: Final = 2
MECHANISM_RSA_OAEP_SHA1: Final = 3
GCM_IV_BYTES: Final = 12
GCM_TAG_BYTES: Final = 16
AAD_PREFIX: Final = b"keybroker/pkcs11/v1"
MAX_PLAINTEXT_BYTES: Final = 128
AES_KEY_BITS: Final = 256
RSA_KEY_BITS: Final = frozenset({2048, 3072, 4096})

_HEADER_BYTES: Final = 2
_VERSION_PATTERN: Final = re.compile(r"(?:[0-9a-f]{2})+")
_OAEP_SHA256: Final = (Mechanism.SHA256, MGF.SHA256, None)
_OAEP_SHA1: Final = (Mechanism.SHA_1, MGF.SHA1, None)
_INVALID: Final = "the wrapped key does not authenticate under this key version"
_T = TypeVar("_T")


def pkcs11_provider(
    module_path: str, pin: str, *, allow_oaep_sha1: bool = False
) -> RootKeyProvider:
    """A provider for the tokens of the PKCS#11 module at `module_path`, logged in with `pin`.

    Nothing is loaded or opened here: the module loads and each token's session opens on first
    use. RSA keys use RSA-OAEP with SHA-256 where the token offers it; `allow_oaep_sha1` lets them
    fall back to (and unwrap) RSA-OAEP with SHA-1, which SoftHSM 2.6 is limited to.
    """
    return _Pkcs11Provider(module_path, pin, allow_oaep_sha1=allow_oaep_sha1)


@dataclass(slots=True)
class _TokenState:
    session: Session
    oaep_sha256: bool | None
    """None until tried; False once the token refused OAEP with SHA-256 (or lacks CKM_SHA256)."""
    has_oaep: bool


@dataclass(frozen=True, slots=True)
class _Key:
    key_type: str
    bits: int
    encryptor: EncryptMixin | None
    """None when CKA_ENCRYPT is off (RSA: on the public key)."""
    decryptor: DecryptMixin | None
    """None when CKA_DECRYPT is off (RSA: on the private key)."""

    @property
    def enabled(self) -> bool:
        return self.encryptor is not None and self.decryptor is not None


class _Pkcs11Provider:
    """Wraps data keys under AES-256 or RSA keys held in a PKCS#11 token.

    Wrapped format, version 1 (all of it opaque to the broker)::

        byte 0      format version = 1
        byte 1      mechanism:
                      1 = AES-256-GCM (CKM_AES_GCM), 128-bit tag
                      2 = RSA-OAEP (CKM_RSA_PKCS_OAEP), SHA-256 and MGF1-SHA256, empty label
                      3 = RSA-OAEP (CKM_RSA_PKCS_OAEP), SHA-1 and MGF1-SHA1, empty label
        mechanism 1: bytes 2..13 a random 12-byte IV, then ciphertext || tag, with
                     associated data = b"keybroker/pkcs11/v1" + KeyReference.key_id (UTF-8),
                     which binds the token, label and version
        mechanism 2, 3: bytes 2.. the OAEP ciphertext (as long as the modulus)

    Every operation runs in the token: AES-GCM with the secret key, RSA wrap with the public key
    object, RSA unwrap with the private key object; never raw RSA (CKM_RSA_X_509). Key objects
    are looked up afresh on every call, so a key whose CKA_ENCRYPT/CKA_DECRYPT the customer
    switches off is refused (KeyUnavailable) on the next call and works again once switched on.
    A key wraps only while it can both encrypt and decrypt.

    All PKCS#11 work runs in one worker thread per provider, under the process-wide
    PKCS11_LOCK. Each token gets one read-only session, logged in with the PIN and reused. Login
    state belongs to the process: when another session is logged in already, the new session
    opens without a PIN (PKCS#11 cannot check a PIN then), and the module leaks the session
    handle of the refused C_Login. Tokens initialised after the module was loaded are invisible
    (SoftHSM2 reads its token directory in C_Initialize) and answer KeyNotFound until a restart.
    """

    name = "pkcs11"

    def __init__(self, module_path: str, pin: str, *, allow_oaep_sha1: bool) -> None:
        self._module_path = module_path
        self._pin = pin
        self._allow_oaep_sha1 = allow_oaep_sha1
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
        # Touched only by the worker thread, under PKCS11_LOCK.
        self._library: pkcs11_lib | None = None
        self._tokens: dict[str, _TokenState] = {}
        self._pin_refused: set[str] = set()

    async def wrap(self, key: KeyReference, plaintext: bytes) -> bytes:
        _check_versioned(key, self.name)
        if len(plaintext) > MAX_PLAINTEXT_BYTES:
            raise ValueError(f"at most {MAX_PLAINTEXT_BYTES} bytes can be wrapped")
        return await self._run(key.vault, lambda state: self._wrap(state, key, plaintext))

    async def unwrap(self, key: KeyReference, wrapped: bytes) -> bytes:
        _check_versioned(key, self.name)
        return await self._run(key.vault, lambda state: self._unwrap(state, key, wrapped))

    async def describe(self, key: KeyReference) -> KeyDescription:
        if key.provider != self.name:
            raise ValueError(f"not a {self.name} key: {key.key_id}")
        return await self._run(key.vault, lambda state: self._describe(state, key))

    # --- the worker thread --------------------------------------------------------------------

    async def _run(self, token_label: str, op: Callable[[_TokenState], _T]) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._locked, token_label, op)

    def _locked(self, token_label: str, op: Callable[[_TokenState], _T]) -> _T:
        def fault(kind: TokenFault, exc: p11.PKCS11Error) -> Exception:
            name = type(exc).__name__
            if kind is TokenFault.STALE_SESSION:
                return ProviderUnavailable(f"PKCS#11 token {token_label!r} lost its session")
            if kind is TokenFault.KEY_HANDLE:
                return ProviderUnavailable("the key object changed during the call")
            if kind is TokenFault.KEY_REFUSED:
                return UnsupportedKey(f"the token refused the key or mechanism ({name})")
            if kind is TokenFault.NOT_PERMITTED:
                return KeyUnavailable("the key version is disabled in the token")
            return ProviderUnavailable(f"PKCS#11 token {token_label!r} failed ({name})")

        def forget() -> None:
            self._tokens.pop(token_label, None)

        return run_on_session(lambda: self._token(token_label), forget, op, fault)

    def _token(self, token_label: str) -> _TokenState:
        state = self._tokens.get(token_label)
        if state is not None:
            return state
        if token_label in self._pin_refused:
            # Trying again could lock the token: a wrong PIN does not become right.
            raise KeyUnavailable(f"PKCS#11 token {token_label!r} refused the configured PIN")
        try:
            if self._library is None:
                self._library = pkcs11.lib(self._module_path)
            token = self._library.get_token(token_label=token_label)
            try:
                session = token.open(user_pin=self._pin)
            except p11.UserAlreadyLoggedIn:
                session = token.open()
            mechanisms = token.slot.get_mechanisms()
        except p11.NoSuchToken as exc:
            raise KeyNotFound(f"no PKCS#11 token labelled {token_label!r}") from exc
        except p11.MultipleTokensReturned as exc:
            raise KeyUnavailable(f"several PKCS#11 tokens are labelled {token_label!r}") from exc
        except PIN_REFUSED as exc:
            self._pin_refused.add(token_label)
            raise KeyUnavailable(
                f"PKCS#11 token {token_label!r} refused the configured PIN ({type(exc).__name__})"
            ) from exc
        except p11.PKCS11Error as exc:
            raise ProviderUnavailable(
                f"cannot open PKCS#11 token {token_label!r} ({type(exc).__name__})"
            ) from exc
        state = _TokenState(
            session=session,
            oaep_sha256=None if Mechanism.SHA256 in mechanisms else False,
            has_oaep=Mechanism.RSA_PKCS_OAEP in mechanisms,
        )
        self._tokens[token_label] = state
        return state

    def _wrap(self, state: _TokenState, ref: KeyReference, plaintext: bytes) -> bytes:
        key = _resolve(state.session, ref)
        if not key.enabled or key.encryptor is None:
            raise KeyUnavailable(f"key {ref.key_id} is disabled in the token")
        if key.key_type == "AES":
            iv = os.urandom(GCM_IV_BYTES)
            params = GCMParams(iv, _aad(ref))
            sealed = _encrypt(key.encryptor, plaintext, Mechanism.AES_GCM, params)
            return bytes((FORMAT_VERSION, MECHANISM_AES_GCM)) + iv + sealed
        if not state.has_oaep:
            raise UnsupportedKey("the token does not offer CKM_RSA_PKCS_OAEP")
        if state.oaep_sha256 is not False:
            try:
                sealed = _encrypt(key.encryptor, plaintext, Mechanism.RSA_PKCS_OAEP, _OAEP_SHA256)
            except OAEP_PARAMS_REFUSED:
                state.oaep_sha256 = False
            else:
                state.oaep_sha256 = True
                return bytes((FORMAT_VERSION, MECHANISM_RSA_OAEP_SHA256)) + sealed
        if not self._allow_oaep_sha1:
            raise UnsupportedKey(
                "the token offers RSA-OAEP only with SHA-1; allow OAEP-SHA1 explicitly "
                "(allow_oaep_sha1) to use RSA keys in it"
            )
        sealed = _encrypt(key.encryptor, plaintext, Mechanism.RSA_PKCS_OAEP, _OAEP_SHA1)
        return bytes((FORMAT_VERSION, MECHANISM_RSA_OAEP_SHA1)) + sealed

    def _unwrap(self, state: _TokenState, ref: KeyReference, wrapped: bytes) -> bytes:
        if len(wrapped) < _HEADER_BYTES or wrapped[0] != FORMAT_VERSION:
            raise WrappedKeyInvalid(_INVALID)
        mechanism, body = wrapped[1], wrapped[_HEADER_BYTES:]
        key = _resolve(state.session, ref)
        if key.decryptor is None:
            raise KeyUnavailable(f"key {ref.key_id} is disabled in the token")
        params: object
        if key.key_type == "AES":
            if mechanism != MECHANISM_AES_GCM or len(body) < GCM_IV_BYTES + GCM_TAG_BYTES:
                raise WrappedKeyInvalid(_INVALID)
            iv, body = body[:GCM_IV_BYTES], body[GCM_IV_BYTES:]
            kind, params = Mechanism.AES_GCM, GCMParams(iv, _aad(ref))
        else:
            kind = Mechanism.RSA_PKCS_OAEP
            if mechanism == MECHANISM_RSA_OAEP_SHA256:
                params = _OAEP_SHA256
            elif mechanism == MECHANISM_RSA_OAEP_SHA1:
                if not self._allow_oaep_sha1:
                    raise UnsupportedKey(
                        "this key was wrapped with RSA-OAEP-SHA1; allow OAEP-SHA1 explicitly "
                        "(allow_oaep_sha1) to unwrap it"
                    )
                params = _OAEP_SHA1
            else:
                raise WrappedKeyInvalid(_INVALID)
            if len(body) != key.bits // 8:
                raise WrappedKeyInvalid(_INVALID)
        try:
            return _decrypt(key.decryptor, body, kind, params)
        except CIPHERTEXT_REFUSED:
            raise WrappedKeyInvalid(_INVALID) from None
        except OAEP_PARAMS_REFUSED:
            if mechanism != MECHANISM_RSA_OAEP_SHA256:
                raise
            # A token without OAEP-SHA256 cannot have made this: the mechanism byte is damaged.
            raise WrappedKeyInvalid(_INVALID) from None
        except DECRYPT_FAILED:
            # Ambiguous: bad ciphertext or a failing token. If the token still answers for the key
            # (raising a PKCS11Error here if not), the ciphertext was at fault.
            if _resolve(state.session, ref).decryptor is None:
                raise KeyUnavailable(f"key {ref.key_id} is disabled in the token") from None
            raise WrappedKeyInvalid(_INVALID) from None

    def _describe(self, state: _TokenState, ref: KeyReference) -> KeyDescription:
        if ref.version == "":
            ids = {
                obj.id
                for obj in state.session.get_objects({Attribute.LABEL: ref.key_name})
                if isinstance(obj, SecretKey | PublicKey | PrivateKey)
            }
            ids.discard(b"")
            if not ids:
                raise KeyNotFound(f"no key labelled {ref.key_name!r} in the token")
            ref = ref.at(max(ids).hex())
        key = _resolve(state.session, ref)
        return KeyDescription(
            reference=ref,
            key_type=key.key_type,
            key_size=key.bits,
            enabled=key.enabled,
            recoverable=None,
        )


def _check_versioned(key: KeyReference, provider: str) -> None:
    if key.provider != provider:
        raise ValueError(f"not a {provider} key: {key.key_id}")
    if key.version == "":
        raise ValueError("wrap and unwrap need a key version")


def _aad(ref: KeyReference) -> bytes:
    return AAD_PREFIX + ref.key_id.encode()


def _resolve(session: Session, ref: KeyReference) -> _Key:
    """The key version's objects, fetched now (their usage attributes change at runtime)."""
    if not ref.key_name or not _VERSION_PATTERN.fullmatch(ref.version):
        raise KeyNotFound(f"no key {ref.key_id} in the token")
    template = {Attribute.LABEL: ref.key_name, Attribute.ID: bytes.fromhex(ref.version)}
    objects = list(session.get_objects(template))
    secrets = [o for o in objects if isinstance(o, SecretKey)]
    publics = [o for o in objects if isinstance(o, PublicKey)]
    privates = [o for o in objects if isinstance(o, PrivateKey)]
    if not (secrets or publics or privates):
        raise KeyNotFound(f"no key {ref.key_id} in the token")
    if len(secrets) + len(publics) + len(privates) > (1 if secrets else 2):
        raise UnsupportedKey(f"key {ref.key_id}: several key objects share its label and id")
    if secrets:
        secret = secrets[0]
        if secret.key_type != KeyType.AES:
            raise UnsupportedKey(f"key {ref.key_id}: {secret.key_type!r} keys are not supported")
        bits = int(secret[Attribute.VALUE_LEN]) * 8
        if bits != AES_KEY_BITS:
            raise UnsupportedKey(f"key {ref.key_id}: AES-{bits} is not supported, only AES-256")
        return _Key(
            key_type="AES",
            bits=bits,
            encryptor=secret if isinstance(secret, EncryptMixin) else None,
            decryptor=secret if isinstance(secret, DecryptMixin) else None,
        )
    for obj in publics + privates:
        if obj.key_type != KeyType.RSA:
            raise UnsupportedKey(f"key {ref.key_id}: {obj.key_type!r} keys are not supported")
    if not (publics and privates):
        raise UnsupportedKey(f"key {ref.key_id}: an RSA key needs its public and private objects")
    public, private = publics[0], privates[0]
    bits = int(public[Attribute.MODULUS_BITS])
    if bits not in RSA_KEY_BITS:
        raise UnsupportedKey(
            f"key {ref.key_id}: RSA-{bits} is not supported, only {sorted(RSA_KEY_BITS)}"
        )
    return _Key(
        key_type="RSA",
        bits=bits,
        encryptor=public if isinstance(public, EncryptMixin) else None,
        decryptor=private if isinstance(private, DecryptMixin) else None,
    )


def _encrypt(key: EncryptMixin, data: bytes, mechanism: Mechanism, params: object) -> bytes:
    out = key.encrypt(data, mechanism=mechanism, mechanism_param=params)
    assert isinstance(out, bytes)  # bytes in, bytes out (iterables stream)
    return out


def _decrypt(key: DecryptMixin, data: bytes, mechanism: Mechanism, params: object) -> bytes:
    out = key.decrypt(data, mechanism=mechanism, mechanism_param=params)
    assert isinstance(out, bytes)  # bytes in, bytes out (iterables stream)
    return out
