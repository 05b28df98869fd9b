"""Kafka behind TLS and SASL: the mapper and a sink through SASL_SSL, every SASL mechanism,
client certificates, and a wrong password that stops the start in one line.

The broker is the local stack's "secure" extra (deploy/local/up.d/secure.sh): a node of
its own with only a SASL_SSL listener and an SSL one that requires a client certificate,
its certificates made by the script's own CA, its SCRAM users created when its storage
was formatted. Nothing on it speaks PLAINTEXT, so every client that works here logged in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from pydantic import SecretStr
from redis.asyncio import Redis

from cachesync.consumers.errors import ConfigError
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.assemble import prepare_clusters
from cachesync.consumers.pipeline.kafka import (
    KafkaConnection,
    check_login,
    make_admin,
    make_consumer,
    make_producer,
)
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings, load_settings
from cachesync.consumers.sinks.redis import RedisSink
from tests.helpers import eventually
from tests.integrations.caching.stack_extras import read_env, stack_dir, start_extra

SECURITY_VARIABLES = [
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
    "KAFKA_SSL_CERTFILE",
    "KAFKA_SSL_KEYFILE",
]


@pytest.fixture(scope="module")
def secure_broker() -> dict[str, dict[str, str]]:
    """The client settings of the secure broker's two listeners, as the script wrote them."""
    start_extra("secure")
    folder = stack_dir() / "kafka-secure"
    return {name: read_env(folder / f"{name}.env") for name in ("sasl_ssl", "mtls")}


def settings_for(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], **overrides: str
) -> Settings:
    """This test's settings on the secure broker: its variables, a topic prefix of its own."""
    for name in SECURITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**env, **overrides}.items():
        monkeypatch.setenv(name, value)
    run = uuid.uuid4().hex[:8]
    return load_settings(topic_prefix=f"secure-{run}.", group_prefix=f"secure-{run}")


@pytest.fixture
def sasl_ssl(
    settings: Settings, secure_broker: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings through the SASL_SSL listener (SCRAM-SHA-512); `settings` has put the
    session's Redis addresses in the environment."""
    yield settings_for(monkeypatch, secure_broker["sasl_ssl"])


async def test_mapper_and_redis_sink_work_through_sasl_ssl(
    sasl_ssl: Settings, region_redis: dict[str, Redis], run_roles_bg
) -> None:
    """An event published over SASL_SSL is mapped and purged from eu-west's Redis by a sink
    that reads its commands over SASL_SSL."""
    assert sasl_ssl.kafka_security_protocol == "SASL_SSL"
    await prepare_clusters(sasl_ssl)
    wedding, photo = f"w-{uuid.uuid4().hex[:8]}", f"ph-{uuid.uuid4().hex[:8]}"
    eu = region_redis["eu-west"]
    await cache_put(eu, f"photo:{photo}", b"stale")
    sink = RedisSink("eu-west", sasl_ssl.region_redis_urls["eu-west"])
    await run_roles_bg([MapperRole(sasl_ssl), SinkRole(sasl_ssl, sink)])
    publisher = EventPublisher(sasl_ssl)
    await publisher.start()
    try:
        await publisher.publish(
            "photo.updated",
            new_event(
                "photo.updated",
                wedding_id=wedding,
                photo_id=photo,
                path=f"/weddings/{wedding}/photos/{photo}.jpg",
                changed_fields=["caption"],
            ),
        )
    finally:
        await publisher.stop()

    async def purged() -> bool:
        return await eu.exists(f"photo:{photo}") == 0

    await eventually(purged, within=30, what="eu-west's Redis purged through SASL_SSL")


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_every_sasl_mechanism_logs_in(
    secure_broker: dict[str, dict[str, str]], mechanism: str
) -> None:
    """PLAIN and both SCRAM users (created at format time) log in; an admin call answers."""
    env = secure_broker["sasl_ssl"]
    kafka = KafkaConnection(
        env["KAFKA_BOOTSTRAP_SERVERS"],
        "SASL_SSL",
        mechanism,
        env["KAFKA_SASL_USERNAME"],
        SecretStr(env["KAFKA_SASL_PASSWORD"]),
        Path(env["KAFKA_SSL_CAFILE"]),
    )
    await check_login(kafka)
    admin = make_admin(kafka, client_id=f"test-{mechanism}")
    await admin.start()
    try:
        assert isinstance(await admin.list_topics(), list)
    finally:
        await admin.close()
    wrong = KafkaConnection(**{**vars(kafka), "sasl_password": SecretStr("not-the-password")})
    with pytest.raises(ConfigError, match=f"refused the login \\({mechanism} as 'cachesync'\\)"):
        await check_login(wrong)


async def test_client_certificate_over_ssl(
    settings: Settings, secure_broker: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the listener that requires a client certificate: a record goes through with one;
    without it the login check names KAFKA_SSL_CERTFILE."""
    mtls = settings_for(monkeypatch, secure_broker["mtls"])
    assert mtls.kafka_ssl_certfile is not None
    kafka = KafkaConnection.of(mtls)
    await prepare_clusters(mtls)
    topic = mtls.audit_topic
    producer = make_producer(kafka, client_id="test-mtls")
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, b"over mutual TLS", key=b"k")
    finally:
        await producer.stop()
    consumer = make_consumer(kafka, group_id=None, client_id="test-mtls")
    await consumer.start()
    try:
        tp = TopicPartition(topic, sent.partition)
        consumer.assign([tp])
        consumer.seek(tp, sent.offset)
        got = await consumer.getone()
        assert got.value == b"over mutual TLS"
    finally:
        await consumer.stop()

    anonymous = KafkaConnection(**{**vars(kafka), "ssl_certfile": None, "ssl_keyfile": None})
    with pytest.raises(ConfigError, match="KAFKA_SSL_CERTFILE"):
        await check_login(anonymous)


def test_wrong_password_stops_the_start_in_one_line(
    settings: Settings, secure_broker: dict[str, dict[str, str]]
) -> None:
    """`cachesync run mapper` with a wrong SASL password exits 2 with one line that names the
    variables and the broker's reason, and shows no password."""
    env = {k: v for k, v in os.environ.items() if k not in SECURITY_VARIABLES}
    env.update(secure_broker["sasl_ssl"])
    env.update(
        KAFKA_SASL_PASSWORD="wrong-password-for-test",
        CACHESYNC_METRICS_PORT="0",
        CACHESYNC_TOPIC_PREFIX=f"secure-{uuid.uuid4().hex[:8]}.",
        COLUMNS="300",
    )
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "cachesync"), "run", "mapper"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1, lines
    assert "KAFKA_SASL_PASSWORD" in lines[0]
    assert "refused the login (SCRAM-SHA-512 as 'cachesync')" in lines[0]
    assert "wrong-password-for-test" not in lines[0]
    assert secure_broker["sasl_ssl"]["KAFKA_SASL_PASSWORD"] not in lines[0]
