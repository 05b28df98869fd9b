"""The purge budget: coalescing, covering prefixes, escalation, and never dropping a purge."""

from __future__ import annotations

import itertools
from dataclasses import replace

from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.sinks import budget

_ids = itertools.count()


def purge(
    *,
    urls: tuple[str, ...] = (),
    tags: tuple[str, ...] = (),
    prefixes: tuple[str, ...] = (),
    entity: str = "wedding:w1",
) -> PurgeCommand:
    n = next(_ids)
    return PurgeCommand(
        command_id=f"c{n}",
        origin_event_id=f"e{n}",
        origin_event_type="photo.uploaded",
        origin_occurred_at=1_000,
        region="eu-west",
        entity=entity,
        version=1_000 + n,
        issued_at=1_000,
        scope="wedding",
        urls=urls,
        tags=tags,
        prefixes=prefixes,
    )


def covered(plan: budget.PurgePlan, url: str) -> bool:
    return url in plan.items["urls"] or any(url.startswith(p) for p in plan.items["prefixes"])


CF = budget.Limits(provider="cloudflare", max_items_per_request=100, escalate_urls_over=30)


def test_identical_items_are_sent_once_and_keep_every_command() -> None:
    """Two commands asking for the same URL and tag yield one item each, carrying both ids."""
    a = purge(urls=("/weddings/w1/gallery",), tags=("wedding:w1:photos",))
    b = purge(urls=("/weddings/w1/gallery",), tags=("wedding:w1:photos",))
    plan = budget.plan([a, b], CF)
    assert plan.items["urls"] == {"/weddings/w1/gallery": {a.command_id, b.command_id}}
    assert plan.items["tags"] == {"wedding:w1:photos": {a.command_id, b.command_id}}
    assert plan.raw_items == 4 and plan.coalesced == 2


def test_url_under_a_purged_prefix_is_dropped_into_it() -> None:
    """A URL covered by a prefix in the same window is not sent; the prefix carries its command."""
    a = purge(urls=("/vendors/v1/assets/logo.png", "/vendors/v1"))
    b = purge(prefixes=("/vendors/v1/assets/",))
    c = purge(prefixes=("/vendors/v1/assets/img/",))
    plan = budget.plan([a, b, c], CF)
    assert set(plan.items["urls"]) == {"/vendors/v1"}
    assert plan.items["prefixes"] == {
        "/vendors/v1/assets/": {a.command_id, b.command_id, c.command_id}
    }


def test_requests_are_chunked_one_kind_each_within_the_item_limit() -> None:
    """250 URLs and 120 tags become 3 + 2 requests of at most 100 items, none lost."""
    cmds = [purge(urls=(f"/p/{i}",), tags=(f"t{i}",)) for i in range(250)]
    cmds += [purge(tags=(f"t{i}",)) for i in range(250, 370)]
    limits = budget.Limits(provider="cloudflare", max_items_per_request=100)
    plan = budget.plan(cmds, limits)
    requests = plan.requests()
    assert [r.kind for r in requests] == ["tags"] * 4 + ["urls"] * 3
    assert all(len(r.items) <= 100 for r in requests)
    assert {i for r in requests if r.kind == "urls" for i in r.items} == {
        f"/p/{i}" for i in range(250)
    }
    assert (
        plan.request_count
        == len(requests)
        == budget.minimum_requests({"urls": 250, "tags": 370}, 100)
    )


def test_many_urls_under_one_root_escalate_to_its_prefix() -> None:
    """More URLs than the threshold under /weddings/w1/ become one prefix that covers them all."""
    urls = tuple(f"/weddings/w1/photos/p{i}.jpg" for i in range(40))
    cmd = purge(urls=(*urls, "/weddings/w2/gallery", "/weddings/w1"))
    plan = budget.plan([cmd], CF)
    assert set(plan.items["prefixes"]) == {"/weddings/w1/"}
    # The root page itself is not under the prefix: it stays a URL, as does the other wedding.
    assert set(plan.items["urls"]) == {"/weddings/w2/gallery", "/weddings/w1"}
    assert [(e.reason, e.prefix, e.replaced) for e in plan.escalations] == [
        ("per_root", "/weddings/w1/", 40)
    ]
    assert all(covered(plan, u) for u in cmd.urls)


def test_cloudfront_path_budget_escalates_to_wildcards_and_covers_everything() -> None:
    """Over the paths-in-progress budget, the biggest roots fold into wildcards until it fits."""
    cmds = [
        purge(urls=tuple(f"/weddings/w{w}/photos/p{i}.jpg" for i in range(20))) for w in range(10)
    ]
    limits = budget.Limits(
        provider="cloudfront",
        max_items_per_request=3000,
        tags=False,
        max_items=50,
        max_prefixes=15,
    )
    plan = budget.plan(cmds, limits)
    assert plan.count("urls") + plan.count("prefixes") <= 50
    assert plan.count("prefixes") <= 15
    assert plan.escalations and all(e.reason == "max_items" for e in plan.escalations)
    for cmd in cmds:
        assert all(covered(plan, u) for u in cmd.urls)
        assert any(cmd.command_id in ids for ids in plan.items["prefixes"].values()) or any(
            cmd.command_id in ids for ids in plan.items["urls"].values()
        )


def test_too_many_wildcards_merge_into_their_parent() -> None:
    """20 wedding wildcards over a limit of 15 merge upwards; every wedding stays covered."""
    cmds = [purge(prefixes=(f"/weddings/w{i}/",)) for i in range(20)]
    cmds.append(purge(prefixes=("/vendors/v1/",)))
    limits = budget.Limits(
        provider="cloudfront", max_items_per_request=3000, tags=False, max_prefixes=15
    )
    plan = budget.plan(cmds, limits)
    assert plan.count("prefixes") <= 15
    for cmd in cmds:
        assert all(any(p.startswith(q) for q in plan.items["prefixes"]) for p in cmd.prefixes)
    assert "/weddings/" in plan.items["prefixes"]


def test_tags_are_left_out_for_a_provider_without_them() -> None:
    """CloudFront cannot purge by tag: tags are not planned (and not counted as coalesced)."""
    limits = budget.Limits(provider="cloudfront", max_items_per_request=3000, tags=False)
    plan = budget.plan([purge(urls=("/a/b",), tags=("x",))], limits)
    assert plan.items["tags"] == {} and plan.coalesced == 0


def test_progress_skips_what_a_failed_flush_already_sent() -> None:
    """After the tags request was acknowledged, the retried batch plans only the URLs."""
    cmd = purge(urls=("/weddings/w1/gallery",), tags=("wedding:w1:photos",))
    progress = budget.Progress()
    first = budget.plan([cmd], CF, progress=progress)
    tags_request = next(r for r in first.requests() if r.kind == "tags")
    progress.record(tags_request)
    again = budget.plan([cmd], CF, progress=progress)
    assert [r.kind for r in again.requests()] == ["urls"]
    # Another command needing the same tag is not satisfied by someone else's ack.
    other = purge(tags=("wedding:w1:photos",))
    assert budget.plan([other], CF, progress=progress).count("tags") == 1


def test_entity_root() -> None:
    """The unit of escalation is the first two path segments; a root page has none."""
    assert budget.entity_root("/weddings/w1/gallery", 2) == "/weddings/w1/"
    assert budget.entity_root("/weddings/w1", 2) is None
    assert budget.entity_root("/weddings/w1/a?x=1", 1) == "/weddings/"


def test_recent_purges_skip_items_purged_after_the_event_only() -> None:
    """An item (or a URL under a prefix) purged after the event, beyond the skew margin, is not sent again."""
    recent = budget.RecentPurges(skew_ms=1000)
    recent.record("tags", ["wedding:w1:photos"], sent_at_ms=10_000)
    recent.record("prefixes", ["/w/w1/"], sent_at_ms=10_000)
    early = purge(tags=("wedding:w1:photos",), urls=("/w/w1/rsvp", "/w/w2/rsvp"))
    plan = budget.plan([early], CF, recent=recent)  # the event happened at t=1,000
    assert plan.count("tags") == 0
    assert set(plan.items["urls"]) == {"/w/w2/rsvp"}
    late = replace(purge(tags=("wedding:w1:photos",)), origin_occurred_at=9_500)
    assert budget.plan([late], CF, recent=recent).count("tags") == 1  # within the skew: purge again
    recent.expire(now_ms=10_000 + 301_000)
    assert len(recent) == 0


def test_recent_purges_forget_an_item_only_after_its_latest_purge_is_past_keeping() -> None:
    """Purged at 1 s and again at 5 s: kept (and covering) until 5 s is older than keep_s."""
    recent = budget.RecentPurges(keep_s=10, skew_ms=0)
    recent.record("urls", ["/w/w1/rsvp"], sent_at_ms=1_000)
    recent.record("urls", ["/w/w2/rsvp"], sent_at_ms=2_000)
    recent.record("urls", ["/w/w1/rsvp"], sent_at_ms=5_000)
    recent.expire(now_ms=12_500)  # 1 s and 2 s are past keeping; 5 s is not
    assert len(recent) == 1
    assert recent.covers("urls", "/w/w1/rsvp", occurred_at_ms=4_000)
    assert not recent.covers("urls", "/w/w2/rsvp", occurred_at_ms=1_500)
    recent.expire(now_ms=15_001)
    assert len(recent) == 0
