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
from typing import Any

from cachesync.consumers.commands import Command, PurgeCommand, WarmCommand, command_id, to_millis
from cachesync.consumers.errors import RuleError
from cachesync.consumers.mapping.index import IndexView, RelationshipIndex
from cachesync.topology import MissingField, PurgeTemplate, Rule, Topology, render, render_all


class Mapper:
    def __init__(
        self,
        topology: Topology,
        index: RelationshipIndex,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topology = topology
        self.index = index
        self.clock = clock
        self.regions = list(topology.regions)

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
            return []
        fields = dict(record)
        occurred_at = to_millis(fields["occurred_at"])
        fields["occurred_at"] = occurred_at
        try:
            entity = _one(rule.entity, fields)
            keys_, tags, urls, prefixes = _render_purge(rule.purge, fields)
        except MissingField as exc:
            raise RuleError(f"rules.{event_type}: {exc}") from None

        # Fan-out reads the index before this event changes it (a deleted vendor must
        # still reach its weddings); warms read regions after (a wedding.updated must
        # warm the regions it just declared).
        weddings: list[str] = []
        if rule.fanout == "vendor_weddings":
            weddings = await index.weddings_of(str(fields["vendor_id"]))
        elif rule.warm is not None and fields.get("wedding_id"):
            weddings = [str(fields["wedding_id"])]
        await self._update_index(rule, fields, index)

        if rule.per_wedding is not None:
            for wedding in weddings:
                try:
                    more = _render_purge(rule.per_wedding, {**fields, "wedding_id": wedding})
                except MissingField as exc:
                    raise RuleError(f"rules.{event_type}.per_wedding: {exc}") from None
                keys_, tags, urls, prefixes = (
                    _merge(a, b) for a, b in zip((keys_, tags, urls, prefixes), more, strict=True)
                )

        now = int(self.clock() * 1000)
        common: dict[str, Any] = {
            "origin_event_id": str(fields["event_id"]),
            "origin_event_type": event_type,
            "origin_occurred_at": occurred_at,
            # The event's own time orders versions per entity and is the same on replay,
            # so a replayed purge fences exactly the warms the original did.
            "version": occurred_at,
            "issued_at": now,
            "replay": replay,
        }
        commands: list[Command] = []
        if keys_ or tags or urls or prefixes:
            for region in self.regions:
                commands.append(
                    PurgeCommand(
                        command_id=command_id(
                            common["origin_event_id"], region, "purge", replay_id
                        ),
                        region=region,
                        entity=entity,
                        scope=rule.scope,
                        keys=tuple(keys_),
                        tags=tuple(tags),
                        urls=tuple(urls),
                        prefixes=tuple(prefixes),
                        **common,
                    )
                )
        if rule.warm is not None and weddings:
            warm = rule.warm
            regions_of = await index.regions_of(weddings)
            for wedding in weddings:
                wf = {**fields, "wedding_id": wedding}
                try:
                    photos = render_all(warm.photos, wf)
                    vendor_assets = render_all(warm.vendor_assets, wf)
                    portal = render_all(warm.guest_portal, wf)
                except MissingField as exc:
                    raise RuleError(f"rules.{event_type}.warm: {exc}") from None
                if not (photos or vendor_assets or portal):
                    continue
                for region in regions_of[wedding]:
                    commands.append(
                        WarmCommand(
                            command_id=command_id(
                                common["origin_event_id"], region, "warm", f"{wedding}|{replay_id}"
                            ),
                            region=region,
                            entity=f"wedding:{wedding}",
                            wedding_id=wedding,
                            photo_urls=tuple(photos),
                            vendor_asset_urls=tuple(vendor_assets),
                            guest_portal_urls=tuple(portal),
                            priority=warm.priority,
                            deadline=occurred_at + warm.deadline_s * 1000,
                            **common,
                        )
                    )
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


def _render_purge(t: PurgeTemplate, fields: Mapping[str, Any]) -> tuple[list[str], ...]:
    return (
        render_all(t.keys, fields),
        render_all(t.tags, fields),
        render_all(t.urls, fields),
        render_all(t.prefixes, fields),
    )


def _merge(a: list[str], b: list[str]) -> list[str]:
    return list(dict.fromkeys([*a, *b]))
