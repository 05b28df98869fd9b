"""Adaptive coalescing (sinks/budget.py `coalesce_s`), the token bucket's peek, the
narrowest wildcards for CloudFront, and CloudFront's invalidations in parts."""

from __future__ import annotations

import time

import pytest
from pydantic import SecretStr

from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.sinks import budget
from cachesync.consumers.sinks.cloudfront import CloudFrontSink, _parts

NOW = 1_000_000.0


def hold(
    count: int,
    age_ms: float,
    *,
    span_ms: float | None = None,
    quiet_s: float = 0.0,
    wait_s: float = 0.0,
) -> float:
    """`count` commands, the oldest written `age_ms` ago, over `span_ms` (all of the age
    unless given: read as they were written)."""
    return budget.coalesce_s(
        count,
        NOW - age_ms,
        NOW - age_ms + (age_ms if span_ms is None else span_ms),
        quiet_s,
        window_ms=1000,
        budget_wait_s=wait_s,
        burst_per_s=500,
        now_ms=NOW,
    )


def test_a_purge_goes_out_at_once_when_the_budget_allows() -> None:
    """A few commands, a token free: no wait at all (the window is not a delay)."""
    assert hold(1, 0) == 0
    assert hold(3, 40) == 0


def test_purges_gather_while_the_bucket_is_empty_within_the_window() -> None:
    assert hold(1, 100, wait_s=0.3) == 0.3
    assert hold(1, 900, wait_s=0.3) == pytest.approx(0.1)  # the window closes first
    assert hold(1, 1000, wait_s=0.3) == 0  # and never longer


def test_a_burst_gathers_until_it_pauses() -> None:
    """Faster than burst_per_s: keep gathering until nothing arrived for a tenth of the
    window (at least MIN_BURST_PAUSE_S); the window bounds it."""
    assert hold(400, 100) == budget.MIN_BURST_PAUSE_S  # 4,000/s
    assert hold(400, 100, quiet_s=0.15) == pytest.approx(0.05)
    assert hold(400, 100, quiet_s=0.2) == 0  # paused: over
    assert hold(600, 950) == pytest.approx(0.05)
    longer = budget.coalesce_s(
        400, NOW - 100, NOW, 0.5, window_ms=10_000, budget_wait_s=0, burst_per_s=500, now_ms=NOW
    )
    assert longer == pytest.approx(1.5)  # a 10 s window: a burst pauses after 2 s
    assert hold(10, 300) == 0  # 33/s: not a burst


def test_a_burst_read_late_is_still_a_burst() -> None:
    """The rate is the commands' own, over the span in which they were written: a sink's
    process busy elsewhere that reads a burst seconds late does not take it for a trickle."""
    # 300 commands, the oldest 700 ms old (430/s by age), written within 100 ms: 3,000/s.
    assert hold(300, 700, span_ms=100) == budget.MIN_BURST_PAUSE_S
    assert hold(300, 700, span_ms=650) == 0  # written at 460/s: not a burst
    assert hold(1, 700, span_ms=0) == 0  # one command is no rate


def test_after_a_quiet_spell_the_first_call_settles_first() -> None:
    """A provider with a settle time waits until its oldest purge is that old, within
    the window, however few purges it holds; without one, a lone purge goes at once."""

    def settle(age_ms: float, settle_s: float, window_ms: float = 10_000) -> float:
        return budget.coalesce_s(
            1,
            NOW - age_ms,
            NOW - age_ms,
            0.0,
            window_ms=window_ms,
            budget_wait_s=0,
            burst_per_s=500,
            settle_s=settle_s,
            now_ms=NOW,
        )

    assert settle(100, 1.0) == pytest.approx(0.9)
    assert settle(1000, 1.0) == 0
    assert settle(100, 0.0) == 0
    assert settle(100, 1.0, window_ms=500) == pytest.approx(0.4)  # the window bounds it


def test_cloudfront_settles_only_after_a_quiet_spell() -> None:
    """The settle time applies while the bucket is full (no call for as long as it takes
    to refill): a steady flow keeps it from filling and never waits for it."""
    now = [0.0]
    sink = CloudFrontSink(
        "eu-west",
        distribution="E1",
        redis="redis://127.0.0.1:1/0",  # never connected: coalescing reads no Redis
        aws_access_key_id=SecretStr("testing"),
        aws_secret_access_key=SecretStr("testing"),
    )
    assert sink.settle_s == sink.policy.cloudfront.settle_ms / 1000 > 0
    sink.bucket = budget.TokenBucket(rate=2.0, burst=5, clock=lambda: now[0])
    written = time.time() * 1000 - 100
    assert sink.coalesce_for(1, int(written), int(written), 0.0) == pytest.approx(
        sink.settle_s - 0.1, abs=0.05
    )
    assert sink.bucket.take() == 0  # a call: the bucket is no longer full
    assert sink.coalesce_for(1, int(written), int(written), 0.0) == 0
    now[0] = 0.5  # refilled: quiet again
    assert sink.coalesce_for(1, int(written), int(written), 0.0) > 0


def test_the_bucket_is_idle_once_refilled() -> None:
    now = [0.0]
    bucket = budget.TokenBucket(rate=2.0, burst=5, clock=lambda: now[0])
    assert bucket.idle()
    assert bucket.take() == 0
    assert not bucket.idle()
    now[0] = 0.49
    assert not bucket.idle()
    now[0] = 0.5
    assert bucket.idle()
    bucket.block(3.0)
    now[0] = 10.0
    assert bucket.idle()


def test_the_bucket_says_how_long_until_a_token_without_taking_one() -> None:
    now = [0.0]
    bucket = budget.TokenBucket(rate=2.0, burst=1, clock=lambda: now[0])
    assert bucket.wait_s() == 0 and bucket.wait_s() == 0  # peeking takes nothing
    assert bucket.take() == 0
    assert bucket.wait_s() == 0.5
    now[0] = 0.5
    assert bucket.wait_s() == 0


def purge(n: int, *urls: str, prefixes: tuple[str, ...] = ()) -> PurgeCommand:
    return PurgeCommand(
        command_id=f"c{n}",
        origin_event_id=f"e{n}",
        origin_event_type="guest_portal.updated",
        origin_occurred_at=1,
        region="eu-west",
        entity=f"wedding:w{n}",
        version=1,
        issued_at=1,
        scope="portal",
        urls=urls,
        prefixes=prefixes,
    )


def test_wildcards_that_may_end_anywhere_merge_neighbours_into_their_common_string() -> None:
    """More portal prefixes than wildcards free: each group becomes the longest string its
    members share, not their common directory (/w/*, every wedding's portal)."""
    ids = ["wa10", "wa11", "wa12", "wb20", "wb21", "wc30"]
    commands = [purge(i, prefixes=(f"/w/{w}/",)) for i, w in enumerate(ids)]
    limits = budget.Limits("cloudfront", 3000, tags=False, max_prefixes=3, wildcard_anywhere=True)
    plan = budget.plan(commands, limits)
    assert sorted(plan.items["prefixes"]) == ["/w/wa1", "/w/wb2", "/w/wc30/"]
    assert all(e.reason == "max_prefixes" for e in plan.escalations)
    # Every command's prefix is still covered, by the group that replaced it.
    for command in commands:
        assert any(command.prefixes[0].startswith(p) for p in plan.items["prefixes"])
    by_directory = budget.plan(
        commands, budget.Limits("cloudfront", 3000, tags=False, max_prefixes=3)
    )
    assert list(by_directory.items["prefixes"]) == ["/w/"]


def test_more_paths_than_one_invalidation_holds_go_in_parts_by_command() -> None:
    """Each part within the limit, a command's paths never split, each path sent once."""
    commands = [purge(i, f"/weddings/w{i}/a", f"/weddings/w{i}/b", "/shared") for i in range(5)]
    plan = budget.plan(commands, budget.Limits("cloudfront", 3000, tags=False))
    parts = _parts(plan, commands, size=5)
    assert [ids for ids, _ in parts] == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    sent = [p for _, paths in parts for p in paths]
    assert sorted(sent) == sorted(p for k in ("urls", "prefixes") for p in plan.items[k])
    assert all(len(paths) <= 5 for _, paths in parts)


def test_under_its_reserve_the_bucket_paces_flushes_at_its_rate() -> None:
    """Half the burst is kept for bursts: a steady flow that spent the other half gathers
    until the refill is back at the reserve, rather than calling on every token."""
    now = [0.0]
    bucket = budget.TokenBucket(rate=50.0, burst=10, clock=lambda: now[0])
    for _ in range(5):
        assert bucket.wait_s() == 0
        assert bucket.take() == 0
    # 5 tokens left of 10: at the reserve, a flush still goes at once...
    assert bucket.wait_s() == 0
    assert bucket.take() == 0
    # ...and under it, it waits until the bucket is back at 5 (1 token at 50/s).
    assert bucket.wait_s() == pytest.approx(0.02)
    now[0] = 0.02
    assert bucket.wait_s() == pytest.approx(0.0)
    # The call itself may still use the reserve: take() does not wait for it.
    for _ in range(5):
        assert bucket.take() == 0
