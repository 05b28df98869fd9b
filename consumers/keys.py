"""Every Redis key prefix and cache-tag format cachesync reads or writes, in one place.

Platform caches (the keys that rules name, such as `wedding:w1:gallery`) belong to
the platform; cachesync only deletes them. The keys below are cachesync's own.
"""

from __future__ import annotations

from collections.abc import Callable

# What every key below starts with: the keys in a region's Redis that are cachesync's
# own, not the platform's cache (the effectiveness recorder leaves them out).
OWN_PREFIX = "cachesync:"

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
# State Redis: the dead letters already re-driven (`cachesync dlq redrive`), one hash per
# dead-letter topic. Field: the dead letter's id "<partition>:<offset>"; value: JSON with
# its dead-letter time, when it was re-driven and where the copy went. A second re-drive
# of one is refused unless forced (why a hash here: consumers/ops/dlq.py).
DLQ_REDRIVEN = "cachesync:dlq:redriven:{topic}"

# Sink side, in each region's Redis: the newest purge version applied per target,
# used to drop warms older than the last purge (version fencing).
PURGE_VERSION = "cachesync:purged:{sink}:{entity}"
# Kept past the command topics' retention, so a replay is still fenced.
PURGE_VERSION_TTL_S = 7 * 24 * 3600
# Sink side: what each purge sink has applied, so that a redelivered command is applied
# at most once in effect even where the effect itself is not idempotent. Two records,
# written with the effect (sinks/ledger.py says why two, and what they cost):
# - per (sink, command topic, partition), one hash: the offset of the last record applied
#   and its record time (`offset`, `record_ts`), and when it was applied (`applied_at`,
#   epoch ms). A re-read record at or below it is skipped. One key per partition, however
#   many commands: it is what covers the command topics' whole retention.
APPLIED_OFFSET = "cachesync:offset:{sink}:{topic}:{partition}"
# Kept past the command topics' retention (72 h), renewed by every write.
APPLIED_OFFSET_TTL_S = 7 * 24 * 3600
# - per command and per origin event (command_id "event:<event_id>"), a marker whose value
#   is when it was applied (epoch ms): the runner's tier order and the warmer wait for the
#   purge of an event (they cannot derive its command id on a replay), and a copy of a
#   command at another offset (a re-drive, a mirror's duplicate) is still caught. They
#   live only as long as anything waits on them: APPLIED_TTL_S covers the longest tier
#   wait the topology allows (a warm's deadline, 300 s; tests/unit/sinks/test_ledger.py
#   checks topology.yaml against it), twice over.
APPLIED = "cachesync:applied:{sink}:{command_id}"
APPLIED_EVENT = "event:{event_id}"
APPLIED_TTL_S = 10 * 60
# Sink side: a Pub/Sub channel of each region's Redis per purge sink. After each flush,
# the sink's runner publishes there the ids of the events it applied (newline-separated),
# so the runners of the tiers after it learn at once that their markers are set, without
# polling them (pipeline/tiers.py). A wake-up call only: the markers stay the truth.
TIER_APPLIED = "cachesync:tier:{region}:{sink}"
# CloudFront sink: one invalidation per CallerReference (derived from its command ids);
# remembered here because a retried batch must never be a second invalidation, and
# neither moto nor a restarted process would know. Value: the invalidation id. Kept, like
# the applied offsets, past the command topics' retention.
CLOUDFRONT_BATCH = "cachesync:cloudfront:{distribution}:{caller_reference}"
CLOUDFRONT_BATCH_TTL_S = APPLIED_OFFSET_TTL_S
# CloudFront sink: the invalidations asked for and not yet recorded in the ledger, one hash
# per distribution. Field: the CallerReference; value: JSON with its command ids and paths.
# Written before CreateInvalidation and deleted once its commands are recorded, so a batch
# re-read after a crash in between regroups those commands under the same reference and
# paths, whatever else the new batch holds (sinks/cloudfront.py).
CLOUDFRONT_UNSETTLED = "cachesync:cloudfront:{distribution}:unsettled"

# Vendor API cache (consumers/vendor_api), in each region's Redis. One entry per
# (integration, vendor, request), written through cashews and SADDed to TAG_INDEX under
# each of its tags, so the Redis sink purges it like any platform key.
VENDOR_API_ENTRY = "cachesync:vendor-api:{api}:{vendor_id}:{digest}"
# The cashews lock held by the one caller (in any process) fetching that entry upstream.
VENDOR_API_LOCK = "cachesync:vendor-api-lock:{api}:{vendor_id}:{digest}"
# Put in the entry's tag index sets while its fetch is in flight: a purge deletes the
# sets, and with them this marker, so a fetch that started before the purge is not stored.
VENDOR_API_FILL = "cachesync:vendor-api-fill:{token}"
# The tags of a vendor API entry; the vendor.*, vendor_api.changed and wedding.* rules purge them.
VENDOR_API_TAG = "vendor-api:{vendor_id}"
VENDOR_API_TAG_API = "vendor-api:{vendor_id}:{api}"
WEDDING_TAG = "wedding:{wedding_id}"


def tag_index(tag: str) -> str:
    return TAG_INDEX.format(tag=tag)


def vendor_weddings(vendor_id: str) -> str:
    return VENDOR_WEDDINGS.format(vendor_id=vendor_id)


def wedding_vendors(wedding_id: str) -> str:
    return WEDDING_VENDORS.format(wedding_id=wedding_id)


def wedding_regions(wedding_id: str) -> str:
    return WEDDING_REGIONS.format(wedding_id=wedding_id)


def dlq_redriven(topic: str) -> str:
    return DLQ_REDRIVEN.format(topic=topic)


def url_target(url: str) -> str:
    """The fencing target of one purged URL (an `entity` for PURGE_VERSION)."""
    return f"url:{url}"


# The edge's surrogate key for one URL: deploy/varnish/default.vcl tags every object with
# it (besides the origin's keys), so the HTTP-purge sink drops many URLs in one xkey-purge
# request. The URL is taken as it goes on the wire (percent-encoded) with "%" and ","
# escaped, as the VCL escapes the request's URL: xkey splits keys on whitespace and commas.
URL_XKEY = "url:{url}"


def url_xkey(wire_url: str) -> str:
    """The edge's surrogate key of a URL as sent on the wire (`edge_http.wire_target`)."""
    return URL_XKEY.format(url=wire_url.replace("%", "%25").replace(",", "%2C"))


def purge_version(sink: str, entity: str) -> str:
    return PURGE_VERSION.format(sink=sink, entity=entity)


def applied(sink: str, command_id: str) -> str:
    return APPLIED.format(sink=sink, command_id=command_id)


def applied_event(sink: str, event_id: str) -> str:
    return applied(sink, APPLIED_EVENT.format(event_id=event_id))


def tier_applied(region: str, sink: str) -> str:
    return TIER_APPLIED.format(region=region, sink=sink)


def applied_offset(sink: str, topic: str, partition: int) -> str:
    return APPLIED_OFFSET.format(sink=sink, topic=topic, partition=partition)


def cloudfront_batch(distribution: str, caller_reference: str) -> str:
    return CLOUDFRONT_BATCH.format(distribution=distribution, caller_reference=caller_reference)


def cloudfront_unsettled(distribution: str) -> str:
    return CLOUDFRONT_UNSETTLED.format(distribution=distribution)


def vendor_api_entry(api: str, vendor_id: str, digest: str) -> str:
    return VENDOR_API_ENTRY.format(api=api, vendor_id=vendor_id, digest=digest)


def vendor_api_lock(api: str, vendor_id: str, digest: str) -> str:
    return VENDOR_API_LOCK.format(api=api, vendor_id=vendor_id, digest=digest)


def vendor_api_fill(token: str) -> str:
    return VENDOR_API_FILL.format(token=token)


def vendor_api_tags(api: str, vendor_id: str, wedding_id: str | None = None) -> list[str]:
    tags = [
        VENDOR_API_TAG.format(vendor_id=vendor_id),
        VENDOR_API_TAG_API.format(vendor_id=vendor_id, api=api),
    ]
    if wedding_id is not None:
        tags.append(WEDDING_TAG.format(wedding_id=wedding_id))
    return tags


# Platform side, beside each cache entry written through `platform_cache.cache_put`:
# when it was written (epoch ms), with the entry's TTL. The consistency checker uses it
# to tell a stale copy (written before the purged event) from a fresh refill.
WRITTEN_AT = "cachesync:written:{key}"


def written_at(key: str) -> str:
    return WRITTEN_AT.format(key=key)


# State Redis: what the cache effectiveness recorder read (consumers/ops/effectiveness/),
# one stream per group prefix (a test session's own, or the deployment's): each tier's hit
# and miss counts per interval, the edges' and Redis' per-request outcomes, the consistency
# checker's tallies. Entry ids are their times; entries older than the retention are trimmed.
EFFECTIVENESS = "cachesync:effectiveness:{group_prefix}"


def effectiveness(group_prefix: str) -> str:
    return EFFECTIVENESS.format(group_prefix=group_prefix)


_ID = "\x00"  # a stand-in id no real one holds


def prefix(key_of: Callable[[str], str]) -> str:
    """What the key name `key_of(id)` puts before the id, for names built by concatenation
    (hundreds per flush, where a call and `str.format` each cost several times as much)
    or in a script; ValueError if the id is not where the name ends."""
    name = key_of(_ID)
    head, found, rest = name.partition(_ID)
    if not found or rest:
        raise ValueError(f"{name!r}: a key name that does not end with its id")
    return head
