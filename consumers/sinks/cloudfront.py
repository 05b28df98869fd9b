"""The CloudFront sink: a region's purges as one invalidation per flush on its distribution.

Paths are coalesced and escalated by the purge budget so that a flush fits in one
invalidation and within the distribution's in-progress limits (3,000 paths, 15
wildcards), counting the invalidations this sink started that are not yet complete.
When those limits are full, or CloudFront answers `TooManyInvalidationsInProgress`,
the batch waits (`RetryAfter`, the partition is paused): nothing is dropped.

Idempotency is the project's own, because neither moto nor a restarted process
would provide it: the `CallerReference` is derived from the batch's command ids, the
reference and its invalidation id are remembered in the region's Redis
(`keys.CLOUDFRONT_BATCH`), and commands already applied (`keys.APPLIED`) are skipped,
so a retried batch is never a second invalidation. The ids of the invalidations are
kept in `invalidations` (and logged) for audit records.

The flush itself (ledger, budget plan, retries) is the CDN template's (sinks/cdn.py);
this module holds CloudFront's request, the mapping of its error codes, and its limits.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Unpack

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import (
    CachesyncError,
    PermanentSinkError,
    RetryAfter,
    ServerError,
    TransientError,
    redis_errors,
)
from cachesync.consumers.settings import Settings, region_var
from cachesync.consumers.sinks import budget
from cachesync.consumers.sinks.base import Note
from cachesync.consumers.sinks.cdn import CdnOptions, CdnPurgeSink, Sent
from cachesync.consumers.sinks.ledger import PurgeLedger
from cachesync.consumers.sinks.retry import Retries

if TYPE_CHECKING:
    import aioboto3

log = logging.getLogger(__name__)

# Where boto3 finds credentials without AWS_ACCESS_KEY_ID (profiles, roles, containers).
_AWS_CREDENTIAL_SOURCES = (
    "AWS_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
_TRANSIENT_NETWORK = (
    EndpointConnectionError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ReadTimeoutError,
)
_BUSY = {"TooManyInvalidationsInProgress"}
_THROTTLED = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
# The same CallerReference with a different batch: our reference was already used,
# i.e. this batch's invalidation exists.
_ALREADY = {"InvalidationBatchAlreadyExists"}


@dataclass(frozen=True)
class InvalidationRecord:
    """One invalidation this sink created (or found already created), for audit."""

    invalidation_id: str
    caller_reference: str
    distribution: str
    paths: tuple[str, ...]
    command_ids: tuple[str, ...]
    status: str
    created_at_ms: float
    deduplicated: bool = False


class CloudFrontSink(CdnPurgeSink):
    kind: ClassVar[str] = "cloudfront"
    acts_on: ClassVar[tuple[str, ...]] = ("urls", "prefixes")

    def __init__(
        self,
        region: str,
        *,
        distribution: str,
        redis: Redis | str,
        endpoint_url: str | None = None,
        aws_access_key_id: SecretStr | None = None,
        aws_secret_access_key: SecretStr | None = None,
        session: aioboto3.Session | None = None,
        **options: Unpack[CdnOptions],
    ) -> None:
        super().__init__(region, redis=redis, **options)
        assert self.redis is not None and self.ledger is not None  # required here
        self._refs: Redis = self.redis
        self._markers: PurgeLedger = self.ledger
        self.distribution = distribution
        self.label = f"cloudfront {distribution}"
        self.endpoint_url = endpoint_url
        cf = self.policy.cloudfront
        self.retries = Retries(cf.attempts, cf.timeout_s, wait_initial_s=0.5, wait_max_s=10.0)
        self.linger_ms = max(self.policy.window_ms, cf.window_ms)
        if session is None:
            import aioboto3  # only a process that runs this sink pays for importing it

            session = aioboto3.Session(
                aws_access_key_id=_secret(aws_access_key_id),
                aws_secret_access_key=_secret(aws_secret_access_key),
                region_name="us-east-1",  # CloudFront is global; its API lives here
            )
        self._session = session
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        # Invalidations started here and not yet seen complete: id -> (paths, wildcards).
        self.in_flight: dict[str, tuple[int, int]] = {}
        self.invalidations: deque[InvalidationRecord] = deque(maxlen=10_000)

    @classmethod
    def unavailable(cls, settings: Settings, region: str) -> str | None:
        if region not in settings.region_cloudfront_distributions:
            var = region_var("CLOUDFRONT_DISTRIBUTION_", region)
            return f"region {region} has no cloudfront_distribution ({var} or {settings.topology_file})"
        has_keys = settings.aws_access_key_id is not None and settings.aws_secret_access_key
        if not (has_keys or any(os.environ.get(v) for v in _AWS_CREDENTIAL_SOURCES)):
            return "no AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile/role)"
        return None

    @classmethod
    def provider_args(cls, settings: Settings, region: str) -> dict[str, Any]:
        return {
            "distribution": settings.region_cloudfront_distributions[region],
            "endpoint_url": settings.cloudfront_endpoint_url,
            "aws_access_key_id": settings.aws_access_key_id,
            "aws_secret_access_key": settings.aws_secret_access_key,
        }

    async def setup(self) -> None:
        cf = self.policy.cloudfront
        config = Config(
            retries={"max_attempts": 1, "mode": "standard"},  # sinks/retry.py retries, not botocore
            connect_timeout=min(5.0, cf.timeout_s),
            read_timeout=cf.timeout_s,
        )
        self._client = await self._stack.enter_async_context(
            self._session.client("cloudfront", endpoint_url=self.endpoint_url, config=config)
        )

    async def close(self) -> None:
        await self._stack.aclose()
        await super().close()

    async def pending(self, purges: list[PurgeCommand]) -> list[PurgeCommand]:
        """Commands already turned into an invalidation (their markers) are not sent again."""
        done = await self._markers.applied_ids([c.command_id for c in purges])
        return [c for c in purges if c.command_id not in done]

    async def plan(self, todo: Sequence[PurgeCommand]) -> budget.PurgePlan:
        """One invalidation within what the distribution's in-progress limits leave free;
        RetryAfter when they leave nothing."""
        cf = self.policy.cloudfront
        busy_paths, busy_wildcards = await self._in_progress()
        paths_free = cf.max_paths_in_progress - busy_paths
        wildcards_free = cf.max_wildcards_in_progress - busy_wildcards
        if paths_free < 1:
            raise RetryAfter(f"{self.label}: {busy_paths} paths in progress", cf.busy_retry_s)
        limits = budget.Limits(
            provider=self.kind,
            max_items_per_request=cf.max_paths_in_progress,
            tags=False,
            escalate_urls_over=cf.escalate_paths_over,
            max_items=min(paths_free, cf.max_paths_per_flush),
            max_prefixes=max(wildcards_free, 1),
            root_depth=self.policy.root_depth,
        )
        plan = budget.plan(todo, limits, recent=self._recent)
        if plan.count("prefixes") > wildcards_free:
            raise RetryAfter(
                f"{self.label}: {busy_wildcards} wildcards in progress", cf.busy_retry_s
            )
        return plan

    async def send(self, plan: budget.PurgePlan, todo: Sequence[PurgeCommand]) -> Sent:
        if plan.item_count == 0:  # every path was invalidated after these events happened
            return Sent()
        paths = tuple(sorted(plan.items["urls"])) + tuple(
            p + "*" for p in sorted(plan.items["prefixes"])
        )
        command_ids = [c.command_id for c in todo]
        ref = caller_reference(self.distribution, command_ids)
        sent_at = time.time() * 1000
        try:
            record = await self._invalidate(ref, paths, command_ids)
        except PermanentSinkError as exc:
            message = f"{self.label}: {exc}"
            log.warning("%s (%d commands dead-lettered)", message, len(todo))
            return Sent(rejected=dict.fromkeys(command_ids, message))
        for kind in budget.PATH_KINDS:
            self._recent.record(kind, plan.items[kind], sent_at)
        # The invalidation id goes into each command's audit record, for `cachesync trace`.
        note = Note(provider_ids=(record.invalidation_id,), detail=f"{len(paths)} paths")
        return Sent(ref=record.invalidation_id, note=note)

    async def _invalidate(
        self, ref: str, paths: tuple[str, ...], command_ids: list[str]
    ) -> InvalidationRecord:
        batch_key = keys.cloudfront_batch(self.distribution, ref)
        with redis_errors(f"{self.label}: reading batch references"):
            known = await self._refs.get(batch_key)
        now = time.time() * 1000
        if known is not None:
            inv_id = known.decode() if isinstance(known, bytes) else str(known)
            log.info("%s: batch %s is invalidation %s", self.label, ref, inv_id)
            rec = InvalidationRecord(
                inv_id, ref, self.distribution, paths, tuple(command_ids), "known", now, True
            )
            self.invalidations.append(rec)
            return rec
        inv = await self._create(ref, paths)
        inv_id = str(inv["Id"])
        status = str(inv.get("Status", ""))
        wildcards = sum(1 for p in paths if p.endswith("*"))
        if status.lower() != "completed":
            self.in_flight[inv_id] = (len(paths), wildcards)
        with redis_errors(f"{self.label}: invalidation {inv_id} created but recording it"):
            await self._refs.set(batch_key, inv_id, ex=keys.APPLIED_TTL_S)
        telemetry.cdn_items.add(len(paths) - wildcards, {**self.attrs, "kind": "paths"})
        telemetry.cdn_items.add(wildcards, {**self.attrs, "kind": "wildcards"})
        telemetry.cdn_cost_units.add(len(paths), self.attrs)
        log.info(
            "%s: invalidation %s (%d paths, %d wildcards, ref %s)",
            self.label,
            inv_id,
            len(paths),
            wildcards,
            ref,
        )
        rec = InvalidationRecord(
            inv_id, ref, self.distribution, paths, tuple(command_ids), status, now
        )
        self.invalidations.append(rec)
        return rec

    async def _create(self, ref: str, paths: tuple[str, ...]) -> dict[str, Any]:
        """One CreateInvalidation; botocore's errors become the project's here."""
        batch = {"Paths": {"Quantity": len(paths), "Items": list(paths)}, "CallerReference": ref}

        async def once() -> Any:
            self.calls += 1
            try:
                return await self._client.create_invalidation(
                    DistributionId=self.distribution, InvalidationBatch=batch
                )
            except ClientError as exc:
                if _status(exc) >= 500 and _code(exc) not in _BUSY | _THROTTLED:
                    self.count_call("error")
                    raise ServerError(_describe(exc)) from exc
                raise

        try:
            response = await self.retrying(once, network=_TRANSIENT_NETWORK, what=self.label)
        except ClientError as exc:
            raise self._refused(ref, exc) from exc
        except BotoCoreError as exc:  # not a network error worth another try
            self.count_call("error")
            raise TransientError(f"{self.label}: {type(exc).__name__}") from exc
        self.count_call("ok")
        return dict(response["Invalidation"])

    def _refused(self, ref: str, exc: ClientError) -> CachesyncError:
        """What a CloudFront error code means for the batch."""
        code = _code(exc)
        if code in _BUSY | _THROTTLED:
            self.count_call("throttled" if code in _THROTTLED else "busy")
            if code in _THROTTLED:
                self.throttled += 1
                telemetry.cdn_throttled.add(1, self.attrs)
            return RetryAfter(f"{self.label}: {code}", self.policy.cloudfront.busy_retry_s)
        if code in _ALREADY:
            self.count_call("duplicate")
            return TransientError(f"{self.label}: reference {ref} exists with another batch")
        self.count_call("rejected")
        return PermanentSinkError(_describe(exc))

    async def _in_progress(self) -> tuple[int, int]:
        """Paths and wildcards of this sink's invalidations that CloudFront has not completed."""
        for inv_id in list(self.in_flight):
            try:
                response = await self._client.get_invalidation(
                    DistributionId=self.distribution, Id=inv_id
                )
            except (ClientError, BotoCoreError) as exc:
                log.warning("%s: status of %s unknown: %s", self.label, inv_id, exc)
                continue  # still counted as in progress: the safe side
            if str(response["Invalidation"].get("Status", "")).lower() == "completed":
                del self.in_flight[inv_id]
        paths = sum(p for p, _ in self.in_flight.values())
        wildcards = sum(w for _, w in self.in_flight.values())
        return paths, wildcards


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def caller_reference(distribution: str, command_ids: list[str]) -> str:
    """Deterministic for a set of commands: the same batch always yields the same reference."""
    digest = hashlib.sha256("\n".join([distribution, *sorted(set(command_ids))]).encode())
    return "cachesync-" + digest.hexdigest()[:40]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _describe(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"HTTP {_status(exc)}: {error.get('Code', '?')}: {error.get('Message', '')}".strip()
