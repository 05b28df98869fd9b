"""What CloudFront's refusals mean for the batch, against moto and the region's Redis.

moto accepts any path and, by default, any credentials; what it would not say is said
by a botocore `before-call` hook on the sink's client, registered by the test only:
it answers as CloudFront does (InvalidArgument for a path that does not begin with
'/', a credential error code) and lets every other call through to moto. What was
invalidated is asked of moto, what was recorded of Redis.
"""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aioboto3
import pytest
import stamina
from aiobotocore.awsrequest import AioAWSResponse
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand, command_id
from cachesync.consumers.errors import CredentialsRejected, SinkMisconfigured, SinkUnavailable
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.cloudfront import CloudFrontSink
from cachesync.topology.model import CdnPolicy
from tests.conftest import metric_points

EU = "eu-west"
POLICY = CdnPolicy(window_ms=200)


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def redis(region_redis: dict[str, Redis]) -> Redis:
    return region_redis[EU]


@pytest.fixture
async def sink(
    settings: Settings, cloudfront_endpoint: str, distribution: str
) -> AsyncIterator[CloudFrontSink]:
    sink = CloudFrontSink(
        EU,
        distribution=distribution,
        redis=settings.region_redis_urls[EU],
        policy=POLICY,
        endpoint_url=cloudfront_endpoint,
        aws_access_key_id=SecretStr("testing"),
        aws_secret_access_key=SecretStr("testing"),
    )
    await sink.setup()
    yield sink
    await sink.close()


def purge(run: str, n: int, **fields: Any) -> PurgeCommand:
    event = f"ev-{run}-{n}"
    at = int(time.time() * 1000)
    return PurgeCommand(
        command_id=command_id(event, EU, "purge"),
        origin_event_id=event,
        origin_event_type="photo.updated",
        origin_occurred_at=at,
        region=EU,
        entity=f"wedding:w-{run}-{n}",
        version=at,
        issued_at=at,
        scope="wedding",
        **fields,
    )


async def invalidations(endpoint: str, distribution: str) -> list[dict[str, Any]]:
    """Every invalidation moto holds for the distribution, with its batch."""
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    async with session.client("cloudfront", endpoint_url=endpoint) as client:
        listed = await client.list_invalidations(DistributionId=distribution)
        return [
            (await client.get_invalidation(DistributionId=distribution, Id=item["Id"]))[
                "Invalidation"
            ]
            for item in listed["InvalidationList"].get("Items", [])
        ]


def _error(code: str, status: int, message: str) -> tuple[AioAWSResponse, dict[str, Any]]:
    """What botocore makes of CloudFront's error answer; the client raises ClientError."""
    parsed = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return AioAWSResponse(None, status, {}, None), parsed  # type: ignore[no-untyped-call]


class CloudFrontRules:
    """A before-call hook on CreateInvalidation: refuses as CloudFront would, else lets
    the call through to moto. Counts the calls it saw."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.refuse: tuple[str, int] | None = None  # (code, status) for every call

    def __call__(self, params: dict[str, Any], **_: Any) -> Any:
        body = ET.fromstring(params["body"])
        paths = [e.text or "" for e in body.iter() if e.tag.endswith("Path")]
        self.calls.append(paths)
        if self.refuse is not None:
            code, status = self.refuse
            return _error(code, status, f"injected {code}")
        if any(not p.startswith("/") for p in paths):
            return _error(
                "InvalidArgument", 400, "Your request contains one or more invalid paths."
            )
        return None  # on to moto

    def install(self, sink: CloudFrontSink) -> None:
        sink._client.meta.events.register(
            "before-call.cloudfront.CreateInvalidation", self, unique_id=f"rules-{id(self)}"
        )


async def test_one_bad_path_in_a_window_dead_letters_only_the_command_that_named_it(
    sink: CloudFrontSink, cloudfront_endpoint: str, distribution: str, redis: Redis, run: str
) -> None:
    """40 commands, one naming a path CloudFront refuses (InvalidArgument): bisected, the
    39 others' paths are invalidated in moto (each half its own CallerReference), only the
    bad command is rejected, and only the good ones are marked applied."""
    rules = CloudFrontRules()
    rules.install(sink)
    commands = [purge(run, i, urls=(f"/weddings/w-{run}-{i}/gallery",)) for i in range(40)]
    bad = purge(run, 99, urls=(f"weddings/w-{run}-99/no-leading-slash",))
    commands.insert(17, bad)
    for command in commands:
        sink.add(command)
    result = await sink.flush()

    assert [r.command for r in result.rejected] == [bad]
    assert "InvalidArgument" in result.rejected[0].error
    assert result.applied == 40
    made = await invalidations(cloudfront_endpoint, distribution)
    invalidated = {p for inv in made for p in inv["InvalidationBatch"]["Paths"]["Items"]}
    assert invalidated == {c.urls[0] for c in commands if c is not bad}
    refs = [inv["InvalidationBatch"]["CallerReference"] for inv in made]
    assert len(set(refs)) == len(refs)
    # Bisected, not one call per command: the refused window, then halves down to the bad one.
    assert 1 < len(rules.calls) < len(commands) / 2, rules.calls
    for command in commands:
        marked = await redis.exists(keys.applied("cloudfront", command.command_id))
        assert bool(marked) == (command is not bad), command.urls
    assert set(result.notes[commands[0].command_id].provider_ids) == {i["Id"] for i in made}

    # The window comes back (the process died before committing): no second invalidation.
    await redis.delete(*(keys.applied("cloudfront", c.command_id) for c in commands))
    for command in commands:
        sink.add(command)
    again = await sink.flush()
    assert [r.command for r in again.rejected] == [bad]
    assert len(await invalidations(cloudfront_endpoint, distribution)) == len(made)


def _blocked(metric_reader: Any) -> dict[str, float]:
    return {
        p.attributes["reason"]: p.value
        for p in metric_points(metric_reader, "cachesync.sink.blocked")
        if p.attributes.get("sink") == "cloudfront" and p.attributes.get("region") == EU
    }


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("ExpiredToken", 400, CredentialsRejected),
        ("InvalidClientTokenId", 403, CredentialsRejected),
        ("SignatureDoesNotMatch", 403, CredentialsRejected),
        ("UnrecognizedClientException", 400, CredentialsRejected),
        ("AccessDenied", 403, CredentialsRejected),
        ("", 401, CredentialsRejected),
        ("NoSuchDistribution", 404, SinkMisconfigured),
    ],
)
async def test_a_refusal_of_the_sink_puts_the_window_back_and_rejects_nothing(
    code: str,
    status: int,
    expected: type[SinkUnavailable],
    sink: CloudFrontSink,
    cloudfront_endpoint: str,
    distribution: str,
    redis: Redis,
    metric_reader: Any,
    run: str,
) -> None:
    """An expired or unknown key, a bad signature, a denied action, an unknown distribution:
    the flush raises (the loop puts the batch back, uncommitted), no command is rejected or
    marked, nothing is bisected; once CloudFront accepts again the same window is applied
    and the sink is no longer blocked."""
    rules = CloudFrontRules()
    rules.install(sink)
    rules.refuse = (code, status)
    # The sink's clock stands still until its wait is declared over below: on a busy
    # machine the second flush came after the first backoff (a second) and called again.
    now = time.monotonic()
    sink.outage.clock = lambda: now
    commands = [purge(run, i, urls=(f"/weddings/w-{run}-{i}/gallery",)) for i in range(6)]
    for command in commands:
        sink.add(command)
    with pytest.raises(expected) as caught:
        await sink.flush()
    assert caught.value.retry_after > 0 and "testing" not in str(caught.value)
    assert len(rules.calls) == 1  # the sink's fault is not bisected
    assert _blocked(metric_reader)[expected.reason] == 1
    assert not await redis.exists(*(keys.applied("cloudfront", c.command_id) for c in commands))
    assert await invalidations(cloudfront_endpoint, distribution) == []

    for command in commands:  # back before the sink's wait is over: no call
        sink.add(command)
    with pytest.raises(expected):
        await sink.flush()
    assert len(rules.calls) == 1

    rules.refuse = None  # the key was renewed, the distribution id fixed
    sink.outage.clock = lambda: time.monotonic() + 3600  # and the sink's wait is over
    for command in commands:
        sink.add(command)
    result = await sink.flush()
    assert result.applied == 6 and not result.rejected
    [made] = await invalidations(cloudfront_endpoint, distribution)
    assert sorted(made["InvalidationBatch"]["Paths"]["Items"]) == sorted(
        c.urls[0] for c in commands
    )
    assert _blocked(metric_reader)[expected.reason] == 0
