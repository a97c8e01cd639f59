"""What this process last saw of each customer-managed key: a background probe's wrap + unwrap
(broker.lifecycle.customer_key_probes) or a data-key call that needed the vault (the key store).

GetStatus reports it without calling the vault. The latest outcome wins: a probe that failed is
cleared by the first call that succeeds, so access that returns shows at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from broker.core.clock import Clock


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """One outcome: `reason` is the ErrorInfo reason data-key calls get, "" when ok."""

    key_id: str
    ok: bool
    reason: str
    time: datetime


class CustomerKeyChecks:
    """The latest KeyCheck per versioned customer key id; one event loop only."""

    def __init__(self, now: Clock) -> None:
        self._now = now
        self._latest: dict[str, KeyCheck] = {}

    def get(self, key_id: str) -> KeyCheck | None:
        return self._latest.get(key_id)

    def succeeded(self, key_id: str) -> None:
        latest = self._latest.get(key_id)
        # On the cache-miss path: only a change is recorded (the probe keeps the time fresh).
        if latest is None or not latest.ok:
            self._latest[key_id] = KeyCheck(key_id, True, "", self._now())

    def failed(self, key_id: str, reason: str) -> None:
        self._latest[key_id] = KeyCheck(key_id, False, reason, self._now())

    def probed(self, key_id: str, reason: str | None) -> None:
        """A probe's outcome (reason None: it worked), always recorded with its time."""
        self._latest[key_id] = KeyCheck(key_id, reason is None, reason or "", self._now())
