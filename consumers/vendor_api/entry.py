"""What the vendor API cache stores per request, and what a caller gets back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

CacheStatus = Literal["HIT", "MISS", "REVALIDATED", "STALE", "BYPASS"]
StaleReason = Literal["revalidating", "upstream_error", "upstream_timeout"]

# The response headers an entry keeps: what a 304 may update and what the caching
# decisions read again when it does (RFC 9111 §4.3.4). `Age` is per response, never kept.
KEPT_HEADERS = (
    "cache-control",
    "content-type",
    "date",
    "etag",
    "expires",
    "last-modified",
    "vary",
)


def kept_headers(headers: Mapping[str, str], *, with_age: bool = False) -> dict[str, str]:
    names = (*KEPT_HEADERS, "age") if with_age else KEPT_HEADERS
    return {k.lower(): v for k, v in headers.items() if k.lower() in names}


class StoredEntry(BaseModel):
    """One cached vendor response, as JSON in Redis (never pickle: Redis is not trusted code)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    url: str
    body: str  # validated JSON text
    headers: dict[str, str]
    stored_at: float  # when the vendor last vouched for it (a 200 or a 304), epoch seconds
    fresh_for_s: float
    stale_while_revalidate_s: float
    stale_if_error_s: float

    @property
    def etag(self) -> str | None:
        return self.headers.get("etag")

    @property
    def last_modified(self) -> str | None:
        return self.headers.get("last-modified")

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    def is_fresh(self, now: float) -> bool:
        return self.age(now) < self.fresh_for_s

    def may_serve_while_revalidating(self, now: float) -> bool:
        return self.age(now) < self.fresh_for_s + self.stale_while_revalidate_s

    def may_serve_on_error(self, now: float) -> bool:
        return self.age(now) < self.fresh_for_s + self.stale_if_error_s

    def response(
        self,
        *,
        api: str,
        vendor_id: str,
        status: CacheStatus,
        now: float,
        stale_reason: StaleReason | None = None,
        error: str | None = None,
        coalesced: bool = False,
    ) -> VendorResponse:
        return VendorResponse(
            api=api,
            vendor_id=vendor_id,
            url=self.url,
            content=self.body.encode(),
            headers=dict(self.headers),
            cache_status=status,
            age_s=self.age(now),
            stale_reason=stale_reason,
            error=error,
            coalesced=coalesced,
        )


@dataclass(frozen=True)
class VendorResponse:
    """A vendor's JSON answer, and how the cache produced it.

    `cache_status` is HIT (fresh from cache), MISS (fetched), REVALIDATED (the vendor
    answered 304 and the entry was refreshed), STALE (served past freshness; see
    `stale_reason` and, for errors, `error`) or BYPASS (the cache's Redis was down).
    `coalesced` is true when another caller's upstream call (in this process or
    another) answered this one; such an answer is a HIT, since this caller made no call.
    """

    api: str
    vendor_id: str
    url: str
    content: bytes
    headers: dict[str, str]
    cache_status: CacheStatus
    age_s: float = 0.0
    stale_reason: StaleReason | None = None
    error: str | None = None
    coalesced: bool = False
    status_code: int = field(default=200)

    @property
    def is_stale(self) -> bool:
        return self.cache_status == "STALE"

    def json(self) -> Any:
        return json.loads(self.content)
