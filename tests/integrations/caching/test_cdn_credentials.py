"""CDN credentials revoked mid-stream for 30 s, then restored: nothing is lost, nothing is
dead-lettered, and an operator sees the blocked sinks.

The Cloudflare stand-in refuses the sink's token as the API does (403, code 10000
"Authentication error"); moto, with its IAM authentication switched on for the test,
refuses the CloudFront sink's key once its policy is detached (403 AccessDenied), as
AWS does for a key whose permission was taken away. The oracles are the stand-in's
ledger of accepted purges, moto's list of invalidations and the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aioboto3
import httpx
import pytest
import stamina
from aiokafka import AIOKafkaConsumer
from pydantic import SecretStr
from rich.console import Console

from cachesync.consumers.commands import PurgeCommand, command_id
from cachesync.consumers.ops.status import collect, render
from cachesync.consumers.pipeline.kafka import make_producer
from cachesync.consumers.pipeline.roles import SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.cloudflare import CloudflareSink
from cachesync.consumers.sinks.cloudfront import CloudFrontSink
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.schemas import SingleObjectCodec
from cachesync.topology.model import CdnPolicy, CloudFrontPolicy
from tests.conftest import metric_points
from tests.helpers import eventually
from tests.integrations.caching.conftest import CloudflareApi

EU = "eu-west"
POLICY = CdnPolicy(window_ms=200, cloudfront=CloudFrontPolicy(window_ms=1000))
PUBLIC = "https://eu.weddings.example"
REVOKED_S = 30.0
STREAM_S = 45.0
RATE_PER_S = 4.0


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    with stamina.set_testing(True, attempts=3):
        yield


@dataclass
class AwsKeys:
    access_key_id: str
    secret_access_key: str


@dataclass
class MotoIam:
    """A CloudFront purger key and an admin key in moto, with authentication switched on."""

    endpoint: str
    purger: AwsKeys
    admin: AwsKeys
    user: str
    policy_arn: str

    def client(self, service: str, keys: AwsKeys) -> Any:
        session = aioboto3.Session(
            aws_access_key_id=keys.access_key_id,
            aws_secret_access_key=keys.secret_access_key,
            region_name="us-east-1",
        )
        return session.client(service, endpoint_url=self.endpoint)

    async def revoke(self) -> None:
        """The purger loses its CloudFront permission: AccessDenied from now on."""
        async with self.client("iam", self.admin) as iam:
            await iam.detach_user_policy(UserName=self.user, PolicyArn=self.policy_arn)

    async def restore(self) -> None:
        async with self.client("iam", self.admin) as iam:
            await iam.attach_user_policy(UserName=self.user, PolicyArn=self.policy_arn)

    async def open(self) -> None:
        """Authentication off: any key is accepted again."""
        await _moto_auth(self.endpoint, on=False)


async def _moto_auth(endpoint: str, on: bool) -> None:
    """moto checks every request's signature and IAM policy from now on (or stops)."""
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{endpoint}/moto-api/reset-auth", content=b"0" if on else b"inf"
        )
        response.raise_for_status()


@pytest.fixture
async def moto_iam(cloudfront_endpoint: str) -> AsyncIterator[MotoIam]:
    run = uuid.uuid4().hex[:8]
    session = aioboto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    async with session.client("iam", endpoint_url=cloudfront_endpoint) as iam:

        async def user(name: str, actions: str) -> tuple[AwsKeys, str]:
            await iam.create_user(UserName=name)
            document = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
            }
            policy = await iam.create_policy(
                PolicyName=f"{name}-policy", PolicyDocument=json.dumps(document)
            )
            arn = policy["Policy"]["Arn"]
            await iam.attach_user_policy(UserName=name, PolicyArn=arn)
            key = (await iam.create_access_key(UserName=name))["AccessKey"]
            return AwsKeys(key["AccessKeyId"], key["SecretAccessKey"]), arn

        purger, policy_arn = await user(f"purger-{run}", "cloudfront:*")
        admin, _ = await user(f"admin-{run}", "*")
    await _moto_auth(cloudfront_endpoint, on=True)
    try:
        yield MotoIam(cloudfront_endpoint, purger, admin, f"purger-{run}", policy_arn)
    finally:
        await _moto_auth(cloudfront_endpoint, on=False)  # the other tests' moto is open again


def _command(run: str, i: int) -> PurgeCommand:
    event = f"ev-{run}-{i}"
    now = int(time.time() * 1000)
    return PurgeCommand(
        command_id=command_id(event, EU, "purge"),
        origin_event_id=event,
        origin_event_type="photo.updated",
        origin_occurred_at=now,
        region=EU,
        entity=f"wedding:w-{run}-{i}",
        version=now,
        issued_at=now,
        scope="wedding",
        tags=(f"wedding:w-{run}-{i}:photos",),
        urls=(f"/weddings/w-{run}-{i}/gallery",),
    )


def _covered(path: str, purged: set[str], wildcard: str) -> bool:
    """`path` itself was purged, or a prefix (Cloudflare) / wildcard (CloudFront) above it."""
    if path in purged:
        return True
    return any(p.endswith(wildcard) and path.startswith(p[: -len(wildcard)]) for p in purged)


def _blocked(metric_reader: Any, sink: str) -> float:
    return sum(
        p.value
        for p in metric_points(metric_reader, "cachesync.sink.blocked")
        if p.attributes.get("sink") == sink and p.attributes.get("region") == EU
    )


async def _dead_letters(
    settings: Settings, run: str
) -> list[tuple[bytes | None, dict[str, bytes]]]:
    """Every record of the dead-letter topic whose key names this run's entities, read to its end."""
    consumer = AIOKafkaConsumer(
        settings.dead_letter_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[tuple[bytes | None, dict[str, bytes]]] = []
    try:
        partitions = consumer.assignment()
        for _ in range(100):
            partitions = consumer.assignment()
            if partitions:
                break
            await asyncio.sleep(0.1)
        ends = await consumer.end_offsets(list(partitions))
        assert ends, "the dead-letter topic has no partitions"

        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        while await behind():
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    if record.key is not None and run.encode() in record.key:
                        found.append((record.value, dict(record.headers)))
    finally:
        await consumer.stop()
    return found


@pytest.mark.timeout(240)
async def test_cdn_credentials_revoked_for_30s_mid_stream_lose_nothing_and_dead_letter_nothing(
    settings: Settings,
    topics: list[str],
    run_roles_bg: Any,
    cloudflare_api: CloudflareApi,
    distribution: str,
    moto_iam: MotoIam,
    metric_reader: Any,
    telemetry: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream of purges; 5 s in, the Cloudflare token and the CloudFront key are revoked for
    30 s. Every purge reaches the Cloudflare ledger and moto, none is dead-lettered; while
    revoked the sinks are blocked in the gauge and in `status`, with one warning each (not
    one per retry), and the secrets appear in no log line."""
    caplog.set_level(logging.INFO)
    run = uuid.uuid4().hex[:8]
    zone = f"zone-{run}"
    stub = cloudflare_api.stub
    test_settings = settings.model_copy(
        update={"group_prefix": f"{settings.group_prefix}-creds-{run}"}
    )
    eu_redis = test_settings.region_redis_urls[EU]
    cloudflare = CloudflareSink(
        EU,
        zone=zone,
        token=SecretStr(cloudflare_api.token),
        public_url=PUBLIC,
        redis=eu_redis,
        policy=POLICY,
        api_url=cloudflare_api.url,
    )
    cloudfront = CloudFrontSink(
        EU,
        distribution=distribution,
        redis=eu_redis,
        policy=POLICY,
        endpoint_url=moto_iam.endpoint,
        aws_access_key_id=SecretStr(moto_iam.purger.access_key_id),
        aws_secret_access_key=SecretStr(moto_iam.purger.secret_access_key),
    )
    for sink in (cloudflare, cloudfront):
        sink.outage.wait_max_s = 4.0  # production waits up to 30 s; the test need not
    sinks = [RedisSink(EU, eu_redis), cloudflare, cloudfront]
    await run_roles_bg([SinkRole(test_settings, s, auto_offset_reset="latest") for s in sinks])

    loop = asyncio.get_running_loop()
    seen_while_revoked: dict[str, Any] = {}

    async def revoke_for_30s() -> None:
        await asyncio.sleep(5.0)
        stub.revoke()
        await moto_iam.revoke()
        await asyncio.sleep(REVOKED_S / 2)
        seen_while_revoked["gauge"] = {
            s: _blocked(metric_reader, s) for s in ("cloudflare", "cloudfront")
        }
        snap = await collect(test_settings, f"http://127.0.0.1:{telemetry.metrics_port}/metrics")
        console = Console(record=True, width=220)
        console.print(render(test_settings, snap, None))
        seen_while_revoked["status"] = console.export_text()
        seen_while_revoked["ledger"] = len(stub.purged("tags", zone))
        await asyncio.sleep(REVOKED_S / 2)
        seen_while_revoked["ledger_at_end"] = len(stub.purged("tags", zone))
        stub.restore()
        await moto_iam.restore()

    fault = asyncio.create_task(revoke_for_30s())
    codec = SingleObjectCodec(settings.catalog)
    producer = make_producer(settings.kafka_bootstrap_servers, client_id=f"creds-{run}")
    await producer.start()
    commands: list[PurgeCommand] = []
    try:
        started = loop.time()
        while loop.time() - started < STREAM_S:
            command = _command(run, len(commands))
            commands.append(command)
            await producer.send_and_wait(
                settings.commands_topic(EU),
                codec.encode("purge", command.to_record()),
                key=command.entity.encode(),
            )
            await asyncio.sleep(1 / RATE_PER_S)
    finally:
        await producer.stop()
        await fault

    wanted_tags = {t for c in commands for t in c.tags}
    wanted_files = {PUBLIC + u for c in commands for u in c.urls}
    wanted_paths = {u for c in commands for u in c.urls}

    async def cloudflare_has_all() -> bool:
        files = stub.purged("files", zone) | {
            "https://" + p + "*" for p in stub.purged("prefixes", zone)
        }
        return wanted_tags <= stub.purged("tags", zone) and all(
            _covered(f, files, "*") for f in wanted_files
        )

    async def moto_paths() -> set[str]:
        async with moto_iam.client("cloudfront", AwsKeys("testing", "testing")) as client:
            listed = await client.list_invalidations(DistributionId=distribution, MaxItems="1000")
            paths: set[str] = set()
            for item in listed["InvalidationList"].get("Items", []):
                got = await client.get_invalidation(DistributionId=distribution, Id=item["Id"])
                paths |= set(got["Invalidation"]["InvalidationBatch"]["Paths"]["Items"])
            return paths

    async def cloudfront_has_all() -> bool:
        paths = await moto_paths()
        return all(_covered(p, paths, "*") for p in wanted_paths)

    await eventually(
        cloudflare_has_all,
        within=60,
        what=f"Cloudflare ledger lacks purges of the {len(commands)} commands",
    )

    async def cloudfront_back() -> bool:
        return not cloudfront.outage.blocked

    # moto checks signatures of GET requests wrongly, so its list is read with its
    # authentication off again, once the sink got an invalidation through with it on.
    await eventually(cloudfront_back, within=30, what="CloudFront never accepted the sink again")
    await moto_iam.open()
    await eventually(
        cloudfront_has_all, within=60, what="moto lacks invalidations of some commands' paths"
    )

    # The fault really happened: both providers refused, and the ledger stood still.
    assert stub.count(403, zone) >= 2
    assert seen_while_revoked["ledger"] == seen_while_revoked["ledger_at_end"]
    assert len(commands) >= 150

    # Nothing of this run went to the dead-letter topic.
    assert await _dead_letters(settings, run) == []

    # While revoked: the gauge and the status view said so; after, they do not.
    assert seen_while_revoked["gauge"] == {"cloudflare": 1, "cloudfront": 1}
    status = seen_while_revoked["status"]
    rows = {
        line.split("│")[2].strip(): line
        for line in status.splitlines()
        if line.startswith("│") and EU in line
    }
    assert "BLOCKED: credentials" in rows["cloudflare"], status
    assert "BLOCKED: credentials" in rows["cloudfront"], status
    assert "BLOCKED" not in rows.get("redis", "")
    assert _blocked(metric_reader, "cloudflare") == 0
    assert _blocked(metric_reader, "cloudfront") == 0

    # One warning per sink for a 30 s outage, not one per retry, and one line at its end.
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    paused = [m for m in messages if "the sink is paused" in m]
    assert len([m for m in paused if m.startswith(f"cloudflare zone {zone}")]) == 1, paused
    assert len([m for m in paused if m.startswith(f"cloudfront {distribution}")]) == 1, paused
    ended = [m for m in messages if "accepted again" in m]
    assert len(ended) == 2, ended
    assert not [m for m in messages if "put back" in m and ("cloudflare" in m or "cloudfront" in m)]
    for secret in (cloudflare_api.token, moto_iam.purger.secret_access_key):
        assert secret not in caplog.text
