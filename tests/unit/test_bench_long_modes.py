"""The checks of the scale-out and long bench modes can fail: an order broken, a purge never
applied, a fence left behind, a fan-out's cache entries (no services: a stand-in Redis)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.common import World
from bench.consistency_at_scale import Visits, nines
from bench.scale_out import Issued, check_region, order_holds
from cachesync.consumers import keys
from cachesync.consumers.commands import PurgeCommand
from cachesync.topology import DEFAULT_TOPOLOGY, load_topology


class _Redis:
    """MGET over a dict: all the order check reads."""

    def __init__(self, values: dict[str, int]) -> None:
        self.values = values

    async def mget(self, names: list[str]) -> list[bytes | None]:
        return [str(self.values[n]).encode() if n in self.values else None for n in names]


def _purge(n: int, version: int, entity: str = "wedding:w1") -> PurgeCommand:
    return PurgeCommand(
        command_id=f"c{n}",
        origin_event_id=f"e{n}",
        origin_event_type="photo.uploaded",
        origin_occurred_at=version,
        region="eu-west",
        entity=entity,
        version=version,
        issued_at=version,
        scope="wedding",
        keys=("wedding:w1:gallery",),
    )


def _issued(applied_at: dict[int, int | None], origin: dict[int, int] | None = None) -> Any:
    """Three purges of one entity at offsets 10, 11, 12 (events at content offsets 0, 1, 2
    unless `origin` says otherwise), applied at the given times (None: never)."""
    seq = [
        Issued(_purge(n, 1000 + n), 10 + n, ("content.photos", 0, (origin or {}).get(n, n)))
        for n in range(3)
    ]
    values = {keys.applied("redis", f"c{n}"): at for n, at in applied_at.items() if at is not None}
    values[keys.purge_version("redis", "wedding:w1")] = 1002
    return _Redis(values), {"wedding:w1": seq}


async def test_in_order_passes() -> None:
    redis, by_entity = _issued({0: 100, 1: 100, 2: 105})
    result = await check_region(redis, by_entity, copies=0)  # type: ignore[arg-type]
    assert order_holds({"eu-west": result}), result


async def test_a_purge_applied_after_a_later_one_is_caught() -> None:
    redis, by_entity = _issued({0: 100, 1: 120, 2: 110})
    result = await check_region(redis, by_entity, copies=0)  # type: ignore[arg-type]
    assert result["applied_out_of_order"] == 1
    assert not order_holds({"eu-west": result})


async def test_a_purge_issued_before_an_earlier_event_is_caught() -> None:
    redis, by_entity = _issued({0: 100, 1: 100, 2: 100}, origin={0: 0, 1: 2, 2: 1})
    result = await check_region(redis, by_entity, copies=0)  # type: ignore[arg-type]
    assert result["mapper_out_of_order"] == 1


async def test_a_purge_never_applied_and_a_stale_fence_are_caught() -> None:
    redis, by_entity = _issued({0: 100, 1: 110, 2: None})
    redis.values[keys.purge_version("redis", "wedding:w1")] = 1001
    result = await check_region(redis, by_entity, copies=0)  # type: ignore[arg-type]
    assert result["unapplied"] == 1
    assert result["fence_wrong"] == 1


def test_visits_cache_what_the_rule_purges_for_every_wedding_of_a_vendor() -> None:
    world = World("t", weddings=5)
    topology = load_topology(DEFAULT_TOPOLOGY)
    wedding = world.demo.weddings[0]
    vendor = sorted(wedding.vendors)[0]
    served = [w.wedding_id for w in world.demo.weddings if vendor in w.vendors]
    raw = {"vendor_id": vendor, "category": "x", "changed_fields": ["bio"]}
    record = {k: v.replace("v-", "vt-") if isinstance(v, str) else v for k, v in raw.items()}
    entries = Visits(topology, world, {}).entries("vendor.updated", raw, record)
    for w in served:
        assert f"wedding:{w.replace('w-', 'wt-')}:vendors" in entries
    assert f"vendor:{record['vendor_id']}" in entries
    assert entries[f"bench:tagged:vendor:{record['vendor_id']}"] == [
        f"vendor:{record['vendor_id']}"
    ]


@pytest.mark.parametrize(
    ("probed", "converged", "expected"),
    [(1_000_000, 999_999, 6.0), (1000, 990, 2.0), (1000, 1000, 3.0), (0, 0, 0.0)],
)
def test_nines(probed: int, converged: int, expected: float) -> None:
    assert math.isclose(nines(probed, converged), expected, abs_tol=1e-6)
