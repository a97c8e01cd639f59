"""Periodic key housekeeping: destroy what is due, rotate what is old.

Runs in every broker process; every step re-checks its rows under lock, so replicas may race
harmlessly. Failures are logged and retried at the next tick; they never stop the broker.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import anyio

from broker.core.audit_event import AuditEvent
from broker.db.periodic import every
from broker.lifecycle.customer_keys import CustomerKeys
from broker.lifecycle.resources import Lifecycle

log = logging.getLogger(__name__)

CALLER = "keybroker-janitor"


def janitor_event(operation: str, resource: str) -> AuditEvent:
    return AuditEvent(operation, CALLER, f"janitor-{anyio.current_time():.0f}", resource=resource)


async def tick(
    lifecycle: Lifecycle, customer_keys: CustomerKeys | None = None
) -> tuple[int, int, int]:
    """One pass: (versions destroyed, resources destroyed, keys rotated).

    Rotation counts resource keys rotated by age and resources moved to their customer key's
    latest version."""
    versions, resources = await lifecycle.destroy_due(janitor_event)
    rotated = await lifecycle.rotate_due(janitor_event)
    if customer_keys is not None:
        rotated += await customer_keys.poll_latest(janitor_event)
    if versions or resources or rotated:
        log.info(
            "janitor: destroyed %d key versions and %d resources, rotated %d keys",
            versions,
            resources,
            rotated,
        )
    return versions, resources, rotated


async def run(lifecycle: Lifecycle, customer_keys: CustomerKeys, interval: timedelta) -> None:
    """Ticks every `interval` until cancelled (broker.db.periodic)."""
    await every(interval, lambda: tick(lifecycle, customer_keys), "janitor")
