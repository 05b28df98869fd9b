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
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

import aioboto3
import stamina
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
from redis.exceptions import RedisError

from cachesync.consumers import keys, telemetry
from cachesync.consumers.errors import RetryAfter, TransientError
from cachesync.consumers.sinks import budget
from cachesync.consumers.sinks.base import FlushResult, Note, PurgeSink, Rejected, ServerError
from cachesync.consumers.sinks.ledger import AckHook, PurgeLedger, record_latency
from cachesync.topology.model import CdnPolicy

log = logging.getLogger(__name__)

PROVIDER = "cloudfront"
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


class CloudFrontSink(PurgeSink):
    acts_on: ClassVar[tuple[str, ...]] = ("urls", "prefixes")
    kind: ClassVar[str] = "cloudfront"
    is_cdn: ClassVar[bool] = True

    def __init__(
        self,
        region: str,
        *,
        distribution: str,
        redis: Redis | str,
        policy: CdnPolicy | None = None,
        endpoint_url: str | None = None,
        aws_access_key_id: SecretStr | None = None,
        aws_secret_access_key: SecretStr | None = None,
        session: aioboto3.Session | None = None,
        on_ack: AckHook | None = None,
    ) -> None:
        super().__init__(region)
        self.policy = policy or CdnPolicy()
        self.distribution = distribution
        self.endpoint_url = endpoint_url
        self.redis = Redis.from_url(redis, socket_timeout=5) if isinstance(redis, str) else redis
        self.ledger = PurgeLedger(self.redis, self.kind, region)
        self.linger_ms = max(self.policy.window_ms, self.policy.cloudfront.window_ms)
        self.max_batch_records = self.policy.max_batch_records
        self._session = session or aioboto3.Session(
            aws_access_key_id=aws_access_key_id.get_secret_value() if aws_access_key_id else None,
            aws_secret_access_key=(
                aws_secret_access_key.get_secret_value() if aws_secret_access_key else None
            ),
            region_name="us-east-1",  # CloudFront is global; its API lives here
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        # Invalidations started here and not yet seen complete: id -> (paths, wildcards).
        self.in_flight: dict[str, tuple[int, int]] = {}
        self._recent = budget.RecentPurges(
            keep_s=self.policy.remember_purged_s, skew_ms=self.policy.clock_skew_ms
        )
        self.invalidations: deque[InvalidationRecord] = deque(maxlen=10_000)
        self.on_ack = on_ack
        self.calls = 0  # create_invalidation calls made
        self.throttled = 0

    async def setup(self) -> None:
        cf = self.policy.cloudfront
        config = Config(
            retries={"max_attempts": 1, "mode": "standard"},  # stamina retries, not botocore
            connect_timeout=min(5.0, cf.timeout_s),
            read_timeout=cf.timeout_s,
        )
        self._client = await self._stack.enter_async_context(
            self._session.client("cloudfront", endpoint_url=self.endpoint_url, config=config)
        )

    async def flush(self) -> FlushResult:
        pending = self.take()
        if not pending:
            return FlushResult()
        done = await self.ledger.applied_ids([c.command_id for c in pending])
        todo = [c for c in pending if c.command_id not in done]
        if not todo:
            return FlushResult(applied=len(pending))
        cf = self.policy.cloudfront
        busy_paths, busy_wildcards = await self._in_progress()
        paths_free = cf.max_paths_in_progress - busy_paths
        wildcards_free = cf.max_wildcards_in_progress - busy_wildcards
        if paths_free < 1:
            raise RetryAfter(
                f"cloudfront {self.distribution}: {busy_paths} paths in progress", cf.busy_retry_s
            )
        limits = budget.Limits(
            provider=PROVIDER,
            max_items_per_request=cf.max_paths_in_progress,
            tags=False,
            escalate_urls_over=cf.escalate_paths_over,
            max_items=min(paths_free, cf.max_paths_per_flush),
            max_prefixes=max(wildcards_free, 1),
            root_depth=self.policy.root_depth,
        )
        self._recent.expire(time.time() * 1000)
        plan = budget.plan(todo, limits, recent=self._recent)
        if plan.count("prefixes") > wildcards_free:
            raise RetryAfter(
                f"cloudfront {self.distribution}: {busy_wildcards} wildcards in progress",
                cf.busy_retry_s,
            )
        attrs = {"provider": PROVIDER, "region": self.region}
        telemetry.cdn_coalesced.add(plan.coalesced, attrs)
        for esc in plan.escalations:
            telemetry.cdn_escalations.add(1, {**attrs, "reason": esc.reason})
            log.info(
                "cloudfront %s: %d paths escalated to %s* (%s)",
                self.distribution,
                esc.replaced,
                esc.prefix,
                esc.reason,
            )
        if plan.item_count == 0:  # every path was invalidated after these events happened
            await self.ledger.record(todo)
            record_latency(PROVIDER, self.region, todo, hook=self.on_ack)
            return FlushResult(applied=len(pending))
        paths = tuple(sorted(plan.items["urls"])) + tuple(
            p + "*" for p in sorted(plan.items["prefixes"])
        )
        ref = caller_reference(self.distribution, [c.command_id for c in todo])
        sent_at = time.time() * 1000
        try:
            record = await self._invalidate(ref, paths, [c.command_id for c in todo])
        except _Permanent as exc:
            message = f"cloudfront {self.distribution}: {exc}"
            log.warning("%s (%d commands dead-lettered)", message, len(todo))
            return FlushResult(
                applied=len(pending) - len(todo), rejected=tuple(Rejected(c, message) for c in todo)
            )
        for kind in budget.PATH_KINDS:
            self._recent.record(kind, plan.items[kind], sent_at)
        await self.ledger.record(todo)
        record_latency(PROVIDER, self.region, todo, hook=self.on_ack, ref=record.invalidation_id)
        # The invalidation id goes into each command's audit record, for `cachesync trace`.
        note = Note(provider_ids=(record.invalidation_id,), detail=f"{len(paths)} paths")
        return FlushResult(applied=len(pending), notes={c.command_id: note for c in todo})

    async def _invalidate(
        self, ref: str, paths: tuple[str, ...], command_ids: list[str]
    ) -> InvalidationRecord:
        batch_key = keys.cloudfront_batch(self.distribution, ref)
        try:
            known = await self.redis.get(batch_key)
        except (RedisError, OSError) as exc:
            raise TransientError(
                f"cloudfront {self.distribution}: reading batch references failed: "
                f"{type(exc).__name__}"
            ) from exc
        now = time.time() * 1000
        if known is not None:
            inv_id = known.decode() if isinstance(known, bytes) else str(known)
            log.info("cloudfront %s: batch %s is invalidation %s", self.distribution, ref, inv_id)
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
        try:
            await self.redis.set(batch_key, inv_id, ex=keys.APPLIED_TTL_S)
        except (RedisError, OSError) as exc:
            raise TransientError(
                f"cloudfront {self.distribution}: invalidation {inv_id} created but not "
                f"recorded: {type(exc).__name__}"
            ) from exc
        attrs = {"provider": PROVIDER, "region": self.region}
        telemetry.cdn_items.add(len(paths) - wildcards, {**attrs, "kind": "paths"})
        telemetry.cdn_items.add(wildcards, {**attrs, "kind": "wildcards"})
        telemetry.cdn_cost_units.add(len(paths), attrs)
        log.info(
            "cloudfront %s: invalidation %s (%d paths, %d wildcards, ref %s)",
            self.distribution,
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
        cf = self.policy.cloudfront
        attrs = {"provider": PROVIDER, "region": self.region}
        batch = {"Paths": {"Quantity": len(paths), "Items": list(paths)}, "CallerReference": ref}
        try:
            async for attempt in stamina.retry_context(
                on=(ServerError, *_TRANSIENT_NETWORK),
                attempts=cf.attempts,
                timeout=cf.timeout_s * cf.attempts,
                wait_initial=0.5,
                wait_max=10.0,
            ):
                with attempt:
                    self.calls += 1
                    try:
                        response = await self._client.create_invalidation(
                            DistributionId=self.distribution, InvalidationBatch=batch
                        )
                    except ClientError as exc:
                        if _status(exc) >= 500 and _code(exc) not in _BUSY | _THROTTLED:
                            telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "error"})
                            raise ServerError(_describe(exc)) from exc
                        raise
        except ClientError as exc:
            code = _code(exc)
            if code in _BUSY | _THROTTLED:
                outcome = "throttled" if code in _THROTTLED else "busy"
                telemetry.cdn_api_calls.add(1, {**attrs, "outcome": outcome})
                if code in _THROTTLED:
                    self.throttled += 1
                    telemetry.cdn_throttled.add(1, attrs)
                raise RetryAfter(
                    f"cloudfront {self.distribution}: {code}", cf.busy_retry_s
                ) from exc
            if code in _ALREADY:
                telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "duplicate"})
                raise TransientError(
                    f"cloudfront {self.distribution}: reference {ref} exists with another batch"
                ) from exc
            telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "rejected"})
            raise _Permanent(_describe(exc)) from exc
        except ServerError as exc:
            raise TransientError(f"cloudfront {self.distribution}: {exc}") from exc
        except BotoCoreError as exc:
            telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "error"})
            raise TransientError(f"cloudfront {self.distribution}: {type(exc).__name__}") from exc
        telemetry.cdn_api_calls.add(1, {**attrs, "outcome": "ok"})
        return dict(response["Invalidation"])

    async def _in_progress(self) -> tuple[int, int]:
        """Paths and wildcards of this sink's invalidations that CloudFront has not completed."""
        for inv_id in list(self.in_flight):
            try:
                response = await self._client.get_invalidation(
                    DistributionId=self.distribution, Id=inv_id
                )
            except (ClientError, BotoCoreError) as exc:
                log.warning(
                    "cloudfront %s: status of %s unknown: %s", self.distribution, inv_id, exc
                )
                continue  # still counted as in progress: the safe side
            if str(response["Invalidation"].get("Status", "")).lower() == "completed":
                del self.in_flight[inv_id]
        paths = sum(p for p, _ in self.in_flight.values())
        wildcards = sum(w for _, w in self.in_flight.values())
        return paths, wildcards

    async def close(self) -> None:
        await self._stack.aclose()
        await self.redis.aclose()


class _Permanent(Exception):
    pass


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
