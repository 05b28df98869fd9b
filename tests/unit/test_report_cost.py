"""Invalidation cost and warming's gain, from per-request outcomes around purges."""

from __future__ import annotations

from cachesync.consumers.ops.effectiveness.cost import (
    IssuedPurge,
    TierLog,
    invalidation_cost,
)
from cachesync.consumers.ops.effectiveness.store import Outcome, who

PAGE = "/weddings/w1/gallery"


def purge(
    at: int, event: str = "e1", event_type: str = "photo.uploaded", **items: tuple[str, ...]
) -> IssuedPurge:
    return IssuedPurge(at, event, event_type, "eu-west", **items)


def edge(*outcomes: Outcome, regions: tuple[str, ...] = ("eu-west",)) -> TierLog:
    return TierLog("varnish", "/var/lib/varnish/edge", regions, list(outcomes))


def test_origin_requests_after_a_purge_count_against_those_before() -> None:
    """Misses on the purged URL in the window after the purge are its cost; those before are the baseline."""
    log = edge(
        Outcome(1_000, PAGE, "miss", "guest"),  # before: 9 s earlier
        Outcome(9_000, PAGE, "hit", "guest"),
        Outcome(10_500, PAGE, "miss", "guest"),  # after
        Outcome(11_000, PAGE, "hit", "guest"),
        Outcome(12_000, "/other", "miss", "guest"),  # not purged
        Outcome(25_000, PAGE, "miss", "guest"),  # beyond the window
    )
    [cost] = invalidation_cost([purge(10_000, urls=(PAGE,))], [log], window_s=10)
    assert (cost.event_type, cost.tier, cost.events) == ("photo.uploaded", "varnish", 1)
    assert (cost.origin_after, cost.origin_before) == (1, 1)
    assert cost.misses_after == 1 and cost.warm_saved == 0


def test_tags_and_prefixes_name_resources_too() -> None:
    log = edge(
        Outcome(10_100, "/weddings/w1/albums/a1", "miss", "guest", ("album:a1",)),
        Outcome(10_200, "/vendors/v1/assets/logo.png", "miss", "guest"),
        Outcome(10_300, "/vendors/v10/assets/logo.png", "miss", "guest"),  # another vendor
    )
    [cost] = invalidation_cost(
        [purge(10_000, tags=("album:a1",), prefixes=("/vendors/v1/assets/",))], [log], window_s=5
    )
    assert cost.origin_after == 2


def test_a_request_after_two_purges_is_the_cost_of_the_latest_only() -> None:
    log = edge(Outcome(12_000, PAGE, "miss", "guest"))
    costs = invalidation_cost(
        [
            purge(10_000, "e1", "photo.uploaded", urls=(PAGE,)),
            purge(11_000, "e2", "wedding.updated", urls=(PAGE,)),
        ],
        [log],
        window_s=10,
    )
    after = {c.event_type: c.origin_after for c in costs}
    assert after == {"photo.uploaded": 0, "wedding.updated": 1}


def test_one_event_purges_a_shared_edge_once() -> None:
    """Three regions' commands for one event on one varnishd: one invalidation, at the first."""
    log = edge(
        Outcome(10_400, PAGE, "miss", "guest"), regions=("us-east", "eu-west", "ap-southeast")
    )
    commands = [
        IssuedPurge(10_000 + n * 100, "e1", "photo.uploaded", region, urls=(PAGE,))
        for n, region in enumerate(["us-east", "eu-west", "ap-southeast"])
    ]
    [cost] = invalidation_cost(commands, [log], window_s=5)
    assert (cost.events, cost.origin_after) == (1, 1)


def test_warming_saves_the_guest_hits_before_a_guest_misses() -> None:
    log = edge(
        Outcome(10_200, PAGE, "miss", "warmer"),
        Outcome(10_210, PAGE, "hit", "warmer"),  # the warmer's own check: not a guest's
        Outcome(10_500, PAGE, "hit", "guest"),
        Outcome(10_600, PAGE, "hit", "guest"),
        Outcome(11_000, "/w/w1", "miss", "guest"),  # unwarmed: the guest paid
    )
    [cost] = invalidation_cost([purge(10_000, urls=(PAGE, "/w/w1"))], [log], window_s=5)
    assert cost.warm_saved == 2
    assert cost.origin_after == 2


def test_a_refill_by_anyone_but_the_warmer_earns_warming_nothing() -> None:
    log = edge(
        Outcome(10_100, PAGE, "miss", "internal"),  # the consistency checker's read-back
        Outcome(10_200, PAGE, "miss", "warmer"),
        Outcome(10_500, PAGE, "hit", "guest"),
    )
    [cost] = invalidation_cost([purge(10_000, urls=(PAGE,))], [log], window_s=5)
    assert cost.warm_saved == 0


def test_redis_keys_refilled_after_a_purge_are_its_origin_reads() -> None:
    redis = TierLog(
        "redis",
        "redis://127.0.0.1:16380/0",
        ("eu-west",),
        [
            Outcome(10_100, "wedding:w1:gallery", "miss", "unknown"),
            Outcome(10_110, "wedding:w1:gallery", "fill", "unknown"),
            Outcome(10_120, "photo:p9", "fill", "unknown"),  # not purged
            Outcome(10_300, "wedding:w1:gallery", "fill", "unknown"),  # a write nobody missed
        ],
    )
    [cost] = invalidation_cost([purge(10_000, keys=("wedding:w1:gallery",))], [redis], window_s=5)
    assert (cost.tier, cost.misses_after, cost.origin_after) == ("redis", 1, 1)


def test_the_baseline_leaves_out_what_an_earlier_purge_caused() -> None:
    """Before the second purge: one miss the first purge caused, one nothing caused."""
    log = edge(Outcome(10_500, PAGE, "miss", "guest"), Outcome(16_000, PAGE, "miss", "guest"))
    costs = invalidation_cost(
        [purge(10_000, "e1", urls=(PAGE,)), purge(17_000, "e2", "wedding.updated", urls=(PAGE,))],
        [log],
        window_s=5,
    )
    by_type = {c.event_type: (c.origin_after, c.origin_before) for c in costs}
    assert by_type == {"photo.uploaded": (1, 0), "wedding.updated": (0, 1)}


def test_an_event_reaching_every_region_is_one_event_costing_the_sum() -> None:
    logs = [
        TierLog(
            "redis",
            f"redis-{r}",
            (r,),
            [Outcome(10_100, "k1", "miss", "unknown"), Outcome(10_150, "k1", "fill", "unknown")],
        )
        for r in ("us-east", "eu-west")
    ]
    commands = [
        IssuedPurge(10_000, "e1", "photo.uploaded", r, keys=("k1",)) for r in ("us-east", "eu-west")
    ]
    [cost] = invalidation_cost(commands, logs, window_s=5)
    assert (cost.events, cost.origin_after, cost.per_event(cost.origin_after)) == (1, 2, 2.0)


def test_cloudflare_resources_are_host_and_path() -> None:
    zone = TierLog(
        "cloudflare",
        "zone-eu",
        ("eu-west",),
        [Outcome(10_500, "eu.weddings.example" + PAGE, "expired", "guest")],
        host="eu.weddings.example",
    )
    [cost] = invalidation_cost([purge(10_000, urls=(PAGE,))], [zone], window_s=5)
    assert cost.origin_after == 1 and cost.misses_after == 1


def test_who_asked_is_read_from_the_user_agent() -> None:
    assert who("cachesync-warmer") == "warmer"
    assert who("python-httpx/0.28.1") == "internal"
    assert who("Mozilla/5.0 (X11; Linux x86_64)") == "guest"
