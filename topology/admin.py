"""Create or alter the topology's topics on a Kafka cluster, idempotently; delete a prefix's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.admin.new_partitions import NewPartitions

from cachesync.topology.model import TopicSpec, Topology


@dataclass(frozen=True)
class TopicChange:
    topic: str
    action: str  # "created" | "partitions N->M" | "config" | "unchanged"


def desired_topics(
    topology: Topology, prefix: str = "", *, region: str | None = None
) -> dict[str, TopicSpec]:
    """Every topic the topology declares, by its full name; with `region`, those a region's
    own cluster holds: its command topic (mirrored from home) and the audit and
    dead-letter topics its sinks write (mirrored back home)."""
    topics: dict[str, TopicSpec] = {}
    for content in topology.topics.content if region is None else ():
        topics[prefix + content.name] = content
    for name in topology.regions if region is None else (region,):
        topics[topology.commands_topic(name, prefix)] = topology.topics.commands
    topics[prefix + topology.topics.dead_letter.name] = topology.topics.dead_letter
    topics[prefix + topology.topics.audit.name] = topology.topics.audit
    return topics


def _configs(spec: TopicSpec) -> dict[str, str]:
    configs = {"cleanup.policy": "compact" if spec.compacted else "delete"}
    if spec.retention_ms is not None:
        configs["retention.ms"] = str(spec.retention_ms)
    return configs


async def apply_topics(
    cluster: str | Mapping[str, Any],
    topology: Topology,
    prefix: str = "",
    *,
    region: str | None = None,
) -> list[TopicChange]:
    """Create missing topics, grow partition counts, and set retention/compaction.

    `cluster` is a broker list (PLAINTEXT) or a Kafka client's options, address and login
    (`KafkaConnection.client_options()`); `region` narrows the topics to those of a
    region's own cluster (`desired_topics`)."""
    admin = await _admin(cluster)
    try:
        wanted = desired_topics(topology, prefix, region=region)

        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=name,
                num_partitions=spec.partitions,
                replication_factor=1,
                topic_configs=_configs(spec),
            )
            for name, spec in wanted.items()
            if name not in existing
        ]
        changes = [TopicChange(t.name, "created") for t in missing]
        if missing:
            await admin.create_topics(missing)
        present = [name for name in wanted if name in existing]
        if present:
            described = await admin.describe_topics(present)
            grow: dict[str, NewPartitions] = {}
            for info in described:
                name = info["topic"]
                have = len(info["partitions"])
                want = wanted[name].partitions
                if want > have:
                    grow[name] = NewPartitions(total_count=want)
                    changes.append(TopicChange(name, f"partitions {have}->{want}"))
                else:
                    changes.append(TopicChange(name, "unchanged"))
            if grow:
                await admin.create_partitions(grow)
            await admin.alter_configs(
                [
                    ConfigResource(ConfigResourceType.TOPIC, name, configs=_configs(wanted[name]))
                    for name in present
                ]
            )
        return changes
    finally:
        await admin.close()


async def delete_topics(cluster: str | Mapping[str, Any], prefix: str) -> list[str]:
    """Delete every topic whose name starts with `prefix` (non-empty: a run's or a test's
    own topics, never a whole cluster's); the names deleted. `cluster` as for `apply_topics`."""
    if not prefix:
        raise ValueError("delete_topics needs a prefix")
    admin = await _admin(cluster)
    try:
        names = [n for n in await admin.list_topics() if n.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
        return names
    finally:
        await admin.close()


async def _admin(cluster: str | Mapping[str, Any]) -> AIOKafkaAdminClient:
    options = {"bootstrap_servers": cluster} if isinstance(cluster, str) else dict(cluster)
    admin = AIOKafkaAdminClient(**options, client_id="cachesync-admin")
    await admin.start()
    return admin
