"""The key hierarchy: master key -> root key -> resource key -> data key.

master_key (the key file) and master_key_pkcs11 (the key in a token), opened by master_key_setup;
key_wrapping (AES-256-GCM key wrapping with associated_data's encoding); roots (the service wrap,
or the customer's key around it); key_store (loading resource-key versions, through key_cache);
data_key_format (the wrapped data key a caller stores) and data_keys (generate, decrypt, re-wrap).
Imports only the core and db layers and the providers below it.
"""

from broker.keys.data_keys import DataKeys
from broker.keys.key_cache import KeyCache
from broker.keys.key_store import KeyStore, UsableKey
from broker.keys.master_key import MasterKey
from broker.keys.roots import CustomerKeyUnavailable, Root

__all__ = [
    "CustomerKeyUnavailable",
    "DataKeys",
    "KeyCache",
    "KeyStore",
    "MasterKey",
    "Root",
    "UsableKey",
]
