"""The cached client for external vendor APIs: Redis through cashews, invalidated by events.

See `client.py` for the life of an entry and `store.py` for how it meets the Redis sink.
"""

from cachesync.consumers.vendor_api.cache_control import CacheControl, StoragePlan, plan_storage
from cachesync.consumers.vendor_api.client import VendorApiClient
from cachesync.consumers.vendor_api.entry import (
    CacheStatus,
    StaleReason,
    StoredEntry,
    VendorResponse,
)

__all__ = [
    "CacheControl",
    "CacheStatus",
    "StaleReason",
    "StoragePlan",
    "StoredEntry",
    "VendorApiClient",
    "VendorResponse",
    "plan_storage",
]
