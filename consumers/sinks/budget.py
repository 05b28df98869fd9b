"""The purge budget: coalesce a window's purges per sink and escalate them to fit a provider.

A sink hands the purge commands of one coalescing window to `plan`, which returns
the fewest items that still purge everything those commands asked for:

- identical items are sent once, and a URL (or prefix) under a purged prefix is
  not sent at all (coalescing);
- when a provider limit would be exceeded (URLs per entity root, items or wildcards
  per flush, requests per flush as a cost budget) URLs are replaced by the prefix
  of their entity root (`/weddings/w1/`), and prefixes by their parent, largest
  group first (escalation).

Nothing is ever dropped: an item leaves the plan only when an identical or covering
item is in it. Over-purging a little is the price of never under-purging.

`Progress` remembers what a failed flush already got acknowledged, so that the retry
of the same batch (after a 429, a timeout) does not send those items again.
`RecentPurges` remembers when items were last purged, so a later window does not
purge again what was purged after its events happened.

When a window closes is adaptive (`coalesce_s`): a purge goes out at once when the
provider's budget allows a call. Purges gather only while a call to the provider is in
flight (the runner flushes one batch at a time, so what arrives meanwhile is the next
batch), while its token bucket (`TokenBucket`) is empty, while a burst is arriving
(commands written faster than `burst_per_s`: they gather until it pauses, so a burst
costs the providers' minimum number of calls rather than one per poll), or, for a
provider with a settle time (CloudFront), for that long after a quiet spell, so that the
first commands of a burst are not taken for a lone event. The configured window is an
upper bound on that wait, counted from the oldest command's write.
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cachesync.consumers.commands import PurgeCommand

Kind = Literal["urls", "tags", "prefixes"]
KINDS: tuple[Kind, ...] = ("tags", "urls", "prefixes")
PATH_KINDS: tuple[Kind, ...] = ("urls", "prefixes")

# Commands written within less than this are not taken as a rate: two records in a
# millisecond are not a burst.
_MIN_RATE_SPAN_S = 0.05
# A burst has paused when nothing arrived for a fifth of the window (at least this long):
# a burst's source (the mapper) writes in batches, with gaps between them. On 2 cores
# shared with a dozen sinks, the mapper took over 1 s between batches of 1,000 events, and
# a tenth of CloudFront's 10 s window split the 10,000-event burst into extra calls.
MIN_BURST_PAUSE_S = 0.2


class TokenBucket:
    """`rate` tokens per second, up to `burst`; one token per provider call.

    Half the burst is a reserve that coalescing does not spend (`wait_s`): under it, a
    flush waits for the refill, so a steady flow faster than `rate` is paced at `rate`
    with its purges gathered, and the other half stays for a burst. Spending the whole
    bucket first, then waiting a full token per call, gave the Cloudflare sink at 100
    events/s (65 calls a second against a 50/s plan) a p99 of 863 ms once it ran dry.
    """

    def __init__(
        self, rate: float, burst: int, *, clock: Any = time.monotonic, reserve: float = 0.5
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()
        self.blocked_until = 0.0
        self.reserve = max(1.0, burst * reserve)

    def _refill(self) -> float:
        now = float(self.clock())
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return now

    def take(self) -> float:
        """Take a token and return 0, or return how long until one is free (taking none)."""
        now = self._refill()
        if now < self.blocked_until:
            return self.blocked_until - now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def wait_s(self) -> float:
        """How long a flush should gather before it calls (0: not at all), taking none:
        until a token is free, or, under the reserve, until the bucket is back at it."""
        now = self._refill()
        if now < self.blocked_until:
            return self.blocked_until - now
        need = 1.0 if self.tokens >= self.reserve else self.reserve
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def holds(self, calls: int) -> bool:
        """`calls` tokens are free now above the reserve (and no 429 holds the zone): they
        can go out together without taking what a burst needs."""
        now = self._refill()
        return now >= self.blocked_until and self.tokens - calls >= self.reserve

    def idle(self) -> bool:
        """Full: no call for as long as the bucket takes to refill (a quiet spell)."""
        now = self._refill()
        return now >= self.blocked_until and self.tokens >= self.burst

    def block(self, seconds: float) -> None:
        """The provider said 429: nobody on this zone calls before `seconds` pass."""
        now = self._refill()
        self.tokens = 0.0
        self.blocked_until = max(self.blocked_until, now + seconds)


def coalesce_s(
    count: int,
    oldest_ms: float,
    newest_ms: float,
    quiet_s: float,
    *,
    window_ms: float,
    budget_wait_s: float,
    burst_per_s: float | None,
    settle_s: float = 0.0,
    now_ms: float | None = None,
) -> float:
    """How much longer a sink's runner gathers commands before flushing (<= 0: now).

    `count` commands are in hand or already written behind them, written from `oldest_ms`
    to `newest_ms` (the last in hand); none arrived for the last `quiet_s` seconds;
    `budget_wait_s` is how long until the provider takes a call (its bucket); `settle_s`
    is how old the oldest must be before a call (0: no such wait). Never past `window_ms`
    after the oldest command.

    The burst test is the rate at which the commands were written, over their own span,
    not over their age: a sink's process that is busy elsewhere reads late, and its
    commands' age then counts its own lag, so a burst looked like a trickle (466
    commands/s per region in the 10,000-event burst, with the mapper writing thousands).
    """
    now = time.time() * 1000 if now_ms is None else now_ms
    age_s = max(0.0, now - oldest_ms) / 1000
    left_s = window_ms / 1000 - age_s
    if left_s <= 0:
        return 0.0
    if budget_wait_s > 0:
        return min(budget_wait_s, left_s)
    if age_s < settle_s:
        return min(settle_s - age_s, left_s)
    span_s = max(0.0, newest_ms - oldest_ms) / 1000
    bursting = burst_per_s is not None and count / max(span_s, _MIN_RATE_SPAN_S) >= burst_per_s
    pause_s = max(MIN_BURST_PAUSE_S, window_ms / 5_000)
    if bursting and quiet_s < pause_s:
        return min(pause_s - quiet_s, left_s)
    return 0.0


@dataclass(frozen=True)
class Limits:
    """What one provider can purge and how much, for one flush."""

    provider: str
    max_items_per_request: int
    tags: bool = True
    prefixes: bool = True
    # More URLs than this under one entity root become that root's prefix.
    escalate_urls_over: int | None = None
    # URLs + prefixes in one flush (CloudFront: paths in progress, cost budget).
    max_items: int | None = None
    # Prefixes in one flush (CloudFront: wildcards in progress).
    max_prefixes: int | None = None
    # Requests in one flush (a cost budget for per-request pricing or rate).
    max_requests: int | None = None
    # Path segments that make an entity root: 2 -> /weddings/w1/.
    root_depth: int = 2
    # The provider's wildcard may end anywhere (CloudFront's `/w/wab*`), not only after a
    # "/": over `max_prefixes`, neighbouring prefixes merge into their longest common
    # string, which covers far fewer pages than their common directory.
    wildcard_anywhere: bool = False


@dataclass(frozen=True)
class PurgeRequest:
    """One provider call: one kind of item, within the per-request limit."""

    kind: Kind
    items: tuple[str, ...]
    command_ids: frozenset[str]


@dataclass(frozen=True)
class Escalation:
    reason: str  # per_root | max_items | max_prefixes | max_requests
    prefix: str
    replaced: int


@dataclass
class PurgePlan:
    """The items to purge, each with the ids of the commands that need it."""

    limits: Limits
    items: dict[Kind, dict[str, set[str]]] = field(
        default_factory=lambda: {k: defaultdict(set) for k in KINDS}
    )
    command_ids: set[str] = field(default_factory=set)
    raw_items: int = 0
    coalesced: int = 0
    escalations: list[Escalation] = field(default_factory=list)

    @property
    def item_count(self) -> int:
        return sum(len(v) for v in self.items.values())

    def count(self, kind: Kind) -> int:
        return len(self.items[kind])

    @property
    def request_count(self) -> int:
        per = self.limits.max_items_per_request
        return sum(math.ceil(len(v) / per) for v in self.items.values())

    def requests(self) -> list[PurgeRequest]:
        """Chunks of at most `max_items_per_request`, one kind per request, in a stable order."""
        out: list[PurgeRequest] = []
        per = self.limits.max_items_per_request
        for kind in KINDS:
            ordered = sorted(self.items[kind])
            for i in range(0, len(ordered), per):
                chunk = tuple(ordered[i : i + per])
                ids = frozenset().union(*(self.items[kind][item] for item in chunk))
                out.append(PurgeRequest(kind, chunk, ids))
        return out


class Progress:
    """Items a failed flush already got acknowledged, per command, for its retry."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._acked: dict[tuple[Kind, str], set[str]] = {}
        self._prefixes: dict[str, set[str]] = {}
        self.max_entries = max_entries

    def record(self, request: PurgeRequest) -> None:
        if len(self._acked) > self.max_entries:  # a bound, not a correctness matter
            self.clear()
        for item in request.items:
            self._acked.setdefault((request.kind, item), set()).update(request.command_ids)
            if request.kind == "prefixes":
                self._prefixes.setdefault(item, set()).update(request.command_ids)

    def covers(self, kind: Kind, item: str, command_id: str) -> bool:
        if command_id in self._acked.get((kind, item), ()):
            return True
        if kind == "tags":
            return False
        return any(command_id in self._prefixes.get(a, ()) for a in _ancestors(item))

    def clear(self) -> None:
        self._acked.clear()
        self._prefixes.clear()

    def __len__(self) -> int:
        return len(self._acked)


class RecentPurges:
    """Items purged lately, with when the purge was sent, across windows.

    A command whose event happened before an item's purge was sent (less a margin for
    clock skew between the platform and us) needs no second purge of that item: the
    provider dropped every copy older than that purge, and anything cached since was
    fetched after the change. This is what keeps a burst that spans several windows
    close to the providers' minimum number of calls.
    """

    def __init__(self, *, keep_s: float = 300.0, skew_ms: float = 1000.0) -> None:
        self.keep_ms = keep_s * 1000
        self.skew_ms = skew_ms
        self._sent: dict[tuple[Kind, str], float] = {}
        # (sent at, item), oldest first: `expire` pops what it forgets instead of scanning
        # every item remembered (a flush's cost grew with the last `keep_s` of traffic).
        # An item purged again has one entry per purge; only its latest one forgets it.
        self._by_time: list[tuple[float, tuple[Kind, str]]] = []

    def record(self, kind: Kind, items: Iterable[str], sent_at_ms: float) -> None:
        for item in items:
            key = (kind, item)
            if sent_at_ms > self._sent.get(key, 0.0):
                self._sent[key] = sent_at_ms
                heapq.heappush(self._by_time, (sent_at_ms, key))

    def covers(self, kind: Kind, item: str, occurred_at_ms: float) -> bool:
        after = occurred_at_ms + self.skew_ms
        if self._sent.get((kind, item), 0.0) > after:
            return True
        if kind == "tags":
            return False
        return any(self._sent.get(("prefixes", a), 0.0) > after for a in _ancestors(item))

    def expire(self, now_ms: float) -> None:
        horizon = now_ms - self.keep_ms
        by_time, sent = self._by_time, self._sent
        while by_time and by_time[0][0] < horizon:
            at, key = heapq.heappop(by_time)
            if sent.get(key) == at:  # not purged again since
                del sent[key]

    def __len__(self) -> int:
        return len(self._sent)


def _ancestors(path: str) -> list[str]:
    """The directory prefixes above a path: /, /a/, /a/b/ for /a/b/c (and /a/b/ itself)."""
    bare = path.split("?", 1)[0]
    out = ["/"]
    cut = bare.find("/", 1)
    while cut != -1:
        out.append(bare[: cut + 1])
        cut = bare.find("/", cut + 1)
    return out


def entity_root(path: str, depth: int) -> str | None:
    """`/weddings/w1/` for `/weddings/w1/gallery` at depth 2; None when the path is not below one."""
    if depth <= 0:
        return "/"
    bare = path.split("?", 1)[0]
    segments = bare.split("/")[1:]
    if len(segments) <= depth or not all(segments[:depth]):
        return None
    return "/" + "/".join(segments[:depth]) + "/"


def plan(
    commands: Iterable[PurgeCommand],
    limits: Limits,
    *,
    progress: Progress | None = None,
    recent: RecentPurges | None = None,
) -> PurgePlan:
    """Coalesce `commands` into one plan that fits `limits`; see the module docstring."""
    result = PurgePlan(limits)
    for cmd in commands:
        result.command_ids.add(cmd.command_id)
        sources: list[tuple[Kind, Iterable[str]]] = [("urls", cmd.urls)]
        if limits.tags:
            sources.append(("tags", cmd.tags))
        # A provider without prefix purges cannot honour a prefix; such commands carry
        # their URLs too, and the sink says so in its docs.
        if limits.prefixes:
            sources.append(("prefixes", cmd.prefixes))
        for kind, values in sources:
            for value in values:
                result.raw_items += 1
                if progress is not None and progress.covers(kind, value, cmd.command_id):
                    continue
                if recent is not None and recent.covers(kind, value, cmd.origin_occurred_at):
                    continue
                result.items[kind][value].add(cmd.command_id)
    _drop_covered(result)
    result.coalesced = result.raw_items - result.item_count
    if limits.prefixes:
        _escalate(result)
    return result


def _drop_covered(p: PurgePlan) -> None:
    """Prefixes under a shorter prefix, and URLs under any prefix, go into the covering prefix.

    In lexicographic order everything between a prefix and a string it covers starts
    with that prefix, so one sorted pass finds the covering prefixes and a binary
    search finds the one covering a URL: O(n log n) for bursts of thousands.
    """
    prefixes = p.items["prefixes"]
    if not prefixes:
        return
    kept: list[str] = []
    for prefix in sorted(prefixes):
        if kept and prefix.startswith(kept[-1]):
            prefixes[kept[-1]] |= prefixes.pop(prefix)
        else:
            kept.append(prefix)
    urls = p.items["urls"]
    for url in list(urls):
        i = bisect.bisect_right(kept, url) - 1
        if i >= 0 and url.startswith(kept[i]):
            prefixes[kept[i]] |= urls.pop(url)


def _replace(p: PurgePlan, prefix: str, members: Iterable[str], reason: str) -> None:
    """Purge `prefix` instead of `members` (URLs or prefixes under it), keeping their commands.

    Callers run `_drop_covered` once after a pass of replacements.
    """
    ids: set[str] = set()
    replaced = 0
    for member in members:
        for kind in PATH_KINDS:
            got = p.items[kind].pop(member, None)
            if got is not None:
                ids |= got
                replaced += 1
    p.items["prefixes"][prefix] |= ids
    p.escalations.append(Escalation(reason, prefix, replaced))


def _groups(members: Iterable[str], depth: int) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for member in members:
        root = entity_root(member, depth)
        if root is not None and root != member:
            groups[root].append(member)
    return groups


def _over(p: PurgePlan) -> str | None:
    lim = p.limits
    if lim.max_items is not None and p.count("urls") + p.count("prefixes") > lim.max_items:
        return "max_items"
    if lim.max_requests is not None and p.request_count > lim.max_requests:
        return "max_requests"
    return None


def _escalate(p: PurgePlan) -> None:
    lim = p.limits
    if lim.escalate_urls_over is not None:
        for root, members in sorted(_groups(p.items["urls"], lim.root_depth).items()):
            if len(members) > lim.escalate_urls_over:
                _replace(p, root, members, "per_root")
        _drop_covered(p)
    # Over an item or request budget: fold the biggest groups into their roots, from
    # the deepest roots up, until it fits; the host root "/" is the last resort.
    # Groups at one depth are disjoint, so each depth is one pass.
    for depth in range(_depth_of(p, "urls", "prefixes"), 0, -1):
        if _over(p) is None:
            break
        groups = _groups([*p.items["urls"], *p.items["prefixes"]], depth)
        for root, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            reason = _over(p)
            if reason is None or len(members) < 2:
                break
            _replace(p, root, members, reason)
        _drop_covered(p)
    if _over(p) == "max_items":
        _replace(p, "/", [*p.items["urls"], *p.items["prefixes"]], "max_items")
        _drop_covered(p)
    if lim.max_prefixes is not None and lim.wildcard_anywhere:
        _merge_neighbours(p, lim.max_prefixes)
    elif lim.max_prefixes is not None:
        for depth in range(_depth_of(p, "prefixes") - 1, 0, -1):
            if p.count("prefixes") <= lim.max_prefixes:
                break
            groups = _groups(p.items["prefixes"], depth)
            for root, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
                if p.count("prefixes") <= lim.max_prefixes or len(members) < 2:
                    break
                _replace(p, root, members, "max_prefixes")
            _drop_covered(p)
        if p.count("prefixes") > lim.max_prefixes:
            _replace(p, "/", list(p.items["prefixes"]), "max_prefixes")
            _drop_covered(p)


def _merge_neighbours(p: PurgePlan, limit: int) -> None:
    """At most `limit` prefixes: in sorted order, merge the two neighbouring groups whose
    common string is the longest (the narrowest cover) until few enough are left; each
    group becomes that common string. Every prefix starts with "/", so "/" is the worst."""
    groups = [[prefix] for prefix in sorted(p.items["prefixes"])]
    if len(groups) <= limit:
        return
    while len(groups) > max(limit, 1):
        best = max(
            range(len(groups) - 1),
            key=lambda i: len(_common(groups[i][0], groups[i + 1][-1])),
        )
        groups[best : best + 2] = [groups[best] + groups[best + 1]]
    for group in groups:
        if len(group) > 1:
            _replace(p, _common(group[0], group[-1]), group, "max_prefixes")
    _drop_covered(p)


def _common(a: str, b: str) -> str:
    """The longest string both begin with (character by character: a wildcard's cover)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _depth_of(p: PurgePlan, *kinds: Kind) -> int:
    return max(
        (len(m.split("?", 1)[0].strip("/").split("/")) for k in kinds for m in p.items[k]),
        default=0,
    )


def minimum_requests(item_counts: Mapping[str, int], per_request: int) -> int:
    """The fewest calls that can carry these distinct items, one kind per call."""
    return sum(math.ceil(n / per_request) for n in item_counts.values())
