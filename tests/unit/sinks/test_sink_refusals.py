"""A provider refusing the sink itself (credentials, zone) pauses it; only a command's own
items are ever dead-lettered. Against httpx.MockTransport and a fake clock."""

from __future__ import annotations

import itertools
import json
import logging
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import stamina
from pydantic import SecretStr
from rich.console import Console

from cachesync.consumers.commands import PurgeCommand
from cachesync.consumers.errors import (
    CredentialsRejected,
    RetryAfter,
    SinkMisconfigured,
    SinkUnavailable,
    TransientError,
)
from cachesync.consumers.ops.status import Snapshot, render
from cachesync.consumers.settings import load_settings
from cachesync.consumers.sinks.cloudflare import CloudflareSink
from cachesync.consumers.sinks.http_purge import HttpPurgeSink
from cachesync.consumers.sinks.retry import Outage
from cachesync.topology.model import CdnPolicy, CloudflarePolicy
from tests.conftest import metric_points

TOKEN = "sekrit-token-value"
_ids = itertools.count()


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


def purge(**fields: tuple[str, ...]) -> PurgeCommand:
    n = next(_ids)
    return PurgeCommand(
        command_id=f"refusal-cmd-{n}",
        origin_event_id=f"refusal-ev-{n}",
        origin_event_type="photo.uploaded",
        origin_occurred_at=1_000,
        region="eu-west",
        entity="wedding:w1",
        version=1_000,
        issued_at=1_000,
        scope="wedding",
        **fields,
    )


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200, json={"success": True, "errors": [], "messages": [], "result": {"id": "x"}}
    )


def fail(status: int, code: int, message: str) -> httpx.Response:
    body = {"success": False, "errors": [{"code": code, "message": message}], "messages": []}
    return httpx.Response(status, json=body)


class Api:
    """A Cloudflare API whose token can be revoked; records every request."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] = ok) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    def bodies(self) -> list[dict[str, list[str]]]:
        return [json.loads(r.content) for r in self.requests]


def cloudflare(api: Api) -> CloudflareSink:
    cdn = CdnPolicy(cloudflare=CloudflarePolicy(rate_per_s=1000.0, burst=50))
    return CloudflareSink(
        "eu-west",
        zone=f"zone-{uuid.uuid4().hex[:8]}",
        token=SecretStr(TOKEN),
        public_url="https://eu.weddings.example",
        policy=cdn,
        api_url="https://cf.test",
        transport=httpx.MockTransport(api),
    )


def blocked(metric_reader: Any, sink: str, region: str = "eu-west") -> dict[str, float]:
    """The cachesync.sink.blocked gauge of `sink` in `region`, by reason."""
    return {
        p.attributes["reason"]: p.value
        for p in metric_points(metric_reader, "cachesync.sink.blocked")
        if p.attributes.get("sink") == sink and p.attributes.get("region") == region
    }


def test_refusals_of_the_sink_are_transient_and_wait_as_the_sink_says() -> None:
    """CredentialsRejected and SinkMisconfigured are RetryAfter: the loop puts the batch back
    for the sink's own backoff and commits nothing; neither is a PermanentSinkError."""
    for cls, reason in ((CredentialsRejected, "credentials"), (SinkMisconfigured, "configuration")):
        assert issubclass(cls, SinkUnavailable) and issubclass(cls, RetryAfter)
        assert issubclass(cls, TransientError) and cls.reason == reason


def test_outage_backs_off_to_a_ceiling_warns_once_a_minute_and_says_when_it_ends(
    caplog: pytest.LogCaptureFixture, metric_reader: Any
) -> None:
    """Twelve refusals over two minutes: waits double up to the ceiling, two warnings (not
    twelve), the gauge is 1 while blocked and 0 after, and one line when it is over."""
    now = [0.0]
    outage = Outage(
        "unit-outage",
        "eu-west",
        wait_initial_s=1.0,
        wait_max_s=8.0,
        clock=lambda: now[0],
        rng=random.Random(7),
    )
    caplog.set_level(logging.INFO, logger="cachesync.consumers.sinks.retry")
    waits = []
    for i in range(12):
        now[0] = i * 10.0
        exc = outage.refused(CredentialsRejected("cloudflare zone z: HTTP 403: 10000 Auth"))
        waits.append(exc.retry_after)
        assert 0.5 <= exc.retry_after <= 0.5 + min(8.0, 2.0**i), (i, exc.retry_after)
    assert max(waits[6:]) > 2.5  # it grew past the first waits (the ceiling is 8)
    tries, outage.tries = outage.tries, 5_000  # days of refusals: still the ceiling
    assert outage.refused(CredentialsRejected("again")).retry_after <= 8.5
    outage.tries = tries
    assert outage.blocked and outage.tries == 12
    assert blocked(metric_reader, "unit-outage") == {"credentials": 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # at 0 s and at 60 s
    assert "10000 Auth" in warnings[0].getMessage() and "paused" in warnings[0].getMessage()
    assert "blocked 60s, 7 tries" in warnings[1].getMessage()

    now[0] = 125.0
    outage.accepted()
    outage.accepted()  # only the end of an outage says anything
    assert not outage.blocked
    assert blocked(metric_reader, "unit-outage") == {"credentials": 0}
    ends = [r.getMessage() for r in caplog.records if "accepted again" in r.getMessage()]
    assert ends == [
        "unit-outage sink in eu-west: accepted again after 125s blocked (credentials, 12 tries)"
    ]
    # A new outage starts from the first wait again.
    exc = outage.refused(SinkMisconfigured("cloudflare zone z: HTTP 404: 7003"))
    assert exc.retry_after <= 1.5
    assert blocked(metric_reader, "unit-outage") == {"credentials": 0, "configuration": 1}


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (403, 10000, CredentialsRejected),  # a revoked or rotated token
        (401, 10000, CredentialsRejected),
        (400, 9109, CredentialsRejected),  # invalid access token, whatever the status
        (400, 6003, CredentialsRejected),  # malformed Authorization header
        (403, 9999, CredentialsRejected),  # any 403: the token lacks the purge permission
        (404, 7003, SinkMisconfigured),  # the zone id is wrong
        (400, 7003, SinkMisconfigured),
    ],
)
async def test_cloudflare_refusals_of_the_sink_put_the_batch_back_and_reject_nothing(
    status: int, code: int, expected: type[SinkUnavailable], metric_reader: Any
) -> None:
    """The token or the zone refused: no command is rejected, nothing is bisected (one
    call), the batch is put back with a wait, and the sink shows as blocked."""
    api = Api(lambda r: fail(status, code, "refused"))
    sink = cloudflare(api)
    for i in range(8):
        sink.add(purge(tags=(f"t{i}",)))
    with pytest.raises(expected) as caught:
        await sink.flush()
    assert caught.value.retry_after > 0
    assert f"HTTP {status}: {code} refused" in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert len(api.requests) == 1
    assert sink.outage.blocked
    assert blocked(metric_reader, "cloudflare")[expected.reason] == 1
    await sink.close()


async def test_cloudflare_token_revoked_mid_flush_resumes_with_only_the_rest(
    metric_reader: Any,
) -> None:
    """Tags go through, then the token is revoked before the files: the batch waits. Batches
    that come back before the wait is over are put back without a call (one call per wait,
    however many partitions); once the token is accepted again the retry sends only the
    files, and the sink is no longer blocked."""
    revoked = [False]
    files_calls = itertools.count()

    def answer(request: httpx.Request) -> httpx.Response:
        if "files" in json.loads(request.content) and next(files_calls) == 0:
            revoked[0] = True  # the first files call: revoked while it was on its way
        if revoked[0]:
            return fail(403, 10000, "Authentication error")
        return ok(request)

    api = Api(answer)
    sink = cloudflare(api)
    now = [0.0]
    sink.outage.clock = lambda: now[0]
    cmd = purge(urls=("/weddings/w1/gallery",), tags=("wedding:w1:photos",))
    sink.add(cmd)
    with pytest.raises(CredentialsRejected) as first:
        await sink.flush()
    assert len(api.requests) == 2  # tags accepted, files refused
    for _ in range(5):  # other partitions' batches, within the wait
        sink.add(cmd)
        with pytest.raises(CredentialsRejected) as held:
            await sink.flush()
        assert 0 < held.value.retry_after <= first.value.retry_after + 0.05
    assert len(api.requests) == 2 and sink.outage.tries == 1
    now[0] += first.value.retry_after  # the wait is over: the next batch asks again
    sink.add(cmd)
    with pytest.raises(CredentialsRejected):
        await sink.flush()
    assert len(api.requests) == 3 and sink.outage.tries == 2
    revoked[0] = False  # an operator restored the token
    now[0] += 60.0
    sink.add(cmd)
    result = await sink.flush()
    assert result.applied == 1 and not result.rejected
    assert [b for b in api.bodies() if "tags" in b] == [{"tags": ["wedding:w1:photos"]}]
    assert api.bodies()[-1] == {"files": ["https://eu.weddings.example/weddings/w1/gallery"]}
    assert not sink.outage.blocked
    assert blocked(metric_reader, "cloudflare")["credentials"] == 0
    sink.add(purge(tags=("t-after",)))  # no longer held
    assert (await sink.flush()).applied == 1
    await sink.close()


async def test_cloudflare_400_for_an_item_is_still_the_command_s_fault() -> None:
    """A 400 about an item (1019 bad tag) is not a refusal of the sink: bisected, rejected."""

    def answer(request: httpx.Request) -> httpx.Response:
        if "bad tag" in json.loads(request.content).get("tags", []):
            return fail(400, 1019, "tags must not contain spaces")
        return ok(request)

    sink = cloudflare(Api(answer))
    good, bad = purge(tags=("t-good",)), purge(tags=("bad tag",))
    sink.add(good)
    sink.add(bad)
    result = await sink.flush()
    assert result.applied == 1 and [r.command for r in result.rejected] == [bad]
    assert not sink.outage.blocked
    await sink.close()


@pytest.mark.parametrize("status", [401, 403])
async def test_http_purge_edge_refusing_the_purger_pauses_the_sink(status: int) -> None:
    """An edge that refuses the purger's key (Fastly-style 401/403) puts the batch back; the
    refusal wins over other failures of the same flush."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "BAN":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(status)

    sink = HttpPurgeSink(
        "eu-west", edge_url="http://edge.test", transport=httpx.MockTransport(answer)
    )
    sink.add(purge(urls=("/weddings/w1/gallery",), prefixes=("/w/w1/",)))
    with pytest.raises(CredentialsRejected, match=f"HTTP {status}"):
        await sink.flush()
    assert sink.outage.blocked
    await sink.close()


def test_status_shows_a_blocked_sink_in_its_row_and_says_what_to_do() -> None:
    """The status view reads cachesync_sink_blocked from /metrics: the blocked sink's row says
    BLOCKED and why, a line below says the batches wait; a sink at 0 is ok."""
    settings = load_settings()
    labels = lambda sink, reason: (  # noqa: E731
        ("reason", reason),
        ("region", "eu-west"),
        ("sink", sink),
    )
    snap = Snapshot(
        at=0.0,
        samples={
            "cachesync_sink_blocked": {
                labels("cloudflare", "credentials"): 1.0,
                labels("cloudfront", "credentials"): 0.0,
            },
            "cachesync_commands_applied_total": {
                (("outcome", "applied"), ("region", "eu-west"), ("sink", "redis")): 5.0
            },
        },
    )
    console = Console(record=True, width=220)
    console.print(render(settings, snap, None))
    text = console.export_text()
    rows = {
        line.split("│")[2].strip(): line
        for line in text.splitlines()
        if line.startswith("│") and "eu-west" in line
    }
    assert "BLOCKED: credentials" in rows["cloudflare"]
    assert "BLOCKED" not in rows["cloudfront"] and " ok " in rows["cloudfront"]
    assert " ok " in rows["redis"]
    assert "cloudflare in eu-west is blocked: the provider refuses its credentials" in text
