"""HTTP caching decisions for a shared cache: parse `Cache-Control`, decide what to store and for how long.

Pure functions over headers, a policy and a clock, so every rule is unit-tested
without a server. The references are RFC 9111 (HTTP caching) and RFC 5861
(`stale-while-revalidate`, `stale-if-error`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from cachesync.topology import VendorApiPolicy

# RFC 9111 §1.2.2: a delta-seconds value past 2^31 is taken as 2^31.
_MAX_DELTA = 2**31


@dataclass(frozen=True)
class CacheControl:
    """The response directives of one `Cache-Control` header that a shared cache acts on."""

    max_age: int | None = None
    s_maxage: int | None = None
    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    public: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    stale_while_revalidate: int | None = None
    stale_if_error: int | None = None

    @classmethod
    def parse(cls, header: str | None) -> CacheControl:
        """Parse a header value; unknown directives are ignored, the first of duplicates wins.

        A malformed age (`max-age=soon`) counts as 0, so the response is stale at once:
        the safe reading of a vendor that cannot say how long its data stays good.
        """
        if not header:
            return cls()
        seen: dict[str, str | None] = {}
        for part in header.split(","):
            name, sep, value = part.strip().partition("=")
            name = name.strip().lower()
            if name and name not in seen:
                seen[name] = value.strip().strip('"') if sep else None

        def seconds(name: str) -> int | None:
            if name not in seen:
                return None
            raw = seen[name]
            if raw is None or not raw.isdigit():
                return 0
            return min(int(raw), _MAX_DELTA)

        return cls(
            max_age=seconds("max-age"),
            s_maxage=seconds("s-maxage"),
            no_store="no-store" in seen,
            # `no-cache="field"` and `private="field"` are taken whole: stricter, never wrong.
            no_cache="no-cache" in seen,
            private="private" in seen,
            public="public" in seen,
            must_revalidate="must-revalidate" in seen,
            proxy_revalidate="proxy-revalidate" in seen,
            stale_while_revalidate=seconds("stale-while-revalidate"),
            stale_if_error=seconds("stale-if-error"),
        )


@dataclass(frozen=True)
class StoragePlan:
    """Whether to store a response and how long each phase of its life lasts, in seconds."""

    store: bool
    fresh_for_s: float = 0.0
    stale_while_revalidate_s: float = 0.0
    stale_if_error_s: float = 0.0
    reason: str = ""  # why it is not stored (for logs)

    @property
    def keep_for_s(self) -> float:
        """How long Redis keeps the entry: until no rule may serve it any more."""
        return self.fresh_for_s + max(self.stale_while_revalidate_s, self.stale_if_error_s)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def plan_storage(policy: VendorApiPolicy, headers: Mapping[str, str]) -> StoragePlan:
    """Decide, for a 200 (or a 304's merged headers), what a shared cache may do with it.

    With `trust_cache_control` off, the vendor's headers are ignored and the policy
    alone decides. With it on: `no-store`, `private` and `Vary: *` are not stored;
    freshness is `s-maxage`, else `max-age`, else `Expires - Date`, else the policy's
    `ttl_s`, capped by `max_ttl_s` and less the `Age` an upstream cache already spent;
    `no-cache` stores the entry but revalidates it on every use; the vendor's
    `stale-while-revalidate` / `stale-if-error` are honoured up to the policy's limits,
    and `must-revalidate` / `proxy-revalidate` (or `s-maxage`, which implies it) forbid
    serving stale unless the vendor also sent an explicit `stale-if-error`.
    """
    swr = float(policy.stale_while_revalidate_s)
    sie = float(policy.max_stale_s)
    if not policy.trust_cache_control:
        return StoragePlan(True, float(policy.ttl_s), swr, sie)

    cc = CacheControl.parse(_header(headers, "cache-control"))
    if cc.no_store:
        return StoragePlan(False, reason="no-store")
    if cc.private:
        return StoragePlan(False, reason="private")
    if (_header(headers, "vary") or "").strip() == "*":
        return StoragePlan(False, reason="vary: *")

    if cc.s_maxage is not None:
        lifetime = float(cc.s_maxage)
    elif cc.max_age is not None:
        lifetime = float(cc.max_age)
    else:
        expires = _header(headers, "expires")
        expires_at = _http_date(expires)
        if expires is not None:
            # An invalid Expires (often "0" or "-1") means already expired (RFC 9111 §5.3).
            date = _http_date(_header(headers, "date"))
            lifetime = max(0.0, expires_at - date) if expires_at and date else 0.0
        else:
            lifetime = float(policy.ttl_s)
    lifetime = min(lifetime, float(policy.max_ttl_s))
    age = (_header(headers, "age") or "").strip()
    if age.isdigit():
        lifetime = max(0.0, lifetime - int(age))
    if cc.no_cache:
        lifetime = 0.0

    # An explicit stale-if-error applies "regardless of other freshness information"
    # (RFC 5861 §4); otherwise must-revalidate forbids serving stale at all.
    forbid_stale = cc.must_revalidate or cc.proxy_revalidate or cc.s_maxage is not None
    if forbid_stale:
        swr = 0.0
    elif cc.stale_while_revalidate is not None:
        swr = min(swr, float(cc.stale_while_revalidate))
    if cc.stale_if_error is not None:
        sie = min(sie, float(cc.stale_if_error))
    elif forbid_stale:
        sie = 0.0
    return StoragePlan(True, lifetime, swr, sie)
