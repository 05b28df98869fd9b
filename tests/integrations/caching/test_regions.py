"""Multi-region coordination: per-key order, a region that is down catches up, replay after FLUSHALL."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from cachesync.consumers import keys
from cachesync.consumers.commands import Command
from cachesync.consumers.ops.platform_cache import cache_put
from cachesync.consumers.ops.publish import EventPublisher, new_event
from cachesync.consumers.ops.replay import replay
from cachesync.consumers.pipeline.roles import MapperRole, SinkRole
from cachesync.consumers.settings import Settings
from cachesync.consumers.sinks.redis import RedisSink
from deploy.local.standins.serve import free_port
from tests.helpers import eventually


class RegionRedis:
    """A region's own redis-server process that a test may stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--dbfilename",
                "dump.rdb",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True
            ).stdout.strip()
            != b"PONG"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def region_server(tmp_path: Path) -> Iterator[RegionRedis]:
    server = RegionRedis(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


class OrderRecorder(RedisSink):
    """Remembers the order in which it applied each entity's commands."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.seen: dict[str, list[int]] = {}

    def add(self, command: Command) -> None:
        self.seen.setdefault(command.entity, []).append(command.version)
        super().add(command)


async def test_commands_for_one_key_apply_in_order(
    settings: Settings, topics: list[str], run_roles_bg
) -> None:
    """Forty updates to each of five weddings, interleaved: each wedding's purges arrive in version order."""
    run = uuid.uuid4().hex[:6]
    weddings = [f"w-{run}-{i}" for i in range(5)]
    recorder = OrderRecorder("us-east", settings.region_redis_urls["us-east"])
    group = settings.model_copy(update={"group_prefix": f"{settings.group_prefix}-order-{run}"})
    await run_roles_bg(
        [MapperRole(settings), SinkRole(group, recorder, auto_offset_reset="latest")]
    )
    pub = EventPublisher(settings)
    await pub.start()
    t0 = int(time.time() * 1000)
    try:
        for i in range(40):
            for w in weddings:
                await pub.publish(
                    "guest_portal.updated",
                    new_event(
                        "guest_portal.updated",
                        wedding_id=w,
                        portal_id=f"p-{w}",
                        pages=["rsvp"],
                        occurred_at=t0 + i,
                    ),
                    wait=False,
                )
        await pub.flush()
    finally:
        await pub.stop()

    async def all_seen() -> bool:
        return all(len(recorder.seen.get(f"wedding:{w}", [])) >= 40 for w in weddings)

    await eventually(all_seen, what="every purge applied")
    for w in weddings:
        versions = recorder.seen[f"wedding:{w}"]
        assert versions == sorted(versions), f"{w}: applied out of order"
        assert versions[:40] == [t0 + i for i in range(40)]


async def test_region_down_catches_up_without_slowing_the_others(
    settings: Settings,
    topics: list[str],
    region_redis: dict[str, Redis],
    run_roles_bg,
    region_server: RegionRedis,
) -> None:
    """eu-west's Redis dies; us-east and ap-southeast keep purging; eu-west catches up when it returns."""
    run = uuid.uuid4().hex[:6]
    weddings = [f"w-{run}-{i}" for i in range(30)]
    eu = Redis.from_url(region_server.url)
    for w in weddings:
        await cache_put(eu, f"wedding:{w}", b"stale", written_at_ms=1)
        for region in ("us-east", "ap-southeast"):
            await cache_put(region_redis[region], f"wedding:{w}", b"stale", written_at_ms=1)
    await eu.save()  # what the restarted server will load: the stale copies
    await eu.aclose()
    eu_settings = settings.model_copy(
        update={"group_prefix": f"{settings.group_prefix}-down-{run}"}
    )
    roles = [
        MapperRole(settings),
        SinkRole(settings, RedisSink("us-east", settings.region_redis_urls["us-east"])),
        SinkRole(settings, RedisSink("ap-southeast", settings.region_redis_urls["ap-southeast"])),
        SinkRole(eu_settings, RedisSink("eu-west", region_server.url), auto_offset_reset="latest"),
    ]
    await run_roles_bg(roles)
    region_server.kill()
    pub = EventPublisher(settings)
    await pub.start()
    try:
        for w in weddings:
            await pub.publish(
                "wedding.updated",
                new_event(
                    "wedding.updated",
                    wedding_id=w,
                    destination_country="FR",
                    guest_countries=["FR"],
                    changed_fields=["venue"],
                ),
                wait=False,
            )
        await pub.flush()
    finally:
        await pub.stop()

    async def others_done() -> bool:
        for region in ("us-east", "ap-southeast"):
            if await region_redis[region].exists(*[f"wedding:{w}" for w in weddings]):
                return False
        return True

    # The healthy regions finish while eu-west's sink is still failing: nothing waits on it.
    await eventually(others_done, what="healthy regions purged while eu-west is down")
    eu_role = roles[3]
    assert eu_role.stats.applied == 0, (
        "eu-west cannot have applied anything while its Redis is down"
    )

    region_server.start()  # comes back with the stale copies from its dump
    eu = Redis.from_url(region_server.url)
    try:
        assert await eu.exists(f"wedding:{weddings[0]}") == 1

        async def caught_up() -> bool:
            return await eu.exists(*[f"wedding:{w}" for w in weddings]) == 0

        await eventually(caught_up, within=60, what="eu-west caught up after its Redis returned")
        versions = [await eu.get(keys.purge_version("redis", f"wedding:{w}")) for w in weddings]
        assert all(v is not None for v in versions), "the purge versions (fences) were not recorded"
    finally:
        await eu.aclose()


async def test_replay_after_flushall_restores_the_region(
    settings: Settings, topics: list[str], run_roles_bg, region_server: RegionRedis
) -> None:
    """FLUSHALL loses the region's fences; an old backup brings stale copies back; a replay of that region fixes both."""
    run = uuid.uuid4().hex[:6]
    weddings = [f"w-{run}-{i}" for i in range(10)]
    region = Redis.from_url(region_server.url)
    region_settings = settings.model_copy(
        update={"group_prefix": f"{settings.group_prefix}-flush-{run}"}
    )
    sink = SinkRole(
        region_settings, RedisSink("ap-southeast", region_server.url), auto_offset_reset="latest"
    )
    await run_roles_bg([MapperRole(settings), sink])
    since = int(time.time() * 1000) - 1
    pub = EventPublisher(settings)
    await pub.start()
    try:
        for w in weddings:
            await pub.publish(
                "wedding.published",
                new_event(
                    "wedding.published",
                    wedding_id=w,
                    slug=w,
                    destination_country="TH",
                    guest_countries=["AU"],
                ),
                wait=False,
            )
        await pub.flush()
    finally:
        await pub.stop()
    fence_keys = [keys.purge_version("redis", f"wedding:{w}") for w in weddings]

    async def fenced() -> bool:
        return all(v is not None for v in await region.mget(fence_keys))

    try:
        await eventually(fenced, what="purges applied and fenced")
        expected = await region.mget(fence_keys)
        await region.flushall()
        for w in weddings:  # a restore from an old backup
            await cache_put(region, f"wedding:{w}:details", b"stale", written_at_ms=1)
        report = await replay(settings, since_ms=since, regions={"ap-southeast"})
        assert report.commands[("ap-southeast", "purge")] >= len(weddings)

        async def restored() -> bool:
            return await region.exists(*[f"wedding:{w}:details" for w in weddings]) == 0 and all(
                v is not None for v in await region.mget(fence_keys)
            )

        await eventually(restored, what="replay restored the region")
        assert await region.mget(fence_keys) == expected, (
            "fence versions differ from the original run's"
        )
    finally:
        await region.aclose()
