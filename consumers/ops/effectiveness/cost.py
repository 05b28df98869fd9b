"""What an invalidation costs, and what warming wins back, from what the caches reported.

For each purge the mapper issued and each tier instance it reached, the requests that tier
answered for the same resources (Redis keys; edge URLs, the answers' cache tags and the
purge's prefixes) are counted in the N seconds after the purge: misses, and origin requests
(a miss or pass at an edge; in Redis, a key written again right after a read missed it, as
a read-through cache does). A request after several purges of its resource is the cost of
the latest of them only, so overlapping purges are not counted twice and the figures add up
to the origin requests the tier really made. One event purges a shared instance (one
varnishd behind several regions' edges) once, at its first command's time; an event that
reaches several instances (each region's Redis) costs the sum of them.

The rate before a purge is the baseline: origin requests for the same resources in the N
seconds before it that no purge caused (none of their resource in the N seconds before
them), the misses the cache has anyway (expiry, eviction, cold keys).

Warming's gain: after a purge, when the first origin request for a resource is the
warmer's, every guest hit on it until a guest's own miss was served because the warmer had
refilled it: those are the hits that warming saved. (A refill by anyone else, such as the
consistency checker's read-back, earns warming nothing.)

Figures are per event type, which in this topology is also per rule (rules are keyed by
the event type they handle).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cachesync.consumers.ops.effectiveness.store import Outcome

MISS_OUTCOMES = frozenset({"miss", "expired"})
# A Redis key written this soon after a read missed it is that read's refill (read-through).
REFILL_AFTER_MISS_MS = 2_000
# Prefixes are indexed by their first path segments (the topology's root depth is 2).
_PREFIX_DEPTH = 2


@dataclass(frozen=True, slots=True)
class IssuedPurge:
    """A purge command as the mapper issued it (from the command topic)."""

    at: int  # issued, epoch ms
    event_id: str
    event_type: str
    region: str
    keys: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TierLog:
    """What one instance of a tier answered, request by request, and the regions it serves.
    `host` is the public host a Cloudflare zone's resources are named under (host + path)."""

    tier: str
    instance: str
    regions: tuple[str, ...]
    outcomes: Sequence[Outcome]
    host: str = ""


@dataclass
class Cost:
    """The figures of one event type at one tier (summed over its events)."""

    event_type: str
    tier: str
    events: int = 0
    origin_after: int = 0
    origin_before: int = 0
    misses_after: int = 0
    misses_before: int = 0
    warm_saved: int = 0

    def per_event(self, value: int) -> float:
        return value / self.events if self.events else 0.0

    @property
    def excess_per_event(self) -> float:
        """Origin requests per event above the rate before it."""
        return self.per_event(self.origin_after - self.origin_before)


@dataclass
class _Invalidation:
    at: int
    event_id: str
    event_type: str
    resources: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)
    origin_after: int = 0
    origin_before: int = 0
    misses_after: int = 0
    misses_before: int = 0
    warm_saved: int = 0


def coverage(tier: str, purge: IssuedPurge, host: str = "") -> tuple[set[str], set[str], set[str]]:
    """(resources, tags, prefixes) a purge names at `tier`, in the tier's own terms."""
    if tier == "redis":
        return set(purge.keys), set(), set()
    if tier == "cloudflare":
        # Its analytics name requests by host and path, and carry no cache tags.
        return {host + u for u in purge.urls}, set(), {host + p for p in purge.prefixes}
    return set(purge.urls), set(purge.tags), set(purge.prefixes)


def invalidation_cost(
    purges: Iterable[IssuedPurge], logs: Iterable[TierLog], *, window_s: float
) -> list[Cost]:
    """Per (event type, tier): events, misses and origin requests after and before, warm saves."""
    window = int(window_s * 1000)
    purges = list(purges)
    totals: dict[tuple[str, str], Cost] = {}
    events: dict[tuple[str, str], set[str]] = defaultdict(set)
    for log in logs:
        if log.tier == "redis":
            log = TierLog(log.tier, log.instance, log.regions, read_through(log.outcomes))
        invalidations = _invalidations(log, purges)
        _attribute(log, invalidations, window)
        for inv in invalidations:
            cost = totals.setdefault((inv.event_type, log.tier), Cost(inv.event_type, log.tier))
            events[(inv.event_type, log.tier)].add(inv.event_id)
            cost.events = len(events[(inv.event_type, log.tier)])
            cost.origin_after += inv.origin_after
            cost.origin_before += inv.origin_before
            cost.misses_after += inv.misses_after
            cost.misses_before += inv.misses_before
            cost.warm_saved += inv.warm_saved
    return sorted(totals.values(), key=lambda c: (c.event_type, c.tier))


def _invalidations(log: TierLog, purges: Sequence[IssuedPurge]) -> list[_Invalidation]:
    """One per event that purged something at this instance, at its first command's time."""
    by_event: dict[str, _Invalidation] = {}
    for purge in purges:
        if purge.region not in log.regions:
            continue
        resources, tags, prefixes = coverage(log.tier, purge, log.host)
        if not (resources or tags or prefixes):
            continue
        inv = by_event.get(purge.event_id)
        if inv is None:
            inv = by_event[purge.event_id] = _Invalidation(
                purge.at, purge.event_id, purge.event_type
            )
        inv.at = min(inv.at, purge.at)
        inv.resources |= resources
        inv.tags |= tags
        inv.prefixes |= prefixes
    return sorted(by_event.values(), key=lambda i: i.at)


def _heads(path: str) -> list[str]:
    """The path's first one and two segments (`/vendors`, `/vendors/v1`), the prefix index keys."""
    parts = path.split("/")
    return ["/".join(parts[: depth + 1]) for depth in range(1, _PREFIX_DEPTH + 1)]


class _Index:
    """Which invalidations name a resource, by resource, tag or prefix, in time order."""

    def __init__(self, invalidations: Sequence[_Invalidation]) -> None:
        self.by_name: dict[str, list[int]] = defaultdict(list)
        self.by_prefix: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for n, inv in enumerate(invalidations):  # already in time order
            for r in inv.resources:
                self.by_name["r:" + r].append(n)
            for t in inv.tags:
                self.by_name["t:" + t].append(n)
            for p in inv.prefixes:
                head = _heads(p)[min(_PREFIX_DEPTH, p.rstrip("/").count("/")) - 1]
                self.by_prefix[head].append((p, n))

    def naming(self, outcome: Outcome) -> list[int]:
        found: set[int] = set(self.by_name.get("r:" + outcome.resource, ()))
        for tag in outcome.tags:
            found.update(self.by_name.get("t:" + tag, ()))
        for head in _heads(outcome.resource):
            for prefix, n in self.by_prefix.get(head, ()):
                if outcome.resource.startswith(prefix):
                    found.add(n)
        return sorted(found)


def read_through(outcomes: Iterable[Outcome]) -> list[Outcome]:
    """Redis' writes of a key: a refill (`fill`) when a read of it missed just before, else a
    plain write (`write`: the platform storing something no guest had asked for yet)."""
    missed: dict[str, int] = {}
    out = []
    for o in sorted(outcomes, key=lambda o: o.at):
        if o.outcome == "miss":
            missed[o.resource] = o.at
        elif o.outcome == "fill":
            at = missed.pop(o.resource, None)
            if at is None or o.at - at > REFILL_AFTER_MISS_MS:
                o = Outcome(o.at, o.resource, "write", o.by, o.tags)
        out.append(o)
    return out


def _attribute(log: TierLog, invalidations: list[_Invalidation], window: int) -> None:
    index = _Index(invalidations)
    times = [inv.at for inv in invalidations]
    # (invalidation, resource) -> the outcomes attributed to it, in time order (warm saves).
    after: dict[tuple[int, str], list[Outcome]] = defaultdict(list)
    for outcome in sorted(log.outcomes, key=lambda o: o.at):
        naming = index.naming(outcome)
        if not naming:
            continue
        latest = None
        upcoming = []
        for n in naming:
            if times[n] <= outcome.at <= times[n] + window:
                latest = n if latest is None or times[n] >= times[latest] else latest
            elif outcome.at < times[n] <= outcome.at + window:
                upcoming.append(n)
        if latest is not None:
            inv = invalidations[latest]
            inv.origin_after += outcome.origin(log.tier)
            inv.misses_after += outcome.outcome in MISS_OUTCOMES
            after[(latest, outcome.resource)].append(outcome)
            continue
        for n in upcoming:  # no purge caused it: the baseline of the purges that follow
            inv = invalidations[n]
            inv.origin_before += outcome.origin(log.tier)
            inv.misses_before += outcome.outcome in MISS_OUTCOMES
    for (n, _), seen in after.items():
        invalidations[n].warm_saved += _warm_saved(log.tier, seen)


def _warm_saved(tier: str, seen: Sequence[Outcome]) -> int:
    """Guest hits after the warmer's refill and before a guest's own miss."""
    first_origin = next((o for o in seen if o.origin(tier)), None)
    if first_origin is None or first_origin.by != "warmer":
        return 0
    saved = 0
    for o in seen:
        if o.at < first_origin.at or o.by != "guest":
            continue
        if o.origin(tier):
            break
        saved += 1
    return saved


def by_event_type(costs: Iterable[Cost]) -> Mapping[str, list[Cost]]:
    out: dict[str, list[Cost]] = defaultdict(list)
    for c in costs:
        out[c.event_type].append(c)
    return out
