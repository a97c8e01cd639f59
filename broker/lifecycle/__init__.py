"""State changes of the key hierarchy: resources (create, delete, rotate, destroy and restore
versions), customer_keys (enable, update, disable a customer-managed key), janitor (what is due,
periodically) and master_key_rotation (offline)."""

from broker.lifecycle.customer_keys import CustomerKeys
from broker.lifecycle.resources import Lifecycle, LifecyclePolicy

__all__ = ["CustomerKeys", "Lifecycle", "LifecyclePolicy"]
