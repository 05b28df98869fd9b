"""The CloudFront sink: a region's purges as one invalidation per flush on its distribution.

Paths are coalesced and escalated by the purge budget so that a flush fits in one
invalidation and within the distribution's in-progress limits (3,000 paths, 15
wildcards), counting the invalidations this sink started that are not yet complete.
When those limits are full, or CloudFront answers `TooManyInvalidationsInProgress`,
the batch waits (`RetryAfter`, the partition is paused): nothing is dropped.

Idempotency is the project's own, because neither moto nor a restarted process
would provide it, and the same commands must make the same invalidation whatever the
batch they come back in (a batch re-read after a crash holds what arrived since):

- commands already applied are skipped (their markers, or their partition's applied
  offset: sinks/ledger.py), so an invalidation covers only commands not yet applied;
- the `CallerReference` is derived from the command ids of the invalidation. Before it
  is asked for, its reference, command ids and paths are written to the region's Redis
  (`keys.CLOUDFRONT_UNSETTLED`) until the commands are recorded as applied. A re-read
  batch first regroups the commands of each such invalidation under its reference and
  paths (`pending`), and only the others make a new one;
- a reference and its invalidation id are remembered (`keys.CLOUDFRONT_BATCH`, past the
  command topics' retention), so a regrouped or retried batch is never a second
  invalidation. A crash between CloudFront's answer and that write is left to
  CloudFront itself, which answers the same CallerReference with the same paths with
  the invalidation it made (moto does not: it makes another).

The ids of the invalidations are kept in `invalidations` (and logged) for audit records.

A warm through CloudFront (a region whose `front` is cloudfront) waits for the
invalidation to complete, not only to be created: the sink follows each invalidation it
made until CloudFront says it is complete (GetInvalidation, one call per
`completion_poll_s` per distribution, within the API's low rate), then marks its events
applied under `COMPLETED` and announces them (`keys.tier_applied`), which wakes the
warmer's runner. An invalidation still in progress when the process stops is not
followed by the next one: its warms are dropped after the warmer's `max_wait_s`.

Calls are paced by a token bucket (`cloudfront.rate_per_s`, `burst`): a purge goes out
at once when a token is free, and purges gather while none is (sinks/budget.py).

A refusal of the sink itself is not the commands' fault: the credential error codes
(AccessDenied, ExpiredToken, InvalidClientTokenId, SignatureDoesNotMatch, ...), any
401/403 and botocore's missing credentials raise `CredentialsRejected`, an unknown
distribution `SinkMisconfigured`, and the batch waits, uncommitted, until CloudFront
accepts the sink again (sinks/cdn.py). A refusal of the batch's content (400:
InvalidArgument for a bad path; 413: BatchTooLarge) is bisected by command, each half
its own invalidation with a CallerReference from the half's command ids, so one bad
path dead-letters only the commands that named it, not a window of thousands.

The flush itself (ledger, budget plan, retries) is the CDN template's (sinks/cdn.py);
this module holds CloudFront's request, the mapping of its error codes, and its limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Unpack

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import (
    CachesyncError,
    CredentialsRejected,
    PermanentSinkError,
    RetryAfter,
    ServerError,
    SinkMisconfigured,
    SinkUnavailable,
    TransientError,
    redis_errors,
)
from cachesync.consumers.settings import Settings, region_var
from cachesync.consumers.sinks import budget
from cachesync.consumers.sinks.base import Note, Position
from cachesync.consumers.sinks.cdn import CdnOptions, CdnPurgeSink, Pending, Sent
from cachesync.consumers.sinks.retry import Retries

if TYPE_CHECKING:
    import aioboto3

log = logging.getLogger(__name__)

# The tier a warm through CloudFront waits for: the invalidation of its event completed
# (its markers are `keys.applied_event(COMPLETED, event_id)`).
COMPLETED = "cloudfront:completed"

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
# The sink's credentials, whatever the status (ExpiredToken is a 400); any 401/403 too.
_CREDENTIALS = {
    "AccessDenied",
    "AccessDeniedException",
    "AuthFailure",
    "ExpiredToken",
    "ExpiredTokenException",
    "IncompleteSignature",
    "InvalidAccessKeyId",
    "InvalidClientTokenId",
    "InvalidSignatureException",
    "InvalidToken",
    "MissingAuthenticationToken",
    "NotAuthorized",
    "RequestExpired",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
}
_NO_CREDENTIALS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
# The sink's target: a distribution CloudFront does not know.
_UNKNOWN_TARGET = {"NoSuchDistribution"}
# A refusal of the batch's content, which a part of the batch may pass: bisect it.
_SPLITTABLE_STATUS = {400, 413}


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
        # References of this flush's invalidations, settled once its commands are recorded.
        self._settling: set[str] = set()
        self._paths_free = cf.max_paths_in_progress  # at the last plan
        self.bucket = budget.TokenBucket(cf.rate_per_s, cf.burst)
        self.settle_s = cf.settle_ms / 1000
        # This flush's commands' events, and the invalidations it made (or found), so that
        # their completion marks the right events; then those still in progress.
        self._events_of: dict[str, str] = {}
        self._made: list[InvalidationRecord] = []
        self.completing: dict[str, frozenset[str]] = {}  # invalidation id -> event ids
        self._follower: asyncio.Task[None] | None = None

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

    @property
    def backend_url(self) -> str | None:
        return self.endpoint_url or "https://cloudfront.amazonaws.com"

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self._stack.aclose()
        await super().close()

    async def pending(
        self, purges: list[PurgeCommand], positions: Mapping[str, Position]
    ) -> Pending:
        """Commands applied before are not sent again (the template's `pending`); those of an
        invalidation asked for before and never recorded are regrouped under its reference
        and paths: found again (the usual case), or asked for again with the same batch."""
        self._settling = set()  # what a failed flush made stays unsettled: its batch returns
        self._made = []
        self._events_of = {c.command_id: c.origin_event_id for c in purges}
        pending = await super().pending(purges, positions)
        unsettled = await self._unsettled() if pending.todo else {}
        for ref, (command_ids, paths) in unsettled.items():
            group = [c for c in pending.todo if c.command_id in command_ids]
            if not group:
                continue
            calls = self.calls
            try:
                record = await self._invalidate(ref, paths, [c.command_id for c in group])
            except PermanentSinkError:
                continue  # refused, and forgotten: its commands go the usual way
            except SinkUnavailable as exc:
                self.outage.refused(exc)
                raise
            if self.calls > calls:
                self.outage.accepted()
            note = Note(
                provider_ids=(record.invalidation_id,),
                detail=f"redelivered; {len(paths)} paths in invalidation "
                f"{record.invalidation_id}, asked for before this delivery",
            )
            pending.found.extend(group)
            pending.done.update(dict.fromkeys((c.command_id for c in group), note))
            pending.todo = [c for c in pending.todo if c.command_id not in command_ids]
        return pending

    async def recorded(self) -> None:
        """The flush's commands are in the ledger: their invalidations are settled, and
        followed until they complete (for the warms that wait for that)."""
        refs, self._settling = self._settling, set()
        if refs:
            with redis_errors(f"{self.label}: settling invalidations"):
                await self._refs.hdel(keys.cloudfront_unsettled(self.distribution), *refs)
        made, self._made = self._made, []
        completed: set[str] = set()
        for record in made:
            events = frozenset(
                self._events_of[c] for c in record.command_ids if c in self._events_of
            )
            if record.status.lower() == "completed":
                completed |= events
            elif events:
                self.completing[record.invalidation_id] = (
                    self.completing.get(record.invalidation_id, frozenset()) | events
                )
        await self._mark_completed(completed)
        if self.completing and (self._follower is None or self._follower.done()):
            self._follower = asyncio.create_task(self._follow(), name=f"{self.label} completion")

    async def _follow(self) -> None:
        """Ask CloudFront about each invalidation in progress, one call per
        `completion_poll_s`, until none is left."""
        while self.completing:
            for inv_id in list(self.completing):
                await asyncio.sleep(self.policy.cloudfront.completion_poll_s)
                try:
                    response = await self._client.get_invalidation(
                        DistributionId=self.distribution, Id=inv_id
                    )
                except (ClientError, BotoCoreError) as exc:
                    log.debug("%s: status of %s unknown: %s", self.label, inv_id, exc)
                    continue
                if str(response["Invalidation"].get("Status", "")).lower() == "completed":
                    self.in_flight.pop(inv_id, None)
                    try:
                        await self._mark_completed(self.completing[inv_id])
                    except TransientError as exc:
                        log.warning("%s: %s", self.label, exc)
                        continue
                    del self.completing[inv_id]

    async def _mark_completed(self, events: Collection[str]) -> None:
        """Mark these events' invalidations complete in the region's Redis, and say so."""
        if not events:
            return
        now = int(time.time() * 1000)
        with redis_errors(f"{self.label}: marking completed invalidations"):
            pipe = self._refs.pipeline(transaction=False)
            for event in events:
                pipe.set(keys.applied_event(COMPLETED, event), now, ex=keys.APPLIED_TTL_S)
            pipe.publish(keys.tier_applied(self.region, COMPLETED), "\n".join(sorted(events)))
            await pipe.execute()

    async def _unsettled(self) -> dict[str, tuple[frozenset[str], tuple[str, ...]]]:
        """The invalidations asked for and not yet recorded: reference -> (command ids, paths).
        One left behind (its record lost, its commands applied since) goes after the
        command topics' retention."""
        key = keys.cloudfront_unsettled(self.distribution)
        with redis_errors(f"{self.label}: reading unsettled invalidations"):
            entries = await self._refs.hgetall(key)
        found: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {}
        stale: list[str] = []
        oldest = time.time() * 1000 - keys.CLOUDFRONT_BATCH_TTL_S * 1000
        for raw, value in entries.items():
            ref = raw.decode() if isinstance(raw, bytes) else str(raw)
            entry = json.loads(value)
            if entry["at"] < oldest:
                stale.append(ref)
                continue
            found[ref] = (frozenset(entry["ids"]), tuple(entry["paths"]))
        if stale:
            with redis_errors(f"{self.label}: forgetting old unsettled invalidations"):
                await self._refs.hdel(key, *stale)
        return found

    async def plan(self, todo: Sequence[PurgeCommand]) -> budget.PurgePlan:
        """One invalidation within what the distribution's in-progress limits leave free;
        RetryAfter when they leave nothing."""
        cf = self.policy.cloudfront
        busy_paths, busy_wildcards = await self._in_progress()
        paths_free = cf.max_paths_in_progress - busy_paths
        wildcards_free = cf.max_wildcards_in_progress - busy_wildcards
        if paths_free < 1:
            raise RetryAfter(f"{self.label}: {busy_paths} paths in progress", cf.busy_retry_s)
        # Paths beyond what is free go in further invalidations (`send`), not into wildcards:
        # only the wildcard limit, or a cost budget, escalates paths.
        limits = budget.Limits(
            provider=self.kind,
            max_items_per_request=cf.max_paths_in_progress,
            tags=False,
            escalate_urls_over=cf.escalate_paths_over,
            max_items=cf.max_paths_per_flush,
            max_prefixes=max(wildcards_free, 1),
            root_depth=self.policy.root_depth,
            wildcard_anywhere=True,
        )
        self._paths_free = paths_free
        plan = budget.plan(todo, limits, recent=self._recent)
        if plan.count("prefixes") > wildcards_free:
            raise RetryAfter(
                f"{self.label}: {busy_wildcards} wildcards in progress", cf.busy_retry_s
            )
        return plan

    async def send(self, plan: budget.PurgePlan, todo: Sequence[PurgeCommand]) -> Sent:
        if plan.item_count == 0:  # every path was invalidated after these events happened
            return Sent()
        cf = self.policy.cloudfront
        parts = _parts(plan, todo, size=cf.max_paths_in_progress)
        # More paths than one invalidation may hold in progress go as several, each once the
        # distribution has room for it (the parts made are found again by their references
        # if the batch comes back). A part with no room now: what is free is taken, with
        # this part's and the later ones' paths escalated to fit (the in-progress limit
        # forces it), or, with nothing free, the batch waits.
        made: list[str] = []
        rejected: dict[str, str] = {}
        free = self._paths_free
        for n, (ids, paths) in enumerate(parts):
            if n:
                busy, _ = await self._in_progress()
                free = cf.max_paths_in_progress - busy
            room = len(paths) <= free
            if room:
                part = await self._send_part(plan, (ids, paths))
            else:
                rest = {cid for later, _ in parts[n:] for cid in later}
                part = await self._fit([c for c in todo if c.command_id in rest], free)
            rejected.update(part.rejected)
            made.extend(part.note.provider_ids if part.note else ())
            if not room:
                break
        if len(made) == 1:
            note = Note(provider_ids=tuple(made), detail=f"{sum(len(p) for _, p in parts)} paths")
        else:
            note = Note(provider_ids=tuple(made), detail=f"{len(made)} invalidations")
        return Sent(rejected=rejected, ref=",".join(made), note=note if made else None)

    async def _fit(self, commands: list[PurgeCommand], free: int) -> Sent:
        """`commands` as one invalidation of at most `free` paths, escalated to fit."""
        cf = self.policy.cloudfront
        if free < 1:
            raise RetryAfter(f"{self.label}: no paths free in progress", cf.busy_retry_s)
        _, busy_wildcards = await self._in_progress()
        limits = budget.Limits(
            provider=self.kind,
            max_items_per_request=cf.max_paths_in_progress,
            tags=False,
            escalate_urls_over=cf.escalate_paths_over,
            max_items=free,
            max_prefixes=max(cf.max_wildcards_in_progress - busy_wildcards, 1),
            root_depth=self.policy.root_depth,
            wildcard_anywhere=True,
        )
        plan = budget.plan(commands, limits, recent=self._recent)
        if plan.count("prefixes") > cf.max_wildcards_in_progress - busy_wildcards:
            raise RetryAfter(
                f"{self.label}: {busy_wildcards} wildcards in progress", cf.busy_retry_s
            )
        self.count_escalations(plan)
        paths = tuple(sorted(plan.items["urls"])) + tuple(
            p + "*" for p in sorted(plan.items["prefixes"])
        )
        return await self._send_part(plan, ([c.command_id for c in commands], paths))

    async def _send_part(
        self,
        plan: budget.PurgePlan,
        part: tuple[list[str], tuple[str, ...]],
    ) -> Sent:
        """One invalidation for `part`'s commands and paths, bisected if CloudFront refuses it."""
        ids, paths = part
        ref = caller_reference(self.distribution, ids)
        sent_at = time.time() * 1000
        try:
            record = await self._invalidate(ref, paths, ids)
        except PermanentSinkError as exc:
            return await self._bisect(plan, ids, exc)
        for path in paths:
            kind: budget.Kind = "prefixes" if path.endswith("*") else "urls"
            self._recent.record(kind, [path.removesuffix("*")], sent_at)
        # The invalidation id goes into each command's audit record, for `cachesync trace`.
        note = Note(provider_ids=(record.invalidation_id,), detail=f"{len(paths)} paths")
        return Sent(ref=record.invalidation_id, note=note)

    async def _bisect(
        self, plan: budget.PurgePlan, command_ids: list[str], refused: PermanentSinkError
    ) -> Sent:
        """CloudFront refused the window's invalidation. A refusal of its content (a bad
        path) is bisected by command until it is down to the commands that named the bad
        paths; those are rejected, the others applied. Anything else rejects the window."""
        # Halves of the window's commands in a fixed order, whatever paths were left out as
        # invalidated recently (that depends on when this runs): a window that comes back
        # is split the same way, and each half finds its invalidation by its reference.
        named = sorted(command_ids)
        if not _splittable(refused) or len(named) < 2:
            message = f"{self.label}: {refused}"
            doomed = command_ids if not _splittable(refused) else named
            log.warning("%s (%d commands dead-lettered)", message, len(doomed))
            return Sent(rejected=dict.fromkeys(doomed, message))
        rejected: dict[str, str] = {}
        made: list[InvalidationRecord] = []
        half = len(named) // 2
        for part in (named[:half], named[half:]):
            await self._invalidate_part(plan, part, rejected, made)
        log.warning(
            "%s: refused %s; bisected: %d of %d commands dead-lettered, %d invalidations",
            self.label,
            refused,
            len(rejected),
            len(command_ids),
            len(made),
        )
        ids = tuple(r.invalidation_id for r in made)
        note = Note(provider_ids=ids, detail=f"{sum(len(r.paths) for r in made)} paths")
        return Sent(rejected=rejected, ref=",".join(ids), note=note if made else None)

    async def _invalidate_part(
        self,
        plan: budget.PurgePlan,
        part: list[str],
        rejected: dict[str, str],
        made: list[InvalidationRecord],
    ) -> None:
        """One half of a refused window: its commands' paths as their own invalidation, its
        CallerReference from their ids (so each half, and a retry of it, has its own)."""
        ids = set(part)
        urls = sorted(u for u, who in plan.items["urls"].items() if who & ids)
        prefixes = sorted(p for p, who in plan.items["prefixes"].items() if who & ids)
        paths = (*urls, *(p + "*" for p in prefixes))
        if not paths:  # every path of these commands was invalidated after their events
            return
        sent_at = time.time() * 1000
        try:
            record = await self._invalidate(caller_reference(self.distribution, part), paths, part)
        except PermanentSinkError as exc:
            if len(part) > 1 and _splittable(exc):
                half = len(part) // 2
                await self._invalidate_part(plan, part[:half], rejected, made)
                await self._invalidate_part(plan, part[half:], rejected, made)
                return
            message = f"{self.label}: {exc}"
            for command_id in part:
                rejected.setdefault(command_id, message)
            return
        made.append(record)
        self._recent.record("urls", urls, sent_at)
        self._recent.record("prefixes", prefixes, sent_at)

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
            self._settling.add(ref)
            rec = InvalidationRecord(
                inv_id, ref, self.distribution, paths, tuple(command_ids), "known", now, True
            )
            self.invalidations.append(rec)
            self._made.append(rec)
            return rec
        # Until its commands are recorded, a re-read batch regroups them under this
        # reference and these paths (`pending`). Not replaced if there: a regrouped batch
        # may hold only some of the commands.
        unsettled = keys.cloudfront_unsettled(self.distribution)
        entry = {"ids": sorted(command_ids), "paths": list(paths), "at": int(now)}
        with redis_errors(f"{self.label}: recording the invalidation it asks for"):
            await self._refs.hsetnx(unsettled, ref, json.dumps(entry))
            await self._refs.expire(unsettled, keys.CLOUDFRONT_BATCH_TTL_S)
        try:
            inv = await self._create(ref, paths)
        except (PermanentSinkError, RetryAfter):
            # CloudFront said no, so nothing was made (unlike a timeout): its commands are
            # rejected or bisected, or they wait and come back in a batch of their own.
            with redis_errors(f"{self.label}: forgetting a refused invalidation"):
                await self._refs.hdel(unsettled, ref)
            raise
        inv_id = str(inv["Id"])
        status = str(inv.get("Status", ""))
        wildcards = sum(1 for p in paths if p.endswith("*"))
        if status.lower() != "completed":
            self.in_flight[inv_id] = (len(paths), wildcards)
        with redis_errors(f"{self.label}: invalidation {inv_id} created but recording it"):
            await self._refs.set(batch_key, inv_id, ex=keys.CLOUDFRONT_BATCH_TTL_S)
        self._settling.add(ref)
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
        self._made.append(rec)
        return rec

    async def _create(self, ref: str, paths: tuple[str, ...]) -> dict[str, Any]:
        """One CreateInvalidation; botocore's errors become the project's here."""
        batch = {"Paths": {"Quantity": len(paths), "Items": list(paths)}, "CallerReference": ref}
        await self.pace()

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
        except _NO_CREDENTIALS as exc:
            self.count_call("blocked")
            raise CredentialsRejected(f"{self.label}: {type(exc).__name__}") from exc
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
        blocked = self._sink_refusal(exc)
        if blocked is not None:
            self.count_call("blocked")
            return blocked
        self.count_call("rejected")
        return PermanentSinkError(_describe(exc))

    def _sink_refusal(self, exc: ClientError) -> SinkUnavailable | None:
        """The error if CloudFront refused the sink itself (its credentials, its
        distribution), not the batch; None otherwise."""
        code = _code(exc)
        if code in _CREDENTIALS or _status(exc) in (401, 403):
            return CredentialsRejected(f"{self.label}: {_describe(exc)}")
        if code in _UNKNOWN_TARGET:
            return SinkMisconfigured(f"{self.label}: {_describe(exc)}")
        return None

    async def _in_progress(self) -> tuple[int, int]:
        """Paths and wildcards of this sink's invalidations that CloudFront has not completed."""
        for inv_id in list(self.in_flight):
            try:
                response = await self._client.get_invalidation(
                    DistributionId=self.distribution, Id=inv_id
                )
            except ClientError as exc:
                blocked = self._sink_refusal(exc)
                if blocked is not None:  # nothing else will pass either: wait for the sink
                    raise blocked from exc
                log.warning("%s: status of %s unknown: %s", self.label, inv_id, exc)
                continue  # still counted as in progress: the safe side
            except _NO_CREDENTIALS as exc:
                raise CredentialsRejected(f"{self.label}: {type(exc).__name__}") from exc
            except BotoCoreError as exc:
                log.warning("%s: status of %s unknown: %s", self.label, inv_id, exc)
                continue
            if str(response["Invalidation"].get("Status", "")).lower() == "completed":
                del self.in_flight[inv_id]
        paths = sum(p for p, _ in self.in_flight.values())
        wildcards = sum(w for _, w in self.in_flight.values())
        return paths, wildcards


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _parts(
    plan: budget.PurgePlan, todo: Sequence[PurgeCommand], *, size: int
) -> list[tuple[list[str], tuple[str, ...]]]:
    """The plan's paths cut into invalidations of at most `size` paths, by command in the
    batch's order: each path goes with the first command that needs it, and a command's
    paths are never split (one with more than `size` is a part alone), so each part is
    its commands' own invalidation."""
    needed: dict[str, list[str]] = {}  # command id -> the paths it is the first to need
    order = {c.command_id: i for i, c in enumerate(todo)}
    for kind in budget.PATH_KINDS:
        for item, who in plan.items[kind].items():
            path = item + "*" if kind == "prefixes" else item
            first_id = min(who, key=lambda c: order.get(c, len(order)))
            needed.setdefault(first_id, []).append(path)
    parts: list[tuple[list[str], tuple[str, ...]]] = []
    ids: list[str] = []
    paths: list[str] = []
    for command in todo:
        mine = needed.get(command.command_id, [])
        if ids and paths and len(paths) + len(mine) > size:
            parts.append((ids, tuple(sorted(paths))))
            ids, paths = [], []
        ids.append(command.command_id)
        paths.extend(mine)
    if ids:
        parts.append((ids, tuple(sorted(paths))))
    return [p for p in parts if p[1]] or parts[:1]


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
    code = error.get("Code") or "no error code"
    message = error.get("Message")
    return f"HTTP {_status(exc)}: {code}" + (f": {message}" if message else "")


def _splittable(exc: PermanentSinkError) -> bool:
    """A refusal of the batch's content (a bad path, too large), which a part may pass."""
    cause = exc.__cause__
    return isinstance(cause, ClientError) and _status(cause) in _SPLITTABLE_STATUS
