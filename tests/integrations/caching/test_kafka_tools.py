"""Kafka's own command-line tools come with the stack's broker jars (kafka-tools in
deploy/kafka/pom.xml): README's one-liner describes a group's lag."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import TopicPartition
from aiokafka.admin import NewTopic

from cachesync.consumers.pipeline.kafka import make_admin, make_consumer, make_producer
from cachesync.consumers.settings import Settings
from tests.integrations.caching.stack_extras import stack_dir


async def test_consumer_group_command_describes_a_groups_lag(settings: Settings) -> None:
    """Five records, a group committed at 2: ConsumerGroupCommand reports 2, 5 and lag 3."""
    topic, group = settings.topic(f"tools-{uuid.uuid4().hex[:6]}"), settings.group_id("tools")
    admin = make_admin(settings.kafka_bootstrap_servers, client_id="test-tools")
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = make_producer(settings.kafka_bootstrap_servers, client_id="test-tools")
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, f"r{i}".encode(), partition=0)
    finally:
        await producer.stop()
    consumer = make_consumer(settings.kafka_bootstrap_servers, group_id=group, client_id="t")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.commit({TopicPartition(topic, 0): 2})
    finally:
        await consumer.stop()

    tool = await asyncio.create_subprocess_exec(
        "java",
        "-cp",
        str(stack_dir() / "kafka/lib/*"),
        "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
        "--bootstrap-server",
        settings.kafka_bootstrap_servers,
        "--describe",
        "--group",
        group,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(tool.communicate(), 60)
    assert tool.returncode == 0, err.decode()
    rows = [line.split() for line in out.decode().splitlines() if line.startswith(group)]
    assert [r[1:6] for r in rows] == [[topic, "0", "2", "5", "3"]], out.decode()
