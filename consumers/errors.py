"""The exceptions of cachesync: one tree, mapped once at each boundary.

    CachesyncError               (root; defined in cachesync.schemas.serde, the lowest layer)
    ├── ConfigError              bad settings or topology; the message names the variable or file
    ├── BadInput                 an input record we will never be able to process -> dead-letter topic
    │   ├── SerdeError           (schemas) the wire encoding refused it
    │   │   ├── Undecodable      (schemas' UndecodableMessage) not our framing, or a body that does
    │   │   │                    not parse (reason "undecodable")
    │   │   ├── UnknownSchema    (schemas) fingerprint / schema id we do not hold (reason "unknown_schema")
    │   │   └── InvalidRecord    (schemas) fails its schema or the field checks (reason "invalid_record")
    │   ├── Oversized            over the configured size limit (reason "oversized")
    │   ├── RuleError            a rule template names a field the event lacks (reason "rule_error")
    │   └── CommandRefused       the broker refused for good a command the event yields (too large
    │                            for its topic, ...: reason "command_refused"); the rest was sent
    ├── TransientError           worth retrying: timeouts, 5xx, a Redis or broker that is down;
    │   │                        the batch is not committed, its partitions are paused and re-read
    │   ├── RetryAfter           the provider (or the tier order) said when (429 Retry-After)
    │   │   └── SinkUnavailable  the provider refused the sink itself, not a command: no command is
    │   │       │                dead-lettered; the sink says when to try again (its own backoff,
    │   │       │                sinks/retry.py `Outage`), raises cachesync.sink.blocked and warns
    │   │       │                once a minute
    │   │       ├── CredentialsRejected  401/403, an expired or unknown AWS key (reason "credentials")
    │   │       └── SinkMisconfigured    the provider does not know the sink's zone or distribution
    │   │                                (reason "configuration")
    │   ├── ServerError          a provider answered 5xx: a sink retries it (sinks/retry.py), then
    │   │                        raises a plain TransientError; never leaves a sink
    │   ├── CacheUnavailable     the vendor API cache's Redis does not answer (the client then bypasses it)
    │   ├── DeadLetterUnavailable  the dead-letter topic did not take a record: nothing is committed
    │   └── LockHeld             another caller holds a vendor API entry's fetch lock: wait and read
    │                            again (control flow inside consumers/vendor_api; never escapes it)
    ├── ProduceRefused           (pipeline/sends.py) the broker will never accept some of a send's
    │                            messages; the others were acked. The mapper dead-letters their events
    ├── PermanentSinkError       will never succeed (a 4xx about the command's own items, bisected down
    │                            to the commands that named them): they go to the dead-letter topic
    └── VendorApiError           a vendor API call failed and no cached entry may stand in for it
        ├── VendorUnavailable    refused, reset, 5xx or 429: a stale entry within max_stale_s answers instead
        │   └── VendorTimeout    no answer within the policy's timeouts
        ├── VendorRejected       another 4xx: the request itself is wrong; never answered from stale
        └── BadVendorResponse    unusable: not JSON, an unexpected status, a body over max_body_bytes;
                                 never cached (a stale entry within max_stale_s may answer instead)

Backend errors become these, re-raised `from` the original, in one place per backend:

- Redis (redis.exceptions, socket errors, cashews' wrapper): `redis_errors` below, which
  every Redis caller wraps its calls in (sinks, the ledger, the relationship index, the
  vendor API cache's store);
- httpx, for the sinks: `sinks/retry.py` (network errors and 5xx, after the retries);
  for the vendor API cache: `vendor_api/client.py` `_upstream` (the vendor's answer
  decides between serving stale and failing, so it maps to the VendorApiError branch);
- botocore: `sinks/cloudfront.py` (ClientError codes; network errors go through
  `sinks/retry.py` like httpx's);
- aiokafka's login: `pipeline/kafka.py` `check_login` (a SASL refusal, an untrusted
  certificate, a TLS handshake the broker breaks off) becomes a `ConfigError` naming the
  `KAFKA_*` variables, before any client starts.

What is the sink's fault and what the command's is decided by each provider module:
Cloudflare's and an edge's 401/403 and CloudFront's credential codes are
`CredentialsRejected`, an unknown zone or distribution is `SinkMisconfigured`; only what
remains is a `PermanentSinkError` for the commands that named the refused items.

The schema registry's outage (`cachesync.schemas.RegistryUnavailable`) becomes a
TransientError in `pipeline/codecs.py`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from redis.exceptions import RedisError

from cachesync.schemas.serde import (
    BadInput,
    CachesyncError,
    InvalidRecord,
    SerdeError,
    UnknownSchema,
)
from cachesync.schemas.serde import UndecodableMessage as Undecodable

__all__ = [
    "BadInput",
    "BadVendorResponse",
    "CacheUnavailable",
    "CachesyncError",
    "CommandRefused",
    "ConfigError",
    "CredentialsRejected",
    "DeadLetterUnavailable",
    "InvalidRecord",
    "LockHeld",
    "Oversized",
    "PermanentSinkError",
    "ProduceRefused",
    "RedisBoundary",
    "RetryAfter",
    "RuleError",
    "SerdeError",
    "ServerError",
    "SinkMisconfigured",
    "SinkUnavailable",
    "TransientError",
    "Undecodable",
    "UnknownSchema",
    "VendorApiError",
    "VendorRejected",
    "VendorTimeout",
    "VendorUnavailable",
    "redis_errors",
]


class ConfigError(CachesyncError):
    """Settings or topology are wrong; the message says where."""


class Oversized(BadInput):
    reason = "oversized"


class RuleError(BadInput):
    reason = "rule_error"


class CommandRefused(BadInput):
    """The broker will never take a command this event yields (too large for its topic, an
    invalid topic): the event is dead-lettered; its other commands were sent."""

    reason = "command_refused"


class TransientError(CachesyncError):
    """Worth retrying later: the batch is not committed and will be re-read."""


class RetryAfter(TransientError):
    """The provider told us when to come back (HTTP 429 Retry-After)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkUnavailable(RetryAfter):
    """The provider refused the sink as a whole (its credentials, its zone or distribution).

    No command is at fault, so none is dead-lettered and nothing is committed: the batch
    is put back and tried again. It is a `RetryAfter` because the sink, not the loop,
    keeps the backoff (one per sink, not per partition) and the warning once a minute;
    the loop logs a RetryAfter only at debug level. `retry_after` is set by the sink's
    `Outage` when the error leaves the sink.
    """

    reason = "unavailable"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after)


class CredentialsRejected(SinkUnavailable):
    """The provider refused the sink's credentials: a revoked or rotated token, an expired,
    unknown or unauthorised AWS key, a bad signature."""

    reason = "credentials"


class SinkMisconfigured(SinkUnavailable):
    """The provider does not know what the sink names (a Cloudflare zone, a CloudFront
    distribution): the configuration is wrong, not the command."""

    reason = "configuration"


class ServerError(TransientError):
    """A provider answered 5xx (or failed in a way worth another try) within a sink's retries."""


class DeadLetterUnavailable(TransientError):
    """The dead-letter topic did not take a record (down, deleted, timed out): the batch
    that holds it is put back and nothing is committed, so the record is never lost."""


class ProduceRefused(CachesyncError):
    """The broker will never accept some messages of a send; the others were acked.

    `refused` maps each refused message's position (in the order it was added) to why.
    """

    def __init__(self, refused: dict[int, str]) -> None:
        super().__init__(f"{len(refused)} messages refused: " + "; ".join(refused.values())[:500])
        self.refused = refused


class CacheUnavailable(TransientError):
    """The vendor API cache cannot reach its Redis; callers go to the vendor directly."""


class LockHeld(TransientError):
    """Another caller holds the fetch lock for this entry (control flow; never escapes the package)."""


class PermanentSinkError(CachesyncError):
    """No retry will help; the command is dead-lettered with this message."""


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


# What a Redis call can fail with: the client's own errors, and socket errors
# (OSError, which includes TimeoutError and ConnectionError) that escape it.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)


class RedisBoundary:
    """`with` or `async with`: Redis errors inside become `into`, from the original."""

    def __init__(
        self, what: str, into: type[TransientError], also: tuple[type[BaseException], ...]
    ) -> None:
        self.what = what
        self.into = into
        self.errors = (*_REDIS_ERRORS, *also)

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and isinstance(exc, self.errors):
            cause = exc.__cause__ or exc  # a wrapper (cashews) names the real error as its cause
            raise self.into(f"{self.what} failed: {type(cause).__name__}: {cause}") from exc

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: Any) -> None:
        self.__exit__(*exc_info)


def redis_errors(
    what: str,
    *,
    into: type[TransientError] = TransientError,
    also: tuple[type[BaseException], ...] = (),
) -> RedisBoundary:
    """The one mapping of Redis errors: inside the block they become `into(f"{what} failed: ...")`.

    `also` names a client library's own wrapper of Redis errors (cashews); the message
    names the Redis error it wraps.
    """
    return RedisBoundary(what, into, also)
