"""The HTTP-purge sink: a region's purges sent to a Varnish/Fastly-style edge.

- URLs, at an edge whose objects carry a surrogate key for their own URL (the region's
  `edge_purge: xkey`; deploy/varnish/default.vcl tags every object so): `PURGE /` with
  the URLs' keys (`keys.url_xkey`) in `xkey-purge`, many URLs per request. At another
  edge (`edge_purge: purge`): `PURGE <path>`, one request per URL. Either way a URL is
  purged hard, whatever `soft` says;
- tags: `PURGE /` with the surrogate keys in `xkey-purge` (or `xkey-softpurge`, which
  keeps serving the stale object while the origin is asked again);
- prefixes: `BAN /` with `x-ban-url: ^<escaped prefix>`, matched against each cached
  object's URL.

A keyed request holds at most `max_keys_per_request` keys in a header of at most
`max_header_bytes` (Varnish refuses a longer header line with a 400). A tag that cannot
be one xkey key (whitespace and commas separate keys) is refused for the commands that
name it. Requests go over the lean client's persistent connections (sinks/edge_http.py),
pipelined: a flush of thousands of URLs is a few requests and a few milliseconds of CPU.

The edge must accept these only from the purger (deploy/varnish/default.vcl allows
loopback). A 5xx or no answer is retried with jittered backoff (only the requests that
failed) and then becomes `TransientError`; a 401/403 (a Fastly-style edge refusing the
purger's key) refuses the sink itself, `CredentialsRejected`: the batch waits,
uncommitted (sinks/cdn.py). Any other refusal (405: not allowed) is final and the
commands are returned as `Rejected`.

The flush itself (ledger, budget plan, progress, retries) is the CDN template's
(sinks/cdn.py), its ledger too (sinks/ledger.py); this module holds the edge's requests.
A flush's requests make one span (the edge, the mode, how many requests and items, how
many answered, how many commands were refused), not one per request; a sampled command's own span is the runner's.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Unpack

import httpx
from redis.asyncio import Redis

from cachesync.consumers import keys, telemetry
from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import (
    CredentialsRejected,
    ServerError,
    SinkUnavailable,
    TransientError,
)
from cachesync.consumers.settings import Settings, region_var
from cachesync.consumers.sinks import budget
from cachesync.consumers.sinks.cdn import CdnOptions, CdnPurgeSink, Sent
from cachesync.consumers.sinks.edge_http import EdgeError, EdgeRequest, edge_client, wire_target
from cachesync.consumers.sinks.retry import Retries, with_retries

log = logging.getLogger(__name__)

EdgePurge = Literal["xkey", "purge"]

# What an xkey key may not hold: the separators of keys in a header, and controls.
_NOT_ONE_KEY = re.compile(r"[\s,\x00-\x1f\x7f]")


@dataclass(slots=True)
class _Call:
    """One request of a flush: its wire form, and each item it purges with the commands
    that named it. Acknowledged item by item: a request of 200 keys must not tie each of
    them to every command of the request (the progress would grow with their product)."""

    kind: budget.Kind
    items: list[tuple[str, set[str]]]
    request: EdgeRequest

    def command_ids(self) -> set[str]:
        return set().union(*(ids for _, ids in self.items))


def edge_unavailable(settings: Settings, region: str) -> str | None:
    """Why `region` has no HTTP edge to purge or warm through, or None."""
    if region not in settings.region_edge_urls:
        var = region_var("EDGE_URL_", region)
        return f"region {region} has no edge_url ({var} or the topology)"
    return None


class HttpPurgeSink(CdnPurgeSink):
    kind: ClassVar[str] = "http_purge"
    acts_on: ClassVar[tuple[str, ...]] = ("urls", "tags", "prefixes")

    def __init__(
        self,
        region: str,
        *,
        edge_url: str,
        redis: Redis | str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        soft: bool | None = None,
        edge_purge: EdgePurge = "purge",
        **options: Unpack[CdnOptions],
    ) -> None:
        super().__init__(region, redis=redis, **options)
        hp = self.policy.http_purge
        self.retries = Retries(hp.attempts, hp.timeout_s, wait_initial_s=0.1, wait_max_s=2.0)
        # `transport`: a unit test's httpx.MockTransport playing the edge.
        self.edge = edge_client(
            edge_url, connections=hp.concurrency, timeout_s=hp.timeout_s, transport=transport
        )
        self.edge_url = edge_url.rstrip("/")
        self.edge_purge = edge_purge
        self.label = f"http_purge {self.edge_url}"
        self.soft = hp.soft if soft is None else soft
        self.max_header_bytes = hp.max_header_bytes
        self.limits = budget.Limits(
            provider=self.kind, max_items_per_request=hp.max_keys_per_request
        )

    @classmethod
    def unavailable(cls, settings: Settings, region: str) -> str | None:
        return edge_unavailable(settings, region)

    @classmethod
    def provider_args(cls, settings: Settings, region: str) -> dict[str, Any]:
        return {
            "edge_url": settings.region_edge_urls[region],
            "edge_purge": settings.topology.regions[region].edge_purge,
        }

    @property
    def backend_url(self) -> str | None:
        return self.edge_url

    async def close(self) -> None:
        await self.edge.aclose()
        await super().close()

    async def send(self, plan: budget.PurgePlan, todo: Sequence[PurgeCommand]) -> Sent:
        rejected: dict[str, str] = {}
        wire = self._requests(plan, rejected)
        attributes: dict[str, str | int] = {
            "cachesync.edge": self.edge_url,
            "cachesync.edge_purge": self.edge_purge,
            "cachesync.requests": len(wire),
            **{f"cachesync.{kind}": len(plan.items[kind]) for kind in budget.KINDS},
        }
        answered = self.calls
        with telemetry.tracer.start_as_current_span(
            "cachesync.edge_purge", attributes=attributes
        ) as span:
            try:
                await self._exchange(wire, rejected)
            except (TransientError, SinkUnavailable):
                raise
            except Exception as exc:  # nothing else may stop the loop: the batch comes back
                raise TransientError(f"{self.label}: {type(exc).__name__}: {exc}") from exc
            finally:
                span.set_attribute("cachesync.answered", self.calls - answered)
                span.set_attribute("cachesync.rejected", len(rejected))
        return Sent(rejected, ref=self.edge_url)

    # -- the requests -------------------------------------------------------------
    def _requests(self, plan: budget.PurgePlan, rejected: dict[str, str]) -> list[_Call]:
        """The flush's requests; the commands naming an item no request can carry go to
        `rejected` with why."""
        out: list[_Call] = []
        for kind in budget.KINDS:
            items = plan.items[kind]
            if not items:
                continue
            if kind == "prefixes":
                for prefix in sorted(items):
                    pattern = "^" + re.escape(wire_target(prefix))
                    ban = EdgeRequest("BAN", "/", (("x-ban-url", pattern),))
                    out.append(_Call(kind, [(prefix, items[prefix])], ban))
            elif kind == "urls" and self.edge_purge == "purge":
                out += [
                    _Call(kind, [(url, items[url])], EdgeRequest("PURGE", url))
                    for url in sorted(items)
                ]
            else:
                header = "xkey-softpurge" if kind == "tags" and self.soft else "xkey-purge"
                out += self._keyed(kind, items, header, rejected)
        return out

    def _keyed(
        self,
        kind: budget.Kind,
        items: dict[str, set[str]],
        header: str,
        rejected: dict[str, str],
    ) -> list[_Call]:
        """Tags, or URLs by their keys, in requests of at most `max_items_per_request` keys
        and `max_header_bytes` of header."""
        per = self.limits.max_items_per_request
        budget_bytes = self.max_header_bytes
        out: list[_Call] = []
        chunk: list[tuple[str, set[str]]] = []
        chunk_keys: list[str] = []
        size = 0

        def close() -> None:
            keyed = EdgeRequest("PURGE", "/", ((header, " ".join(chunk_keys)),))
            out.append(_Call(kind, chunk, keyed))

        for item in sorted(items):
            key = keys.url_xkey(wire_target(item)) if kind == "urls" else item
            length = len(key) if key.isascii() else len(key.encode())
            why = None
            if kind == "tags" and _NOT_ONE_KEY.search(key):
                why = (
                    f"tag {key[:200]!r} cannot be an xkey key (whitespace and commas separate keys)"
                )
            elif length > budget_bytes:
                why = (
                    f"{kind[:-1]} {item[:200]!r}: its key is over max_header_bytes ({budget_bytes})"
                )
            if why is not None:
                for command_id in items[item]:
                    rejected.setdefault(command_id, f"{self.label}: {why}")
                continue
            if chunk and (len(chunk) >= per or size + 1 + length > budget_bytes):
                close()
                chunk, chunk_keys, size = [], [], 0
            size += length + (1 if chunk else 0)
            chunk.append((item, items[item]))
            chunk_keys.append(key)
        if chunk:
            close()
        return out

    # -- the exchange -------------------------------------------------------------
    async def _exchange(self, wire: list[_Call], rejected: dict[str, str]) -> None:
        """Send every request, pipelined; retry those the edge did not answer (or answered
        5xx) with the sink's backoff. Acknowledged ones are recorded as they come, so
        neither a retry nor the retry of the batch sends them again."""
        todo = wire
        sent_at = time.time() * 1000

        async def attempt() -> None:
            nonlocal todo
            answers = await self.edge.many([call.request for call in todo])
            failed: list[_Call] = []
            outcomes: Counter[str] = Counter()
            acked: Counter[str] = Counter()
            refusal: str | None = None
            refused: list[str] = []
            server_error: str | None = None
            no_answer: EdgeError | None = None
            for call, answer in zip(todo, answers, strict=True):
                if isinstance(answer, EdgeError):
                    failed.append(call)
                    outcomes["error"] += 1
                    no_answer = answer
                    continue
                self.calls += 1
                status = answer.status
                if status < 400:
                    outcomes["ok"] += 1
                    acked[call.kind] += len(call.items)
                    for item, ids in call.items:
                        one = budget.PurgeRequest(call.kind, (item,), frozenset(ids))
                        self.acknowledged(one, sent_at)
                    continue
                if status >= 500:
                    failed.append(call)
                    outcomes["error"] += 1
                    server_error = f"HTTP {status} {answer.reason}"
                    continue
                message = (
                    f"{self.label}: {call.request.method} {call.request.target} refused: "
                    f"HTTP {status} {answer.reason}"
                )
                if status in (401, 403):
                    outcomes["blocked"] += 1
                    refusal = refusal or message
                    continue
                outcomes["rejected"] += 1
                refused.append(message)
                for command_id in call.command_ids():
                    rejected.setdefault(command_id, message)
            for outcome, n in outcomes.items():
                telemetry.cdn_api_calls.add(n, {**self.attrs, "outcome": outcome})
            for kind, n in acked.items():
                telemetry.cdn_items.add(n, {**self.attrs, "kind": kind})
            if refused:
                # One line per flush: an edge refusing a whole flush would flood the log.
                log.warning("%s (%d requests refused this flush)", refused[0], len(refused))
            todo = failed
            # The edge refusing the sink itself says the most about the rest: it goes first.
            if refusal is not None:
                raise CredentialsRejected(refusal)
            if server_error is not None:
                raise ServerError(f"{server_error} ({len(failed)} of the flush's requests)")
            if no_answer is not None:
                raise no_answer

        if wire:
            await with_retries(
                attempt,
                self.retries,
                network=(EdgeError,),
                sink=self.kind,
                region=self.region,
                what=f"{self.label}: {len(wire)} requests",
            )
