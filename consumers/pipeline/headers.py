"""Every Kafka header cachesync reads or writes, named once.

Commands carry `KIND` and `EVENT_ID` (so a consumer can route or trace without
decoding), plus the W3C trace context (`traceparent`, `tracestate`, written by
`telemetry.inject_context`). A replay adds `REPLAY` and, with `--no-cdn`,
`REPLAY_CDN: off`, which CDN sinks obey. The dead-letter topic keeps the record's
own headers and adds the `dlq.*` ones, which say where it came from and why; a
re-drive (`cachesync dlq redrive`) sends it back to its topic without them, plus
`REDRIVE`. An audit record about several commands (a sink's flush) carries `AUDIT_BATCH`.
"""

from __future__ import annotations

from aiokafka import ConsumerRecord

# On every command.
KIND = "cachesync.kind"  # purge | warm
EVENT_ID = "cachesync.event_id"  # the platform event that caused it
# On replayed commands.
REPLAY = "cachesync.replay"  # the replay's id
REPLAY_CDN = "cachesync.replay-cdn"  # "off": CDN sinks skip the command
# On dead letters.
DLQ_REASON = "dlq.reason"  # BadInput.reason, or "permanent" for a sink's refusal
DLQ_ERROR = "dlq.error"  # the error message, at most 2,000 characters
DLQ_CONSUMER = "dlq.consumer"  # the role that gave up on it
DLQ_TOPIC = "dlq.topic"
DLQ_PARTITION = "dlq.partition"
DLQ_OFFSET = "dlq.offset"
DLQ_TIMESTAMP = "dlq.timestamp"
# A record too large for the dead-letter topic keeps only a prefix of its value.
DLQ_TRUNCATED = "dlq.truncated"  # "true": the value is the original's first 64 KiB
DLQ_ORIGINAL_BYTES = "dlq.original_bytes"  # the original value's size, in bytes
# On an audit record about several commands, keyed by the first one's event id: `trace`
# decodes it whatever its key (consumers/pipeline/audit.py).
AUDIT_BATCH = "cachesync.audit-batch"  # "1"
# On a record re-sent from the dead-letter topic to its original topic.
REDRIVE = "cachesync.redrive"  # the dead letter's id: "<partition>:<offset>" on the dlq

Headers = list[tuple[str, bytes]]


def header(record: ConsumerRecord[bytes, bytes], name: str) -> bytes | None:
    """The value of header `name` on `record`, or None."""
    for key, value in record.headers or ():
        if key == name:
            return bytes(value)
    return None
