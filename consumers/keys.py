"""Every Redis key prefix and cache-tag format cachesync reads or writes, in one place.

Platform caches (the keys that rules name, such as `wedding:w1:gallery`) belong to
the platform; cachesync only deletes them. The keys below are cachesync's own.
"""

from __future__ import annotations

# Tag index, one set per tag in each region's Redis: the platform (or the vendor API
# cache) SADDs every cache key it writes under each of the entry's tags, so a purge
# by tag can find the keys. The Redis sink deletes the members and then the set.
TAG_INDEX = "cachesync:tag:{tag}"

# State Redis (the mapper's): which weddings a vendor serves, and the reverse, kept
# from vendor.linked / vendor.unlinked so a vendor change fans out to its weddings.
VENDOR_WEDDINGS = "cachesync:rel:vendor:{vendor_id}:weddings"
WEDDING_VENDORS = "cachesync:rel:wedding:{wedding_id}:vendors"
# State Redis: the regions a wedding's guests are in, from wedding.updated/published.
WEDDING_REGIONS = "cachesync:rel:wedding:{wedding_id}:regions"

# Sink side, in each region's Redis: the newest purge version applied per target,
# used to drop warms older than the last purge (version fencing).
PURGE_VERSION = "cachesync:purged:{sink}:{entity}"
# Sink side: command ids already applied, with a TTL, so a redelivered command is
# applied at most once in effect even where the effect itself is not idempotent.
APPLIED = "cachesync:applied:{sink}:{command_id}"
APPLIED_TTL_S = 24 * 3600


def tag_index(tag: str) -> str:
    return TAG_INDEX.format(tag=tag)


def vendor_weddings(vendor_id: str) -> str:
    return VENDOR_WEDDINGS.format(vendor_id=vendor_id)


def wedding_vendors(wedding_id: str) -> str:
    return WEDDING_VENDORS.format(wedding_id=wedding_id)


def wedding_regions(wedding_id: str) -> str:
    return WEDDING_REGIONS.format(wedding_id=wedding_id)


def purge_version(sink: str, entity: str) -> str:
    return PURGE_VERSION.format(sink=sink, entity=entity)


def applied(sink: str, command_id: str) -> str:
    return APPLIED.format(sink=sink, command_id=command_id)
