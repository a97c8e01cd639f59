"""PKCS#11 sessions shared by everything in this process that talks to a PKCS#11 module: the
root-key provider (broker.providers.pkcs11) and the master key in a token
(broker.keys.master_key_pkcs11). One lock for every call, one retry on a stale session, and the
groups of python-pkcs11 errors by what they mean, so that each caller maps them to its own errors.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import Final, TypeVar

from pkcs11 import exceptions as p11

PKCS11_LOCK: Final = threading.Lock()
"""Held around every PKCS#11 call in this process, by every provider and by anything else that
talks to a PKCS#11 module (the test helpers). python-pkcs11 turns the module's own locking off and
releases the GIL, so two threads inside the module at once crash it (seen with SoftHSM2)."""

_NOT_PERMITTED: Final = "Unmapped error code 0x68"
"""python-pkcs11 0.10 has no class for CKR_KEY_FUNCTION_NOT_PERMITTED (0x68): a key whose
CKA_ENCRYPT or CKA_DECRYPT was switched off raises a bare PKCS11Error with this text."""

# A cached session that no longer works: open a new one and try once more.
STALE_SESSION: Final = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.UserNotLoggedIn,
    p11.DeviceRemoved,
    p11.TokenNotPresent,
)
PIN_REFUSED: Final = (
    p11.PinIncorrect,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.PinLocked,
    p11.PinExpired,
    p11.UserPinNotInitialized,
)
KEY_REFUSED: Final = (
    p11.KeyTypeInconsistent,
    p11.KeySizeRange,
    p11.MechanismInvalid,
    p11.MechanismParamInvalid,
)
# How tokens refuse OAEP parameters they do not implement (SoftHSM 2.6: ArgumentsBad for SHA-256).
OAEP_PARAMS_REFUSED: Final = (p11.ArgumentsBad, p11.MechanismParamInvalid, p11.MechanismInvalid)
# SoftHSM reports a failed GCM tag or OAEP decoding as CKR_GENERAL_ERROR, other tokens as
# CKR_FUNCTION_FAILED: both are told apart from a failing token by asking it again (see _unwrap).
DECRYPT_FAILED: Final = (p11.GeneralError, p11.FunctionFailed)
CIPHERTEXT_REFUSED: Final = (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange)

_T = TypeVar("_T")
_S = TypeVar("_S")


class TokenFault(enum.Enum):
    """How a PKCS#11 call failed, for `run_on_session`'s caller to turn into its own error."""

    STALE_SESSION = "the session was lost twice in a row"
    KEY_HANDLE = "the key object changed during the call"
    KEY_REFUSED = "the token refused the key or the mechanism"
    NOT_PERMITTED = "the key's function is switched off (CKR_KEY_FUNCTION_NOT_PERMITTED)"
    FAILED = "any other token failure"


def run_on_session(
    open_session: Callable[[], _S],
    forget_session: Callable[[], None],
    op: Callable[[_S], _T],
    fault: Callable[[TokenFault, p11.PKCS11Error], Exception],
) -> _T:
    """Runs `op` on the session `open_session` gives, under PKCS11_LOCK. A stale session is
    forgotten and the call tried once more on a fresh one; any other PKCS#11 error, or a second
    stale session, raises `fault(kind, exc)`: the caller's own error. Errors of `open_session`
    and non-PKCS#11 errors of `op` pass through."""
    with PKCS11_LOCK:
        for attempt in range(2):
            session = open_session()
            try:
                return op(session)
            except STALE_SESSION as exc:
                forget_session()
                if attempt:
                    raise fault(TokenFault.STALE_SESSION, exc) from exc
            except (p11.KeyHandleInvalid, p11.ObjectHandleInvalid) as exc:
                raise fault(TokenFault.KEY_HANDLE, exc) from exc
            except KEY_REFUSED as exc:
                raise fault(TokenFault.KEY_REFUSED, exc) from exc
            except p11.PKCS11Error as exc:
                off = str(exc) == _NOT_PERMITTED
                raise fault(TokenFault.NOT_PERMITTED if off else TokenFault.FAILED, exc) from exc
        raise AssertionError("unreachable")
