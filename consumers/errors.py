"""The exceptions of cachesync, mapped once at each boundary.

    CachesyncError
    ├── ConfigError              bad settings or topology; the message names the variable or file
    ├── BadInput                 an input record we will never be able to process -> dead-letter topic
    │   ├── Undecodable          not our framing, or a body that does not parse (reason "undecodable")
    │   ├── UnknownSchema        fingerprint / schema id we do not hold (reason "unknown_schema")
    │   ├── InvalidRecord        fails its schema (reason "invalid_record")
    │   ├── Oversized            over the configured size limit (reason "oversized")
    │   └── RuleError            a rule template names a field the event lacks (reason "rule_error")
    ├── TransientError           worth retrying: timeouts, 5xx, a Redis or broker that is down;
    │   │                        the batch is not committed, its partitions are paused and re-read
    │   ├── RetryAfter           the provider said when (429 Retry-After)
    │   └── CacheUnavailable     the vendor API cache's Redis does not answer (the client then bypasses it)
    ├── PermanentSinkError       will never succeed (a 4xx): the command goes to the dead-letter topic
    └── VendorApiError           a vendor API call failed and no cached entry may stand in for it
        ├── VendorUnavailable    refused, reset, 5xx or 429: a stale entry within max_stale_s answers instead
        │   └── VendorTimeout    no answer within the policy's timeouts
        ├── VendorRejected       another 4xx: the request itself is wrong; never answered from stale
        └── BadVendorResponse    unusable: not JSON, an unexpected status, a body over max_body_bytes;
                                 never cached (a stale entry within max_stale_s may answer instead)

Backend errors (redis.exceptions, httpx, botocore) are translated into these in the
sink that calls the backend (for the vendor API cache, in `consumers/vendor_api`),
re-raised `from` the original, and nowhere else.
"""

from __future__ import annotations

from cachesync.schemas.serde import InvalidRecord as _SchemaInvalid
from cachesync.schemas.serde import SerdeError
from cachesync.schemas.serde import UndecodableMessage as _SchemaUndecodable
from cachesync.schemas.serde import UnknownSchema as _SchemaUnknown


class CachesyncError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(CachesyncError):
    """Settings or topology are wrong; the message says where."""


class BadInput(CachesyncError):
    """A record that no retry will fix; it goes to the dead-letter topic with `reason`."""

    reason = "bad_input"


class Undecodable(BadInput):
    reason = "undecodable"


class UnknownSchema(BadInput):
    reason = "unknown_schema"


class InvalidRecord(BadInput):
    reason = "invalid_record"


class Oversized(BadInput):
    reason = "oversized"


class RuleError(BadInput):
    reason = "rule_error"


def bad_input_from_serde(exc: SerdeError) -> BadInput:
    """Map the schemas package's errors onto ours (the one place this happens)."""
    if isinstance(exc, _SchemaUnknown):
        return UnknownSchema(str(exc))
    if isinstance(exc, _SchemaInvalid):
        return InvalidRecord(str(exc))
    if isinstance(exc, _SchemaUndecodable):
        return Undecodable(str(exc))
    return Undecodable(str(exc))


class TransientError(CachesyncError):
    """Worth retrying later: the batch is not committed and will be re-read."""


class RetryAfter(TransientError):
    """The provider told us when to come back (HTTP 429 Retry-After)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentSinkError(CachesyncError):
    """No retry will help; the command is dead-lettered with this message."""


class CacheUnavailable(TransientError):
    """The vendor API cache cannot reach its Redis; callers go to the vendor directly."""


class VendorApiError(CachesyncError):
    """A call to an external vendor API failed and no cached entry may answer for it."""

    def __init__(self, message: str, *, api: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.api = api
        self.status = status


class VendorUnavailable(VendorApiError):
    """The vendor refused, reset, answered 5xx or 429; worth trying again later."""


class VendorTimeout(VendorUnavailable):
    """The vendor did not answer within the policy's timeouts."""


class VendorRejected(VendorApiError):
    """The vendor answered a 4xx (other than 408/429): the request is wrong, not the vendor."""


class BadVendorResponse(VendorApiError):
    """The vendor answered something unusable (not JSON, unexpected status, too large); not cached."""
