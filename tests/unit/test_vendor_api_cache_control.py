"""Cache-Control parsing and the store / freshness / staleness decisions of the vendor API cache."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from cachesync.consumers.vendor_api import CacheControl, StoredEntry, plan_storage
from cachesync.topology import VendorApiPolicy


def policy(**overrides: object) -> VendorApiPolicy:
    base: dict[str, object] = {
        "base_url": "https://vendor.example/v1/",
        "ttl_s": 300,
        "max_ttl_s": 3600,
        "stale_while_revalidate_s": 60,
        "max_stale_s": 900,
    }
    return VendorApiPolicy.model_validate({**base, **overrides})


def test_parse_reads_directives_case_insensitively_and_keeps_the_first_duplicate() -> None:
    """Names are case-insensitive, values may be quoted, and the first of two max-ages wins."""
    cc = CacheControl.parse(
        'Public, MAX-AGE="120", max-age=5, stale-while-revalidate=30, stale-if-error=600'
    )
    assert cc == CacheControl(
        max_age=120, public=True, stale_while_revalidate=30, stale_if_error=600
    )


def test_parse_takes_a_malformed_age_as_zero_and_an_absent_header_as_empty() -> None:
    """A vendor that cannot write its max-age is treated as stale at once."""
    assert CacheControl.parse("max-age=soon").max_age == 0
    assert CacheControl.parse("max-age").max_age == 0
    assert CacheControl.parse(None) == CacheControl()
    assert CacheControl.parse("") == CacheControl()


def test_parse_recognises_the_flags_a_shared_cache_obeys() -> None:
    """no-store, no-cache, private (even qualified), must-revalidate, proxy-revalidate."""
    cc = CacheControl.parse(
        'no-store, no-cache, private="set-cookie", must-revalidate, proxy-revalidate'
    )
    assert (cc.no_store, cc.no_cache, cc.private, cc.must_revalidate, cc.proxy_revalidate) == (
        True,
        True,
        True,
        True,
        True,
    )


def test_policy_strips_the_trailing_slash_and_refuses_a_non_http_url() -> None:
    """base_url is normalised; anything but http(s) is a topology error."""
    assert policy().base_url == "https://vendor.example/v1"
    with pytest.raises(ValueError, match="http"):
        policy(base_url="ftp://vendor.example")


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Cache-Control": "no-store"}, "no-store"),
        ({"Cache-Control": "private, max-age=600"}, "private"),
        ({"Cache-Control": "max-age=600", "Vary": "*"}, "vary: *"),
    ],
)
def test_trusted_no_store_private_and_vary_star_are_not_stored(
    headers: dict[str, str], reason: str
) -> None:
    """A shared cache must not keep what the vendor marked as not for it."""
    plan = plan_storage(policy(), headers)
    assert (plan.store, plan.reason) == (False, reason)


def test_untrusted_cache_control_leaves_the_policy_in_charge() -> None:
    """With trust_cache_control off, even no-store is stored, for the policy's ttl."""
    plan = plan_storage(policy(trust_cache_control=False), {"cache-control": "no-store, max-age=5"})
    assert plan.store
    assert (plan.fresh_for_s, plan.stale_while_revalidate_s, plan.stale_if_error_s) == (
        300,
        60,
        900,
    )


@pytest.mark.parametrize(
    ("cache_control", "fresh"),
    [
        ("max-age=120", 120),
        ("max-age=120, s-maxage=30", 30),  # s-maxage is the shared cache's max-age
        ("max-age=999999", 3600),  # capped by max_ttl_s
        ("no-cache, max-age=120", 0),  # stored, but revalidated on every use
        (None, 300),  # the vendor says nothing: the policy's ttl
    ],
)
def test_freshness_lifetime(cache_control: str | None, fresh: float) -> None:
    """s-maxage over max-age, capped by the policy; no-cache means always revalidate."""
    headers = {"cache-control": cache_control} if cache_control else {}
    assert plan_storage(policy(), headers).fresh_for_s == fresh


def test_age_spent_upstream_is_taken_off_the_freshness() -> None:
    """An upstream cache already held it 100 s: 20 s of max-age=120 remain."""
    assert plan_storage(policy(), {"cache-control": "max-age=120", "age": "100"}).fresh_for_s == 20
    assert plan_storage(policy(), {"cache-control": "max-age=120", "age": "500"}).fresh_for_s == 0


def test_expires_relative_to_date_when_there_is_no_max_age() -> None:
    """Expires - Date is the lifetime; an unparseable Expires means already expired."""
    date, expires = formatdate(1_700_000_000, usegmt=True), formatdate(1_700_000_090, usegmt=True)
    assert plan_storage(policy(), {"date": date, "expires": expires}).fresh_for_s == 90
    assert plan_storage(policy(), {"date": date, "expires": "0"}).fresh_for_s == 0


def test_vendor_staleness_directives_are_honoured_up_to_the_policy_limits() -> None:
    """stale-while-revalidate / stale-if-error from the vendor, never beyond the policy's."""
    plan = plan_storage(
        policy(), {"cache-control": "max-age=10, stale-while-revalidate=5, stale-if-error=99999"}
    )
    assert (plan.stale_while_revalidate_s, plan.stale_if_error_s) == (5, 900)
    assert plan.keep_for_s == 10 + 900


def test_must_revalidate_forbids_stale_unless_stale_if_error_is_explicit() -> None:
    """must-revalidate (and s-maxage, which implies proxy-revalidate) turn staleness off."""
    for directive in ("max-age=10, must-revalidate", "s-maxage=10", "max-age=10, proxy-revalidate"):
        plan = plan_storage(policy(), {"cache-control": directive})
        assert (plan.stale_while_revalidate_s, plan.stale_if_error_s) == (0, 0), directive
    explicit = plan_storage(
        policy(), {"cache-control": "max-age=10, must-revalidate, stale-if-error=60"}
    )
    assert (explicit.stale_while_revalidate_s, explicit.stale_if_error_s) == (0, 60)


def test_an_entry_is_fresh_then_revalidatable_then_servable_only_on_error_then_dead() -> None:
    """The three windows of an entry's life, measured from when the vendor last vouched for it."""
    entry = StoredEntry(
        url="https://vendor.example/v1/x",
        body="{}",
        headers={"etag": '"a"'},
        stored_at=1000.0,
        fresh_for_s=10,
        stale_while_revalidate_s=20,
        stale_if_error_s=100,
    )
    assert entry.is_fresh(1009.9) and not entry.is_fresh(1010)
    assert entry.may_serve_while_revalidating(1029.9) and not entry.may_serve_while_revalidating(
        1030
    )
    assert entry.may_serve_on_error(1109.9) and not entry.may_serve_on_error(1110)
    assert entry.etag == '"a"' and entry.last_modified is None


def test_the_topology_declares_a_policy_per_vendor_api_of_vendor_api_changed() -> None:
    """vendor_apis names the integrations that vendor_api.changed's `api` field names."""
    from cachesync.topology import load_topology

    apis = load_topology().vendor_apis
    assert set(apis) == {"availability", "prices", "portfolio", "reviews"}
    assert not apis["portfolio"].trust_cache_control
    assert all(p.base_url.startswith(("http://", "https://")) for p in apis.values())
