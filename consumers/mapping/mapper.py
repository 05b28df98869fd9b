"""Where an event becomes commands: topology rules applied to one decoded event.

For each event the mapper (1) updates the relationship index when the rule says so,
(2) renders the rule's templates into keys, tags, URLs and prefixes, fanning out
to every wedding a vendor serves, and (3) emits one purge per region (purges go
everywhere: any region may hold a copy) and one warm per wedding region (warms go
only where that wedding's guests are).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cachesync.consumers import telemetry
from cachesync.consumers.commands import Command, PurgeCommand, WarmCommand, command_id, to_millis
from cachesync.consumers.errors import RuleError
from cachesync.consumers.mapping.index import IndexView, RelationshipIndex
from cachesync.topology import MissingField, PurgeTemplate, Rule, Topology, render, render_all

# How much a purge command may name, in bytes of its keys, tags, URLs and prefixes.
# A purge names everything its event reaches: a vendor serving 50,000 weddings is two
# items per wedding, some 2.5 MiB, and Kafka refuses a message over the topic's
# max.message.bytes (1 MiB by default). Such a purge is split into parts that each stay
# within this budget, well under any sane topic limit (and the producer's 256 KiB batch).
#
# Split rather than escalate: the Redis sink deletes exact keys, and there is no coarser
# key that covers `wedding:{w}:vendors` for 50,000 weddings; a tag covers only what the
# platform tagged with it, so escalating to `vendor:{v}` could leave pages cached. The
# CDN sinks already escalate URLs to prefixes or wildcards to fit their providers'
# limits (sinks/budget.py), from the exact items, whatever the number of parts.
MAX_PURGE_BYTES = 256 * 1024


class Mapper:
    def __init__(
        self,
        topology: Topology,
        index: RelationshipIndex,
        *,
        clock: Callable[[], float] = time.time,
        max_purge_bytes: int = MAX_PURGE_BYTES,
    ) -> None:
        self.topology = topology
        self.index = index
        self.clock = clock
        self.regions = list(topology.regions)
        self.max_purge_bytes = max_purge_bytes

    def rule_for(self, event_type: str) -> Rule | None:
        return self.topology.rules.get(event_type)

    async def map_event(
        self,
        event_type: str,
        record: Mapping[str, Any],
        *,
        replay: bool = False,
        replay_id: str = "",
        index: IndexView | None = None,
    ) -> list[Command]:
        """The commands one event yields; raises RuleError if a template cannot render.

        A replay passes its `replay_id`, which goes into the command ids: a replayed
        command is new work for the sinks, not a duplicate of the original. A batch
        passes its `index` view (`RelationshipIndex.batch()`), read and written once
        per batch; without one, each read and write goes to Redis.
        """
        index = index or self.index
        rule = self.rule_for(event_type)
        if rule is None:
            if event_type not in self.topology.ignored_events:
                telemetry.events_unhandled.add(1, {"event_type": event_type})
            return []
        fields = dict(record)
        fields["occurred_at"] = to_millis(fields["occurred_at"])
        try:
            entity = _one(rule.entity, fields)
            targets = _Targets.render(rule.purge, fields)
        except MissingField as exc:
            raise RuleError(f"rules.{event_type}: {exc}") from None
        # Fan-out reads the index before this event changes it (a deleted vendor must
        # still reach its weddings); warms read regions after (a wedding.updated must
        # warm the regions it just declared).
        weddings = await self._fan_out(rule, fields, index)
        await self._update_index(rule, fields, index)
        targets = _per_wedding(event_type, rule, fields, weddings, targets)
        origin = _Origin(
            event_id=str(fields["event_id"]),
            event_type=event_type,
            occurred_at=fields["occurred_at"],
            issued_at=int(self.clock() * 1000),
            replay=replay,
            replay_id=replay_id,
        )
        purges = self._purges(rule, entity, targets, origin)
        warms = await self._warms(rule, fields, weddings, origin, index)
        return [*purges, *warms]

    async def _fan_out(self, rule: Rule, fields: Mapping[str, Any], index: IndexView) -> list[str]:
        """The weddings an event reaches: every wedding of its vendor, or its own (to warm)."""
        if rule.fanout == "vendor_weddings":
            return await index.weddings_of(str(fields["vendor_id"]))
        if rule.warm is not None and fields.get("wedding_id"):
            return [str(fields["wedding_id"])]
        return []

    def _purges(
        self, rule: Rule, entity: str, targets: _Targets, origin: _Origin
    ) -> list[PurgeCommand]:
        """One purge per region (any region may hold a copy), if there is anything to purge;
        several per region, in parts of at most `max_purge_bytes`, if it names that much.

        Parts share the event's entity (so they stay in order on one partition) and its
        version; part 0 keeps the id an unsplit purge has, part n gets its own id derived
        from the event, the region and n, so a retried or replayed event splits the same
        way into the same ids.
        """
        if not targets:
            return []
        common = origin.command_fields()
        parts = targets.parts(self.max_purge_bytes)
        return [
            PurgeCommand(
                command_id=command_id(
                    origin.event_id,
                    region,
                    "purge",
                    origin.replay_id if n == 0 else f"{origin.replay_id}#part{n}",
                ),
                region=region,
                entity=entity,
                scope=rule.scope,
                keys=tuple(part.keys),
                tags=tuple(part.tags),
                urls=tuple(part.urls),
                prefixes=tuple(part.prefixes),
                parts_after=len(parts) - 1 - n,
                **common,
            )
            for region in self.regions
            for n, part in enumerate(parts)
        ]

    async def _warms(
        self,
        rule: Rule,
        fields: Mapping[str, Any],
        weddings: list[str],
        origin: _Origin,
        index: IndexView,
    ) -> list[WarmCommand]:
        """One warm per wedding and region its guests are in, for weddings with URLs to warm."""
        warm = rule.warm
        if warm is None or not weddings:
            return []
        regions_of = await index.regions_of(weddings)
        common = origin.command_fields()
        commands: list[WarmCommand] = []
        for wedding in weddings:
            try:
                wf = {**fields, "wedding_id": wedding}
                photos = render_all(warm.photos, wf)
                vendor_assets = render_all(warm.vendor_assets, wf)
                portal = render_all(warm.guest_portal, wf)
            except MissingField as exc:
                raise RuleError(f"rules.{origin.event_type}.warm: {exc}") from None
            if not (photos or vendor_assets or portal):
                continue
            part = f"{wedding}|{origin.replay_id}"
            commands += [
                WarmCommand(
                    command_id=command_id(origin.event_id, region, "warm", part),
                    region=region,
                    entity=f"wedding:{wedding}",
                    wedding_id=wedding,
                    photo_urls=tuple(photos),
                    vendor_asset_urls=tuple(vendor_assets),
                    guest_portal_urls=tuple(portal),
                    priority=warm.priority,
                    deadline=origin.occurred_at + warm.deadline_s * 1000,
                    **common,
                )
                for region in regions_of[wedding]
            ]
        return commands

    async def update_index(self, event_type: str, record: Mapping[str, Any]) -> None:
        """Only the relationship-index part of an event (an index rebuild)."""
        rule = self.rule_for(event_type)
        if rule is not None and rule.index is not None:
            await self._update_index(rule, dict(record))

    def index_ids(
        self, events: Iterable[tuple[str, Mapping[str, Any]]]
    ) -> tuple[set[str], set[str]]:
        """The vendor and wedding ids these events name: what a batch index prefetches."""
        vendors: set[str] = set()
        weddings: set[str] = set()
        for event_type, record in events:
            if self.rule_for(event_type) is None:
                continue
            if record.get("vendor_id"):
                vendors.add(str(record["vendor_id"]))
            if record.get("wedding_id"):
                weddings.add(str(record["wedding_id"]))
        return vendors, weddings

    async def _update_index(
        self, rule: Rule, fields: dict[str, Any], index: IndexView | None = None
    ) -> None:
        index = index or self.index
        if rule.index == "link_vendor":
            await index.link_vendor(str(fields["vendor_id"]), str(fields["wedding_id"]))
        elif rule.index == "unlink_vendor":
            await index.unlink_vendor(str(fields["vendor_id"]), str(fields["wedding_id"]))
        elif rule.index == "forget_vendor":
            await index.forget_vendor(str(fields["vendor_id"]))
        elif rule.index == "wedding_regions":
            countries = [str(fields["destination_country"]), *fields.get("guest_countries", [])]
            await index.set_wedding_regions(str(fields["wedding_id"]), countries)


def _one(template: str, fields: Mapping[str, Any]) -> str:
    values = render(template, fields)
    if len(values) != 1:
        raise MissingField(template, "(entity must render to exactly one value)")
    return values[0]


@dataclass(slots=True)
class _Targets:
    """What a purge names: its rendered keys, tags, URLs and prefixes."""

    keys: list[str]
    tags: list[str]
    urls: list[str]
    prefixes: list[str]

    @classmethod
    def render(cls, t: PurgeTemplate, fields: Mapping[str, Any]) -> _Targets:
        return cls(
            render_all(t.keys, fields),
            render_all(t.tags, fields),
            render_all(t.urls, fields),
            render_all(t.prefixes, fields),
        )

    def __bool__(self) -> bool:
        return bool(self.keys or self.tags or self.urls or self.prefixes)

    def parts(self, max_bytes: int) -> list[_Targets]:
        """These targets in order, cut into parts naming at most `max_bytes` each (an item
        costs its UTF-8 length plus its Avro length prefix); an item larger than that
        alone makes a part. Deterministic: the same targets always cut the same way."""
        # Nearly every purge fits: 4 bytes per character bounds its UTF-8 length.
        items = (*self.keys, *self.tags, *self.urls, *self.prefixes)
        if 4 * sum(map(len, items)) + 3 * len(items) <= max_bytes:
            return [self]
        parts = [_Targets([], [], [], [])]
        size = 0
        for name in ("keys", "tags", "urls", "prefixes"):
            for item in getattr(self, name):
                cost = len(item.encode()) + 3
                if size + cost > max_bytes and parts[-1]:
                    parts.append(_Targets([], [], [], []))
                    size = 0
                getattr(parts[-1], name).append(item)
                size += cost
        return parts


def _per_wedding(
    event_type: str,
    rule: Rule,
    fields: Mapping[str, Any],
    weddings: list[str],
    targets: _Targets,
) -> _Targets:
    """The event's purge targets plus the rule's per-wedding ones for each wedding it reaches,
    each item once, in the order first named (dicts: a vendor may serve 50,000 weddings)."""
    if rule.per_wedding is None:
        return targets
    merged: dict[str, dict[str, None]] = {
        name: dict.fromkeys(getattr(targets, name)) for name in ("keys", "tags", "urls", "prefixes")
    }
    for wedding in weddings:
        try:
            more = _Targets.render(rule.per_wedding, {**fields, "wedding_id": wedding})
        except MissingField as exc:
            raise RuleError(f"rules.{event_type}.per_wedding: {exc}") from None
        for name, items in merged.items():
            items.update(dict.fromkeys(getattr(more, name)))
    return _Targets(*(list(items) for items in merged.values()))


@dataclass(slots=True)
class _Origin:
    """What every command of one event carries: where it came from, its version, replay marks."""

    event_id: str
    event_type: str
    occurred_at: int
    issued_at: int
    replay: bool
    replay_id: str

    def command_fields(self) -> dict[str, Any]:
        return {
            "origin_event_id": self.event_id,
            "origin_event_type": self.event_type,
            "origin_occurred_at": self.occurred_at,
            # The event's own time orders versions per entity and is the same on replay,
            # so a replayed purge fences exactly the warms the original did.
            "version": self.occurred_at,
            "issued_at": self.issued_at,
            "replay": self.replay,
        }
