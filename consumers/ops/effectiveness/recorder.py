"""Reads every tier's counters at an interval, exports them, and keeps them for the report.

`Sampler.sample` reads each (region, tier) once (`tiers`) and gives its hits and misses since
the previous reading (`cachesync status` reads the tiers on demand: `status_view`). The
`Recorder`, a companion of
`cachesync run all`, samples every interval: it exports the figures
(`cachesync_cache_hits_total`, `cachesync_cache_misses_total`,
`cachesync_cache_hit_ratio`), prints one line per region, and writes them to the state
Redis (`store`) with what the edges and the Redis servers report per request, which the
invalidation cost needs:

- the varnishd behind the edges, through `varnishncsa` (each GET: time, URL, hit or miss,
  User-Agent, the `xkey` tags of the answer);
- each region's Redis, through keyspace notifications (`keymiss` and `set` events on the
  platform's keys: a key set again after a purge is an origin read). A server sends them
  only when `notify-keyspace-events` says so: `CACHESYNC_REDIS_KEY_EVENTS=enable` sets it.

Cloudflare's and CloudFront's per-request data are their own analytics, read by the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachesync.consumers import keys, telemetry
from cachesync.consumers.ops.effectiveness.config import EffectivenessSettings
from cachesync.consumers.ops.effectiveness.store import EffectivenessStore, Outcome, who
from cachesync.consumers.ops.effectiveness.tiers import (
    TIERS,
    CloudflareAnalytics,
    CloudFrontMetrics,
    Reading,
    Targets,
    read_redis,
    read_varnish,
    redacted,
)
from cachesync.consumers.settings import Settings

log = logging.getLogger(__name__)

# CloudWatch's minutes are read back this far each time: late datapoints still count.
CLOUDWATCH_LOOKBACK_MS = 10 * 60 * 1000
VARNISHNCSA_FORMAT = "%{usec}t\t%{Varnish:handling}x\t%U\t%{User-agent}i\t%{xkey}o"


@dataclass(frozen=True, slots=True)
class Interval:
    """A (region, tier)'s hits and misses over one interval; `ratio` None when idle."""

    region: str
    tier: str
    instance: str
    hits: float
    misses: float
    shared: bool = False
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total > 0 else None

    def as_dict(self) -> dict[str, object]:
        return {
            "region": self.region,
            "tier": self.tier,
            "instance": self.instance,
            "hits": self.hits,
            "misses": self.misses,
            "shared": self.shared,
            "error": self.error,
        }


@dataclass
class Sampler:
    """Each (region, tier)'s hits and misses since the previous `sample` (the first: since
    the tier started for Redis and Varnish, the last interval_s for the ranged sources)."""

    settings: Settings
    eff: EffectivenessSettings
    targets: Targets = field(init=False)
    _cloudflare: CloudflareAnalytics | None = field(init=False, default=None)
    _cloudfront: CloudFrontMetrics | None = field(init=False, default=None)
    _totals: dict[tuple[str, str], tuple[float, float]] = field(init=False, default_factory=dict)
    _cf_totals: dict[str, tuple[float, float]] = field(init=False, default_factory=dict)
    _cw_minutes: dict[str, dict[int, tuple[float, float]]] = field(init=False, default_factory=dict)
    _last_ms: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.targets = Targets.from_settings(self.settings, self.eff)
        if self.targets.cloudflare:
            self._cloudflare = CloudflareAnalytics.from_settings(self.settings)
        if self.targets.cloudfront:
            self._cloudfront = CloudFrontMetrics.from_settings(self.settings, self.eff)

    async def aclose(self) -> None:
        if self._cloudflare is not None:
            await self._cloudflare.aclose()
        if self._cloudfront is not None:
            await self._cloudfront.aclose()

    async def sample(self, now_ms: float | None = None) -> list[Interval]:
        now = now_ms if now_ms is not None else time.time() * 1000
        since = self._last_ms if self._last_ms is not None else now - self.eff.interval_s * 1000
        readings = await asyncio.gather(*self._reads(since, now))
        self._last_ms = now
        out = []
        for reading in readings:
            cur = self._cumulative(reading)
            key = (reading.region, reading.tier)
            prev = self._totals.get(key)
            self._totals[key] = cur
            if reading.error is not None:
                hits = misses = 0.0
            elif prev is None:
                hits, misses = cur if reading.cumulative else (reading.hits, reading.misses)
            else:
                # A tier that restarted counts from zero again: its new totals are the interval's.
                hits = cur[0] - prev[0] if cur[0] >= prev[0] else cur[0]
                misses = cur[1] - prev[1] if cur[1] >= prev[1] else cur[1]
            out.append(
                Interval(
                    reading.region,
                    reading.tier,
                    reading.instance,
                    hits,
                    misses,
                    self.targets.shared(reading.tier, reading.region),
                    reading.error,
                )
            )
        return out

    def _reads(self, since: float, now: float) -> list[Awaitable[Reading]]:
        reads: list[Awaitable[Reading]] = [
            read_redis(r, u) for r, u in sorted(self.targets.redis.items())
        ]
        reads += _shared_reads(self.targets.varnish, read_varnish)
        if self._cloudflare is not None:
            reads += [
                self._cloudflare.read(r, z, since, now)
                for r, z in sorted(self.targets.cloudflare.items())
            ]
        if self._cloudfront is not None:
            reads += [
                self._read_cloudfront(r, d, now) for r, d in sorted(self.targets.cloudfront.items())
            ]
        return reads

    async def _read_cloudfront(self, region: str, distribution: str, now: float) -> Reading:
        """Totals of the minutes CloudWatch has given so far: the last minutes are read again
        each time, since a datapoint may arrive late or grow."""
        from botocore.exceptions import BotoCoreError, ClientError

        assert self._cloudfront is not None
        try:
            minutes = await self._cloudfront.minutes(
                distribution, now - CLOUDWATCH_LOOKBACK_MS, now
            )
        except (BotoCoreError, ClientError, OSError) as exc:
            return Reading(region, "cloudfront", distribution, error=str(exc))
        seen = self._cw_minutes.setdefault(distribution, {})
        for m in minutes:
            hits = m.requests * (m.hit_rate or 0.0) / 100
            seen[m.at_ms] = (hits, m.requests - hits)
        return Reading(
            region,
            "cloudfront",
            distribution,
            hits=sum(h for h, _ in seen.values()),
            misses=sum(m for _, m in seen.values()),
        )

    def _cumulative(self, reading: Reading) -> tuple[float, float]:
        """Totals since this sampler started, for the ranged sources (Cloudflare's intervals
        add up; CloudWatch's minutes are re-read and replaced)."""
        if reading.cumulative or reading.error is not None:
            return (reading.hits, reading.misses)
        if reading.tier == "cloudflare":
            h, m = self._cf_totals.get(reading.instance, (0.0, 0.0))
            self._cf_totals[reading.instance] = (h + reading.hits, m + reading.misses)
            return self._cf_totals[reading.instance]
        return (reading.hits, reading.misses)


def _shared_reads(
    instances: dict[str, str], read: Callable[[str, str], Awaitable[Reading]]
) -> list[Awaitable[Reading]]:
    """One read per instance, whichever regions share it, given to each of them: regions
    behind one varnishd show the very same figures."""
    by_instance: dict[str, list[str]] = {}
    for region, instance in sorted(instances.items()):
        by_instance.setdefault(instance, []).append(region)
    out: list[Awaitable[Reading]] = []
    for instance, regions in by_instance.items():
        first = asyncio.ensure_future(read(regions[0], instance))

        async def as_region(region: str, first: asyncio.Future[Reading] = first) -> Reading:
            return replace(await first, region=region)

        out += [as_region(r) for r in regions]
    return out


def export(intervals: list[Interval]) -> None:
    """The interval's figures as metrics (counters of what the tiers counted, the ratio)."""
    for i in intervals:
        if i.error is not None:
            continue
        attrs = {"region": i.region, "tier": i.tier}
        if i.hits:
            telemetry.cache_hits.add(i.hits, attrs)
        if i.misses:
            telemetry.cache_misses.add(i.misses, attrs)
        if i.ratio is not None:
            telemetry.record_hit_ratio(i.region, i.tier, i.ratio)


def region_lines(intervals: list[Interval]) -> list[str]:
    """One line per region: each tier's hit ratio over the interval (rich markup)."""
    by_region: dict[str, dict[str, Interval]] = {}
    for i in intervals:
        by_region.setdefault(i.region, {})[i.tier] = i
    lines = []
    for region, tiers in sorted(by_region.items()):
        parts = []
        for tier in TIERS:
            found = tiers.get(tier)
            if found is None:
                continue
            i = found
            if i.error is not None:
                parts.append(f"{tier} [red]unreadable[/red]")
            elif i.ratio is None:
                parts.append(f"{tier} [dim]idle[/dim]")
            else:
                shared = " (shared)" if i.shared else ""
                parts.append(f"{tier} {i.ratio:.1%} of {i.hits + i.misses:.0f}{shared}")
        lines.append(f"  [bold]{region}[/bold] hit ratio: " + " · ".join(parts))
    return lines


# -- per-request outcomes ---------------------------------------------------------------
class VarnishLog:
    """Each GET the varnishd answers, from `varnishncsa` (a child process while running)."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.rows: list[Outcome] = []

    async def run(self, stop: asyncio.Event) -> None:
        binary = shutil.which("varnishncsa")
        if binary is None:
            log.warning("varnishncsa is not installed: no per-request edge outcomes")
            return
        proc = await asyncio.create_subprocess_exec(
            binary,
            "-n",
            self.instance,
            "-q",
            'ReqMethod eq "GET" or ReqMethod eq "HEAD"',
            "-F",
            VARNISHNCSA_FORMAT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        try:
            while not stop.is_set():
                line_task = asyncio.ensure_future(proc.stdout.readline())
                stop_task = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait(
                    {line_task, stop_task}, return_when=asyncio.FIRST_COMPLETED
                )
                stop_task.cancel()
                if line_task not in done:
                    line_task.cancel()
                    break
                line = line_task.result()
                if not line:
                    break
                self._take(line.decode(errors="replace"))
        finally:
            if proc.returncode is None:
                proc.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=5)

    def _take(self, line: str) -> None:
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 5 or parts[2] == "/_health":
            return
        try:
            at = int(parts[0]) // 1000
        except ValueError:
            return
        tags = () if parts[4] in ("", "-") else tuple(parts[4].split())
        self.rows.append(Outcome(at, parts[2], parts[1], who(parts[3]), tags))

    def drain(self) -> list[Outcome]:
        rows, self.rows = self.rows, []
        return rows


def key_patterns(db: int, own_prefix: str = keys.OWN_PREFIX) -> list[str]:
    """Keyspace channel patterns of every key but those starting with `own_prefix`: one
    per leading character of it (`c[^a]*`, `ca[^c]*`, ...), so that Redis itself drops
    the notifications of cachesync's own markers. Their SETs were most of the messages
    (some 15 per event per region), and reading each in Python was a tenth of `run all`.
    """
    escape = {c: "\\" + c for c in "*?[]^\\"}
    patterns = []
    for i, char in enumerate(own_prefix):
        head = "".join(escape.get(c, c) for c in own_prefix[:i])
        patterns.append(f"__keyspace@{db}__:{head}[^{escape.get(char, char)}]*")
    return patterns


class RedisKeyEvents:
    """Misses and writes of the platform's keys in one Redis, from keyspace notifications
    (one channel per key, `__keyspace@<db>__:<key>`, whose message is the event)."""

    FLAGS = "K$m"  # keyspace channels, string commands (set), key misses

    def __init__(self, region: str, url: str, *, enable: bool) -> None:
        self.region = region
        self.url = url
        self.enable = enable
        self.rows: list[Outcome] = []
        self.listening = False
        self._channel_prefix = len("__keyspace@0__:")

    async def run(self, stop: asyncio.Event) -> None:
        redis = Redis.from_url(self.url)
        try:
            if not await self._notifications_on(redis):
                return
            db = redis.connection_pool.connection_kwargs.get("db", 0)
            pubsub = redis.pubsub()
            await pubsub.psubscribe(*key_patterns(db))
            self._channel_prefix = len(f"__keyspace@{db}__:")
            self.listening = True
            try:
                while not stop.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is not None:
                        self._take(message)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            log.warning("Redis key events of %s stopped: %s", self.region, exc)
        finally:
            await redis.aclose()

    async def _notifications_on(self, redis: Redis) -> bool:
        answer = await redis.config_get("notify-keyspace-events")
        value = next(iter(answer.values()), "") if answer else ""
        current = value.decode() if isinstance(value, bytes) else str(value or "")
        have = set(current.replace("A", "g$lshzxet"))
        if {"K", "$", "m"} <= have:
            return True
        if not self.enable:
            log.info(
                "Redis of %s sends no key miss events (notify-keyspace-events=%r): "
                "CACHESYNC_REDIS_KEY_EVENTS=enable turns them on",
                self.region,
                current,
            )
            return False
        await redis.config_set("notify-keyspace-events", "".join(sorted(have | set(self.FLAGS))))
        return True

    def _take(self, message: dict[str, object]) -> None:
        channel, event = message.get("channel"), message.get("data")
        name = channel.decode(errors="replace") if isinstance(channel, bytes) else str(channel)
        if event not in (b"set", b"keymiss", "set", "keymiss"):
            return  # a string command other than SET (SETEX is "set" too), e.g. INCR
        outcome = "miss" if event in (b"keymiss", "keymiss") else "fill"
        key = name[self._channel_prefix :]
        self.rows.append(Outcome(int(time.time() * 1000), key, outcome, "unknown"))

    def drain(self) -> list[Outcome]:
        rows, self.rows = self.rows, []
        return rows


ConsistencySource = Callable[[], dict[tuple[str, str], tuple[int, int]]]


class Recorder:
    """The companion of `run all`: samples, exports, prints, records, until stopped."""

    def __init__(
        self,
        settings: Settings,
        eff: EffectivenessSettings,
        *,
        print_lines: Callable[[list[str]], None] | None = None,
        consistency: ConsistencySource | None = None,
        enable_key_events: bool | None = None,
    ) -> None:
        self.settings = settings
        self.eff = eff
        self.sampler = Sampler(settings, eff)
        self.print_lines = print_lines
        self.consistency = consistency
        targets = self.sampler.targets
        # One log per varnishd, whichever regions share it.
        instances: dict[str, list[str]] = {}
        for region, instance in sorted(targets.varnish.items()):
            instances.setdefault(instance, []).append(region)
        self.varnish = {i: (VarnishLog(i), regions) for i, regions in instances.items()}
        enable = (
            eff.redis_key_events == "enable" if enable_key_events is None else enable_key_events
        )
        self.key_events = (
            {}
            if eff.redis_key_events == "off" and not enable_key_events
            else {r: RedisKeyEvents(r, u, enable=enable) for r, u in sorted(targets.redis.items())}
        )
        self.last: list[Interval] = []

    async def run(self, stop: asyncio.Event) -> None:
        state = Redis.from_url(str(self.settings.state_redis_url))
        store = EffectivenessStore(
            state, self.settings.group_prefix, retention_s=self.eff.retention_s
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                for tail, _ in self.varnish.values():
                    tasks.create_task(tail.run(stop))
                for events in self.key_events.values():
                    tasks.create_task(events.run(stop))
                tasks.create_task(self._loop(stop, store))
        finally:
            await self.sampler.aclose()
            await state.aclose()

    async def _loop(self, stop: asyncio.Event, store: EffectivenessStore) -> None:
        await self.sampler.sample()  # the baseline: totals so far
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.eff.interval_s)
            await self.record(store)

    async def record(self, store: EffectivenessStore) -> None:
        now = int(time.time() * 1000)
        self.last = await self.sampler.sample(now)
        export(self.last)
        if self.print_lines is not None:
            self.print_lines(region_lines(self.last))
        try:
            await store.add(
                "sample",
                {
                    "at": now,
                    "interval_s": self.eff.interval_s,
                    "rows": [i.as_dict() for i in self.last],
                },
            )
            for instance, (tail, regions) in self.varnish.items():
                rows = tail.drain()
                if rows:
                    await store.add(
                        "requests",
                        {
                            "tier": "varnish",
                            "instance": instance,
                            "regions": regions,
                            "rows": [r.row() for r in rows],
                        },
                    )
            for region, events in self.key_events.items():
                rows = events.drain()
                if rows:
                    await store.add(
                        "requests",
                        {
                            "tier": "redis",
                            "instance": redacted(events.url),
                            "regions": [region],
                            "rows": [r.row() for r in rows],
                        },
                    )
            if self.consistency is not None:
                tallies = self.consistency()
                if tallies:
                    await store.add(
                        "consistency",
                        {
                            "at": now,
                            "rows": [
                                {"region": r, "sink": s, "probed": p, "converged": c}
                                for (r, s), (p, c) in sorted(tallies.items())
                            ],
                        },
                    )
        except (RedisError, OSError) as exc:
            log.warning("effectiveness: could not record to the state Redis: %s", exc)
