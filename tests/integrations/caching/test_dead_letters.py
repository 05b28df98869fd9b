"""Bad input of every kind goes to the dead-letter topic with its reason; nothing valid around it is lost."""

from __future__ import annotations

import uuid
from pathlib import Path

import yaml
from aiokafka import AIOKafkaConsumer
from redis.asyncio import Redis

from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from cachesync.topology import DEFAULT_TOPOLOGY, load_topology
from tests.conftest import metric_points
from tests.helpers import eventually


def _photo(wedding: str, **extra: object) -> dict[str, object]:
    photo = f"ph-{uuid.uuid4().hex[:6]}"
    return new_event(
        "photo.uploaded",
        wedding_id=wedding,
        photo_id=photo,
        album_id=None,
        path=f"/weddings/{wedding}/photos/{photo}.jpg",
        content_type="image/jpeg",
        size_bytes=1,
        **extra,
    )


async def test_each_kind_of_bad_input_is_dead_lettered(
    settings: Settings,
    topics: list[str],
    region_redis: dict[str, Redis],
    run_roles_bg,
    metric_reader,
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:8]
    tag = [("test-run", run.encode())]
    weddings = [f"w-{run}-{i}" for i in range(6)]
    for redis in region_redis.values():
        for w in weddings:
            await cache_put(redis, f"wedding:{w}:gallery", b"stale")

    small = settings.model_copy(update={"max_event_bytes": 4096})
    mapper = MapperRole(small)
    # A deployment whose rule names a field the event lacks (loaded unchecked, as a stale
    # topology file would be): the event is dead-lettered as rule_error, not a crash.
    data = yaml.safe_load(DEFAULT_TOPOLOGY.read_text())
    data["rules"]["photo.deleted"]["purge"]["keys"] = ["photo:{photographer_id}"]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    mapper.mapper.topology = load_topology(tmp_path / "t.yaml")
    mapper.mapper.regions = list(mapper.mapper.topology.regions)
    sinks = [SinkRole(settings, RedisSink(r, u)) for r, u in settings.region_redis_urls.items()]
    await run_roles_bg([mapper, *sinks])

    pub = EventPublisher(settings)
    await pub.start()
    topic = pub.topic_for("photo.uploaded")
    good_codec = pub.codec
    originals: dict[str, bytes] = {}
    try:
        await pub.publish("photo.uploaded", _photo(weddings[0]), headers=tag)
        originals["undecodable"] = b'{"photo": "as json"}'
        await (await pub.producer.send(topic, originals["undecodable"], key=b"k", headers=tag))
        await pub.publish("photo.uploaded", _photo(weddings[1]), headers=tag)
        valid = good_codec.encode("photo.uploaded", _photo(weddings[1]))
        originals["unknown_schema"] = valid[:2] + b"\xde\xad\xbe\xef\x00\x00\x00\x00" + valid[10:]
        await (await pub.producer.send(topic, originals["unknown_schema"], key=b"k", headers=tag))
        await pub.publish("photo.uploaded", _photo(weddings[2]), headers=tag)
        originals["invalid_record"] = good_codec.encode("photo.uploaded", _photo(""))
        await (await pub.producer.send(topic, originals["invalid_record"], key=b"k", headers=tag))
        originals["oversized"] = good_codec.encode(
            "photo.uploaded", _photo(weddings[3], taken_at=None) | {"path": "/" + "x" * 5000}
        )
        await (await pub.producer.send(topic, originals["oversized"], key=b"k", headers=tag))
        await pub.publish("photo.uploaded", _photo(weddings[3]), headers=tag)
        deleted = new_event(
            "photo.deleted", wedding_id=weddings[4], photo_id="p", album_id=None, path="/p.jpg"
        )
        originals["rule_error"] = good_codec.encode("photo.deleted", deleted)
        await (
            await pub.producer.send(
                topic, originals["rule_error"], key=weddings[4].encode(), headers=tag
            )
        )
        await pub.publish("photo.uploaded", _photo(weddings[5]), headers=tag)
    finally:
        await pub.stop()

    survivors = [w for i, w in enumerate(weddings) if i != 4]

    async def valid_ones_applied() -> bool:
        for redis in region_redis.values():
            if await redis.exists(*[f"wedding:{w}:gallery" for w in survivors]):
                return False
        return True

    await eventually(
        valid_ones_applied, what="valid events around the bad ones were not all applied"
    )

    dlq = AIOKafkaConsumer(
        settings.dead_letter_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await dlq.start()
    found: dict[str, tuple[bytes, dict[str, bytes]]] = {}
    try:

        async def collect() -> bool:
            batch = await dlq.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    headers = dict(r.headers)
                    if headers.get("test-run") == run.encode():
                        found[headers["dlq.reason"].decode()] = (r.value, headers)
            return len(found) >= 5

        await eventually(collect, what=f"dead letters, got {sorted(found)}")
    finally:
        await dlq.stop()

    assert set(found) == set(originals)
    for reason, (value, headers) in found.items():
        assert value == originals[reason], f"{reason}: original bytes not kept"
        assert headers["dlq.topic"] == topic.encode()
        assert headers["dlq.consumer"] == b"mapper"
        assert headers["dlq.error"], reason
    assert b"wedding_id" in found["invalid_record"][1]["dlq.error"]
    assert b"photographer_id" in found["rule_error"][1]["dlq.error"]
    counted = {
        p.attributes["reason"]: p.value
        for p in metric_points(metric_reader, "cachesync.dead_lettered")
    }
    assert all(counted.get(reason, 0) >= 1 for reason in originals), counted
