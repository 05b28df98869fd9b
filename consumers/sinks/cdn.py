"""The template of the CDN purge sinks: Cloudflare, CloudFront and the HTTP edge.

A flush is the same for every provider and is written here once:

    take the window's purges, and where the runner read each (topic, partition, offset)
    -> keep those still to do (`pending`): a purge applied before (its marker, or its
       partition's applied offset covers it: a redelivery) is not sent again, and is
       audited as applied with when it was; CloudFront also finds the invalidations an
       earlier try made but never recorded
    -> forget purge times older than `remember_purged_s`
    -> plan: coalesce and escalate them through the purge budget to fit the provider's
       limits (`plan`), and count what was coalesced and escalated
    -> send the planned requests (`send`, the provider's part); each acknowledged request
       is remembered in `Progress` (the retry of a failed batch does not send it again)
       and in `RecentPurges` (a later window does not purge it again for older events)
    -> a provider that refuses the sink itself (credentials, zone, distribution) raises
       `SinkUnavailable` from `plan` or `send`: `Outage` gives it the sink's backoff, the
       blocked gauge and a warning a minute, and the batch goes back uncommitted
    -> clear Progress, record the applied commands in the region's ledger (markers,
       version fences, and each partition's applied offset, short of a rejected command),
       purge latency and the ack hook
    -> FlushResult, the commands the provider refused for good as `Rejected`.

A provider module holds only its requests, the mapping of its answers and its limits;
it decides which refusals are the sink's (`CredentialsRejected`, `SinkMisconfigured`) and
which are a command's (returned in `Sent.rejected`, bisected down to the commands that
named the refused items).
HTTP providers call through `request` (5xx and network errors retried by
`sinks/retry.py`, calls counted); others through `retrying` with their own network
errors.

When a flush happens is the purge budget's (`coalesce_for`, sinks/budget.py
`coalesce_s`): at once when the provider's `bucket` has a token, unless a burst is
arriving; the policy's window is only an upper bound.

Tier order is not here: the edges declare `after = ("redis",)`, and the runner holds a
batch until the region's Redis sink has applied its events (pipeline/roles.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypedDict, TypeVar, Unpack

import httpx
from redis.asyncio import Redis

from cachesync.consumers import telemetry
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import RetryAfter, ServerError, SinkUnavailable, TransientError
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks import budget
from cachesync.consumers.sinks.base import FlushResult, Note, Position, PurgeSink, Rejected
from cachesync.consumers.sinks.ledger import AckHook, PurgeLedger, record_latency, redelivered
from cachesync.consumers.sinks.retry import (
    HttpEndpoint,
    Outage,
    Retries,
    redis_client,
    with_retries,
)
from cachesync.topology.model import CdnPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

# Our own pacing may sleep this long for a token; longer waits pause the partition.
MAX_PACING_SLEEP_S = 1.0


class CdnOptions(TypedDict, total=False):
    """What every CDN sink's constructor takes besides its provider's own settings."""

    policy: CdnPolicy | None  # `cdn:` of the topology; the defaults when None
    on_ack: AckHook | None  # called with each acknowledged purge (the benchmark's latency)


@dataclass
class Pending:
    """What a flush has left to send (`todo`), and what it has not."""

    todo: list[PurgeCommand]
    # Applied before this delivery, by id: audited as applied, with when (not recorded again).
    done: dict[str, Note] = field(default_factory=dict)
    # Applied by an earlier try of this batch whose record was lost (CloudFront found its
    # invalidation): not sent again, but recorded with this flush. Their notes are in `done`.
    found: list[PurgeCommand] = field(default_factory=list)


@dataclass
class Sent:
    """What a provider's `send` did with a flush's plan."""

    rejected: dict[str, str] = field(default_factory=dict)  # command id -> why, for good
    ref: str = ""  # the provider's name for the acknowledgement: zone, edge, invalidation id
    note: Note | None = None  # said of every applied command (CloudFront: the invalidation)


class CdnPurgeSink(PurgeSink):
    """A purge sink in front of guests, paying in rate budget or money per item."""

    is_cdn: ClassVar[bool] = True
    # Tier order: an edge purges an event only after the region's Redis has, so that an
    # edge miss cannot refill from a stale Redis.
    after: tuple[str, ...] = ("redis",)
    # Redis announces what it applied (pipeline/tiers.py); the markers are read again
    # this often only in case an announcement was lost.
    after_retry_s: float = 1.0
    # Set by the provider: what log lines and errors call the target (`cloudflare zone Z`),
    # how its calls are retried (from its section of the policy), its budget limits (or
    # built per flush in its `plan`), and its HTTP endpoint if it is called over HTTP.
    label: str
    retries: Retries
    limits: budget.Limits
    http: HttpEndpoint | None = None
    # The provider's call budget, if it has one: calls wait for a token (`pace`), and
    # purges gather while it is empty (`coalesce_for`).
    bucket: budget.TokenBucket | None = None
    # After a quiet spell (the bucket full), the first call waits until its oldest purge is
    # this old, so that a burst just starting is seen as one (CloudFront: its calls are few
    # and its minimum per burst is small, so one early call is a large share of it).
    settle_s: float = 0.0

    def __init__(
        self, region: str, *, redis: Redis | str | None, **options: Unpack[CdnOptions]
    ) -> None:
        super().__init__(region)
        self.policy = options.get("policy") or CdnPolicy()
        # The region's Redis, for the ledger (the warmer's fences, the applied markers
        # the runner's tier order reads); None only when a test builds the sink alone.
        self.redis = redis_client(redis)
        self.ledger = PurgeLedger(self.redis, self.kind, region) if self.redis is not None else None
        self.linger_ms = self.policy.window_ms
        self.after_max_wait_s = self.policy.tier_max_wait_s
        self.max_batch_records = self.policy.max_batch_records
        self.on_ack = options.get("on_ack")
        self._progress = budget.Progress()
        self._recent = budget.RecentPurges(
            keep_s=self.policy.remember_purged_s, skew_ms=self.policy.clock_skew_ms
        )
        self.calls = 0  # provider calls made, for the CLI's status and the benchmark
        # Items escalated, by the limit that forced it (budget.Escalation.reason).
        self.escalations: Counter[str] = Counter()
        self.throttled = 0
        # While the provider refuses the sink itself: its backoff, gauge and warnings.
        self.outage = Outage(self.kind, region)

    @classmethod
    def from_settings(cls, settings: Settings, region: str) -> Self:
        """Every CDN sink gets the region's Redis and the topology's `cdn:` policy; the
        provider adds its own arguments (`provider_args`)."""
        return cls(
            region,
            redis=settings.region_redis_urls[region],
            policy=settings.topology.cdn,
            **cls.provider_args(settings, region),
        )

    @classmethod
    @abstractmethod
    def provider_args(cls, settings: Settings, region: str) -> dict[str, Any]:
        """The provider's own constructor arguments for `region` (zone, distribution, edge)."""

    @property
    def attrs(self) -> dict[str, str]:
        return {"provider": self.kind, "region": self.region}

    @property
    def client(self) -> httpx.AsyncClient:
        assert self.http is not None, f"{self.kind} has no HTTP endpoint"
        return self.http.client

    async def setup(self) -> None:
        if self.http is not None:
            _ = self.http.client

    @property
    def backend_url(self) -> str | None:
        return self.http.base_url if self.http is not None else None

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.redis is not None:
            await self.redis.aclose()

    # -- the flush ------------------------------------------------------------
    async def flush(self) -> FlushResult:
        purges = self.take()
        positions = self.take_positions()
        if not purges:
            return FlushResult()
        pending = await self.pending(purges, positions)
        todo = pending.todo
        if not todo:
            await self._record(pending.found, positions)
            return FlushResult(applied=len(purges), notes=pending.done)
        self._recent.expire(time.time() * 1000)
        calls = self.calls
        self.outage.hold()  # while blocked, one batch asks the provider per wait, not each
        try:
            plan = await self.plan(todo)
            telemetry.cdn_coalesced.add(plan.coalesced, self.attrs)
            self.count_escalations(plan)
            sent = await self.send(plan, todo)  # raises TransientError / RetryAfter
        except SinkUnavailable as exc:
            # Not the commands' fault: none is rejected, the batch waits for the sink.
            self.outage.refused(exc)
            raise
        if self.calls > calls:  # the provider answered, and not with a refusal of the sink
            self.outage.accepted()
        self._progress.clear()
        applied = [c for c in todo if c.command_id not in sent.rejected]
        await self._record([*pending.found, *applied], positions, held=sent.rejected.keys())
        record_latency(self.kind, self.region, applied, hook=self.on_ack, ref=sent.ref)
        return FlushResult(
            applied=len(purges) - len(todo) + len(applied),
            rejected=tuple(
                Rejected(c, sent.rejected[c.command_id])
                for c in todo
                if c.command_id in sent.rejected
            ),
            notes={
                **pending.done,
                **({c.command_id: sent.note for c in applied} if sent.note else {}),
            },
        )

    def count_escalations(self, plan: budget.PurgePlan) -> None:
        """The plan's escalations, by the limit that forced them: counted, and logged."""
        for esc in plan.escalations:
            self.escalations[esc.reason] += esc.replaced
            telemetry.cdn_escalations.add(1, {**self.attrs, "reason": esc.reason})
            log.info(
                "%s: %d items escalated to %s (%s)",
                self.label,
                esc.replaced,
                esc.prefix,
                esc.reason,
            )

    async def pending(
        self, purges: list[PurgeCommand], positions: Mapping[str, Position]
    ) -> Pending:
        """The purges still to do: those this sink applied before (their markers, or their
        partition's applied offset: a redelivery) are not sent again."""
        if self.ledger is None:
            return Pending(purges)
        before = await self.ledger.applied_before(purges, positions)
        return Pending(
            [c for c in purges if c.command_id not in before],
            done={command_id: redelivered(a) for command_id, a in before.items()},
        )

    async def _record(
        self,
        applied: Sequence[PurgeCommand],
        positions: Mapping[str, Position],
        *,
        held: Collection[str] = (),
    ) -> None:
        """Record the applied purges in the region's ledger (markers, fences, the partitions'
        applied offsets, short of the `held` commands), then tell the provider (`recorded`)."""
        if self.ledger is not None:
            await self.ledger.record(applied, positions=positions, held=held)
        await self.recorded()

    async def recorded(self) -> None:
        """The flush's applied purges are in the ledger: what the provider kept until then
        (CloudFront: its unsettled invalidations) can go."""

    async def plan(self, todo: Sequence[PurgeCommand]) -> budget.PurgePlan:
        """The budget's plan for `todo` within `limits`, minus what a failed try already sent."""
        return budget.plan(todo, self.limits, progress=self._progress, recent=self._recent)

    @abstractmethod
    async def send(self, plan: budget.PurgePlan, todo: Sequence[PurgeCommand]) -> Sent:
        """Make the provider calls for `plan`; call `acknowledged` for each acknowledged request."""

    def acknowledged(self, request: budget.PurgeRequest, sent_at_ms: float) -> None:
        """The provider acknowledged `request`: not sent again on a retry, nor soon after."""
        self._progress.record(request)
        self._recent.record(request.kind, request.items, sent_at_ms)

    # -- when to flush ----------------------------------------------------------
    def coalesce_for(self, count: int, oldest_ms: int, newest_ms: int, quiet_s: float) -> float:
        """How much longer the runner gathers commands before this sink's flush (<= 0: now):
        at once when the bucket has a token and no burst is arriving (after a quiet spell,
        once the provider's settle time has passed), never past the window."""
        bucket = self.bucket
        return budget.coalesce_s(
            count,
            oldest_ms,
            newest_ms,
            quiet_s,
            window_ms=self.linger_ms,
            budget_wait_s=bucket.wait_s() if bucket is not None else 0.0,
            burst_per_s=self.policy.burst_records_per_s,
            settle_s=self.settle_s if bucket is None or bucket.idle() else 0.0,
        )

    async def pace(self) -> None:
        """Take a token of the provider's bucket before a call, sleeping for it if that is
        short; a longer wait pauses the partition instead (RetryAfter)."""
        if self.bucket is None:
            return
        while (wait := self.bucket.take()) > 0:
            if wait > MAX_PACING_SLEEP_S:
                raise RetryAfter(f"{self.label}: rate budget spent", wait)
            await asyncio.sleep(wait)

    # -- calls ----------------------------------------------------------------
    def count_call(self, outcome: str) -> None:
        """One provider call, by outcome: ok, throttled, busy, error, rejected (a command's
        items), blocked (the sink's credentials or target), duplicate."""
        telemetry.cdn_api_calls.add(1, {**self.attrs, "outcome": outcome})

    async def retrying(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        network: tuple[type[Exception], ...],
        what: str,
    ) -> T:
        """`call` through the sinks' one retry helper; a call that never got an answer counts
        as an error once (a 5xx counts on each attempt, where it is raised)."""
        try:
            return await with_retries(
                call, self.retries, network=network, sink=self.kind, region=self.region, what=what
            )
        except TransientError as exc:
            if isinstance(exc.__cause__, network):
                self.count_call("error")
            raise

    async def request(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        """One HTTP call to the provider; 5xx and network errors are retried, then raise
        TransientError. The response is under 500; what it means is the provider's business."""

        async def once() -> httpx.Response:
            self.calls += 1
            response = await self.client.request(method, path, **kwargs)
            if response.status_code >= 500:
                self.count_call("error")
                raise ServerError(f"HTTP {response.status_code}{self.server_error(response)}")
            return response

        return await self.retrying(once, network=(httpx.TransportError,), what=what)

    def server_error(self, response: httpx.Response) -> str:
        """What to add to `HTTP <status>` about a 5xx answer (the provider's error detail)."""
        return ""
