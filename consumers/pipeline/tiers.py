"""Tier order without polling: a purge sink announces what it applied, and the runners of
the sinks after it wait for that announcement instead of re-reading markers.

Within a region, an edge acts on an event only after the region's Redis sink has applied
it, and the warmer only after the tier it warms through has (pipeline/roles.py). The
applied markers in the region's Redis (sinks/ledger.py) are the truth; this module only
says when to look at them again:

- the announcement: a purge sink publishes the ids of the events whose purge it applied
  in full on the region's Redis, one channel per (region, sink) (`keys.tier_applied`),
  inside the script call that writes their markers (the Redis sink's purge script,
  sinks/redis.py; a CDN sink's ledger record, sinks/ledger.py): after the markers, atomic
  with them, and without a command or a round trip of its own.
- `TierWatch`: the runner of a later tier subscribes to the channels of the tiers it
  follows. `wait` takes an event announced as applied, and reads the markers of the others
  once, until all are announced or its time is up. An announcement
  can be lost (Pub/Sub keeps nothing for a subscriber that is reconnecting), so the
  markers are also read every `recheck_s` while a wait goes on: the safety net, not the
  way events are learnt.

Why Pub/Sub on the region's Redis rather than keyspace notifications or a blocking list:
it needs no server configuration (managed Redis often forbids CONFIG SET), costs the
sinks one command inside a call they make anyway, and holds nothing when nobody listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachesync.consumers import keys
from cachesync.consumers.sinks.ledger import AppliedEvents

log = logging.getLogger(__name__)

# How long a subscriber that lost its connection waits before subscribing again, at most.
_RESUBSCRIBE_MAX_S = 5.0


class _Waiter:
    """One wait in progress: the events it waits for, woken when one is announced."""

    def __init__(self, events: Collection[str]) -> None:
        self.events = set(events)
        self.woken = asyncio.Event()


# Events remembered as announced, per sink followed: at 1,000 events/s some 20 s, far more
# than a follower trails the tier it follows when it keeps up; an event older than that is
# looked up in the markers, as one announced before the subscription was.
ANNOUNCED_KEPT = 20_000


class TierWatch:
    """Waits until the sinks `after` have applied events in one region, woken by their
    announcements; the markers stay the truth.

    An announcement names only events whose purge the announcing sink applied in full (a
    split purge's last part: its event's marker is set) and goes out after their markers
    are written, so an event it names needs no marker read: the watch remembers the last
    ANNOUNCED_KEPT events each followed sink announced, and reads the markers only of the
    events it has not heard of (at the start of a wait, and every `recheck_s` while one
    goes on). An edge reading its commands after Redis applied them then waits without a
    round trip, and one that reads them first pays one read, not one per wake-up.
    """

    def __init__(
        self,
        redis_url: str,
        region: str,
        after: Sequence[str],
        *,
        recheck_s: float = 1.0,
    ) -> None:
        self.region = region
        self.after = tuple(after)
        self.recheck_s = recheck_s
        self.markers = AppliedEvents.for_url(redis_url, region)
        # Pub/Sub on a connection of its own, without a read timeout: it waits for messages.
        self._subscriber = Redis.from_url(redis_url, socket_connect_timeout=3)
        self._channels = [keys.tier_applied(region, sink) for sink in self.after]
        # Per followed sink (by its channel), the events it announced, oldest first.
        self._heard: dict[str, OrderedDict[str, None]] = {c: OrderedDict() for c in self._channels}
        self._waiters: set[_Waiter] = set()
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self.announcements = 0  # received, for tests and the curious

    async def start(self) -> None:
        """Subscribe (in the background; a wait before the subscription holds reads the
        markers every `recheck_s`)."""
        if self._listener is None and self._channels:
            self._listener = asyncio.create_task(self._listen(), name=f"tiers {self.region}")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self._subscriber.aclose()
        await self.markers.close()

    async def wait(self, event_ids: Collection[str], *, timeout_s: float) -> set[str]:
        """Wait at most `timeout_s` until every sink `after` has applied each of
        `event_ids`; the ids still not applied then (empty: all were)."""
        await self.start()
        deadline = time.monotonic() + timeout_s
        waiter = _Waiter(event_ids)
        self._waiters.add(waiter)
        try:
            read = True  # the markers of the events not heard of: at first, then per recheck
            while True:
                waiter.woken.clear()
                waiter.events = self._not_heard(waiter.events)
                if waiter.events and read:
                    waiter.events = await self.markers.not_applied(
                        self.after, sorted(waiter.events)
                    )
                left = deadline - time.monotonic()
                if not waiter.events or left <= 0:
                    return waiter.events
                try:
                    await asyncio.wait_for(waiter.woken.wait(), timeout=min(left, self.recheck_s))
                    read = False
                except TimeoutError:
                    read = True
        finally:
            self._waiters.discard(waiter)

    def _not_heard(self, event_ids: set[str]) -> set[str]:
        """Those of `event_ids` that some followed sink has not announced (as far as
        remembered)."""
        return {e for e in event_ids if any(e not in heard for heard in self._heard.values())}

    def _announced(self, channel: str, event_ids: set[str]) -> None:
        self.announcements += 1
        heard = self._heard.get(channel)
        if heard is not None:
            for event in event_ids:
                heard[event] = None
            while len(heard) > ANNOUNCED_KEPT:
                heard.popitem(last=False)
        for waiter in self._waiters:
            if waiter.events & event_ids:
                waiter.woken.set()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self._channels)
                self.subscribed.set()
                backoff = 0.1
                # Whatever was announced while unsubscribed is in the markers: look again.
                for waiter in self._waiters:
                    waiter.woken.set()
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None or message.get("type") != "message":
                        continue
                    data, channel = message["data"], message["channel"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    name = channel.decode() if isinstance(channel, bytes) else str(channel)
                    self._announced(name, set(text.split("\n")))
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.debug(
                    "tiers %s: subscription lost (%s); again in %.1fs", self.region, exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RESUBSCRIBE_MAX_S)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
