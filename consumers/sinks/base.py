"""The sink contract: where a command becomes an effect on one cache in one region.

A sink buffers commands with `add` and applies them with `flush`; the runner calls
`flush` once per consumed batch and commits the batch's offsets only after it
returns. So a sink must:

- apply everything added since the last flush, or raise `TransientError` (nothing
  is committed and the whole batch comes back, so applying twice must be harmless);
- return the commands that can never succeed as `Rejected` (they are dead-lettered
  and the batch is committed);
- leave its buffer empty when `flush` returns or raises.

Before each `add`, the runner says where it read the command (`read_from`: topic,
partition, offset, record time). A purge sink records the last offset it applied per
partition with its effect and skips a re-read record at or below it (sinks/ledger.py):
that is what keeps a command applied once across the command topics' whole retention.
A command added without a position (a test, a tool) is deduplicated by its markers only.

Each sink class names its `kind`, builds itself from settings (`from_settings`) and
says why it cannot run in a region (`unavailable`); `sinks/registry.py` maps kinds to
classes. `ready` says whether its own backend answers a cheap probe now (/readyz). Tier order within a region is the runner's (pipeline/roles.py): a sink only
declares the sinks it follows (`after`) and what it does with a command whose earlier
tiers never applied it in time (`overdue`).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Self
from urllib.parse import urlsplit

from cachesync.consumers.commands import Command, PurgeCommand

if TYPE_CHECKING:
    from cachesync.consumers.settings import Settings


@dataclass(frozen=True, slots=True)
class Position:
    """Where the runner read a command: its record's topic, partition, offset and time (ms)."""

    topic: str
    partition: int
    offset: int
    timestamp: int


@dataclass(frozen=True)
class Note:
    """What a sink says about one command, beyond applied / not applied.

    A command redelivered after it was applied (a crash before the commit) is "applied"
    again, with a detail saying when it was (`sinks/ledger.py` `redelivered`): the audit
    trail then has its applied record even if the first one was never written.
    """

    outcome: str = "applied"  # applied | skipped | fenced | rejected
    detail: str = ""
    provider_ids: tuple[str, ...] = ()
    cache_status: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejected:
    command: Command
    error: str


@dataclass(frozen=True)
class FlushResult:
    applied: int = 0
    skipped: int = 0
    rejected: tuple[Rejected, ...] = ()
    # What the sink has to say per command id (fenced warms, provider ids, edge cache
    # statuses); it goes to the audit topic and the command's span. Absent: applied.
    notes: Mapping[str, Note] = field(default_factory=dict)


class Sink(ABC):
    """One cache tier in one region."""

    kind: ClassVar[str]
    # CDN sinks cost money and rate budget; a replay run with --no-cdn marks its
    # commands so that these sinks skip them (see cachesync.consumers.ops.replay).
    is_cdn: ClassVar[bool] = False
    # Tier order within a region: the purge sinks that must have applied the same event
    # before this one acts (edges after Redis, so an edge miss cannot refill from a stale
    # Redis; the warmer after the region's purges). The runner holds the batch back,
    # looking again every `after_retry_s`, until they have, or until `after_max_wait_s`
    # has passed since the command was issued (a stopped Redis sink must not stop the
    # edges for good); it then hands the command over through `overdue`. Empty: no wait.
    after: tuple[str, ...] = ()
    after_max_wait_s: float = 30.0
    after_retry_s: float = 0.2
    # The coalescing window: the runner gathers records for up to `linger_ms` (and at
    # most `max_batch_records`) before one flush, so a sink with a purge budget
    # (consumers/budget.py) sees a whole window's commands at once. 0: flush per poll.
    linger_ms: int = 0
    max_batch_records: int | None = None

    def __init__(self, region: str) -> None:
        self.region = region

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings, region: str) -> Self:
        """This sink for `region`, from settings and topology (after `unavailable` said None)."""

    @classmethod
    def unavailable(cls, settings: Settings, region: str) -> str | None:
        """Why this sink cannot run in `region` (a provider not configured there), or None."""
        return None

    async def setup(self) -> None:
        """Open connections; called once before the first `add`."""

    @property
    def backend_url(self) -> str | None:
        """The URL of the backend this sink applies to (a provider's API, an edge), which
        `ready` connects to; None: nothing to probe."""
        return None

    async def ready(self) -> str | None:
        """Whether the sink's own backend answers now, asked cheaply (/readyz, every few
        seconds): None when it does, else why not, in one line. The default opens a TCP
        connection to `backend_url`; a sink with a cheaper or truer probe (a Redis PING)
        says so here. The health server bounds the time it waits."""
        url = self.backend_url
        return None if url is None else await reachable(url)

    def overdue(self, command: Command) -> None:
        """The runner stopped waiting for the earlier tiers (`after`) to apply `command`'s
        event and hands it over with the batch. A purge sink applies it anyway (the
        default); a sink for which it is no longer worth doing drops it in its flush."""

    @abstractmethod
    def accepts(self, command: Command) -> bool:
        """Whether this sink has anything to do for the command (others are skipped)."""

    def read_from(self, command: Command, position: Position) -> None:
        """Where the runner read `command`, said just before `add`. A sink that records
        applied offsets keeps it until its flush; the others ignore it (the default)."""

    @abstractmethod
    def add(self, command: Command) -> None:
        """Buffer one command for the next flush."""

    @abstractmethod
    async def flush(self) -> FlushResult:
        """Apply the buffered commands; see the module docstring for the contract."""

    async def close(self) -> None:
        """Release connections; the runner has already flushed."""


_DEFAULT_PORTS = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}


async def reachable(url: str) -> str | None:
    """None when a TCP connection to `url`'s host and port opens, else why not. Nothing
    is sent: a probe every few seconds costs a provider no request and no rate budget."""
    parts = urlsplit(url)
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    if not parts.hostname or port is None:
        return f"cannot probe {url!r}: no host or port"
    try:
        _, writer = await asyncio.open_connection(parts.hostname, port)
    except OSError as exc:
        return f"{parts.hostname}:{port} unreachable: {exc.strerror or type(exc).__name__}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


class PurgeSink(Sink):
    """A sink that acts on purges only, buffering them for one flush.

    `acts_on` names the purge fields the sink can do something with; a purge with none
    of them is not its business (`accepts` says no).
    """

    acts_on: ClassVar[tuple[str, ...]] = ("keys", "tags", "urls", "prefixes")

    def __init__(self, region: str) -> None:
        super().__init__(region)
        self._pending: list[PurgeCommand] = []
        self._positions: dict[str, Position] = {}

    def accepts(self, command: Command) -> bool:
        return isinstance(command, PurgeCommand) and any(getattr(command, f) for f in self.acts_on)

    def read_from(self, command: Command, position: Position) -> None:
        # A command read twice in one batch (a copy at another offset): the later offset,
        # which its one application covers too.
        known = self._positions.get(command.command_id)
        if known is None or known.partition != position.partition or known.offset < position.offset:
            self._positions[command.command_id] = position

    def add(self, command: Command) -> None:
        if isinstance(command, PurgeCommand):
            self._pending.append(command)

    def take(self) -> list[PurgeCommand]:
        """The buffered purges, leaving the buffer empty (as the contract requires); their
        positions are then `take_positions`'."""
        pending, self._pending = self._pending, []
        return pending

    def take_positions(self) -> dict[str, Position]:
        """Where the runner read the purges added since the last flush, by command id."""
        positions, self._positions = self._positions, {}
        return positions
