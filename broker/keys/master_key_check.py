"""The background check that the master key still opens: a wrap and an unwrap every few seconds.

The key file cannot go away under a running process, but a master key in a PKCS#11 token can be
switched off, removed, or its token can fail; then no resource's root key can be opened on a
cache miss, and the process is not ready (broker.core.readiness: grpc.health NOT_SERVING) until
the check passes again.
"""

from __future__ import annotations

import logging
import os

import anyio
from anyio.abc import TaskStatus

from broker.core.errors import KeybrokerError
from broker.core.readiness import Readiness
from broker.keys import key_wrapping
from broker.keys.master_key import MasterKey

log = logging.getLogger(__name__)

CONDITION = "master key"
_LABEL = b"master-key-check"


def master_key_opens(master: MasterKey) -> bool:
    """Whether the master key wraps and unwraps a random value now."""
    value = os.urandom(32)
    try:
        wrapped = key_wrapping.wrap(master.aead, value, _LABEL, ())
        return key_wrapping.unwrap(master.aead, wrapped, _LABEL, ()) == value
    except (KeybrokerError, key_wrapping.UnwrapError):
        return False


async def run(
    master: MasterKey,
    readiness: Readiness,
    interval: float = 5.0,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Checks every `interval` until cancelled."""
    task_status.started()
    while True:
        check_once(master, readiness)
        await anyio.sleep(interval)


def check_once(master: MasterKey, readiness: Readiness) -> bool:
    """One check, recorded in `readiness` (logged when it changes); returns it."""
    ok = master_key_opens(master)
    if ok != (CONDITION not in readiness.failing):
        log.log(
            logging.INFO if ok else logging.WARNING,
            "the master key %s %s",
            master.key_id,
            "opens again" if ok else "does not open: not serving until it does",
        )
    readiness.set(CONDITION, ok)
    return ok
