"""The dead-letter model without services: ids, what the headers say, what a re-drive sends."""

from __future__ import annotations

import pytest
from aiokafka import ConsumerRecord

from cachesync.consumers.ops.dlq import (
    ALREADY,
    SENT,
    WOULD_FAIL,
    DeadLetter,
    RedriveOutcome,
    RedriveReport,
    _entry,
    _entry_of,
    parse_id,
)
from cachesync.consumers.pipeline import headers


def _record(extra: list[tuple[str, bytes]], *, offset: int = 17) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="cache.dlq",
        partition=0,
        offset=offset,
        timestamp=1_700_000_000_500,
        timestamp_type=0,
        key=b"w1",
        value=b"payload",
        checksum=None,
        serialized_key_size=2,
        serialized_value_size=7,
        headers=[
            ("traceparent", b"00-abc-def-01"),
            (headers.REDRIVE, b"0:3"),  # it was re-driven once before, and failed again
            *extra,
        ],
    )


DLQ_HEADERS = [
    (headers.DLQ_REASON, b"rule_error"),
    (headers.DLQ_ERROR, b"rules.photo.deleted: missing field"),
    (headers.DLQ_CONSUMER, b"mapper"),
    (headers.DLQ_TOPIC, b"content.photos"),
    (headers.DLQ_PARTITION, b"5"),
    (headers.DLQ_OFFSET, b"42"),
    (headers.DLQ_TIMESTAMP, b"1700000000000"),
]


def test_ids_have_one_spelling() -> None:
    """`0:017` and ` 0:17 ` are the dead letter `0:17`; anything else is refused."""
    assert parse_id("0:017") == parse_id(" 0:17 ") == "0:17"
    for bad in ("17", "0:", "a:1", "0:1:2", "-1:3"):
        with pytest.raises(ValueError):
            parse_id(bad)


def test_the_dlq_headers_tell_where_from_and_why() -> None:
    """Reason, error, consumer and origin come from the dlq.* headers; the record keeps the others."""
    letter = DeadLetter.from_record(_record(DLQ_HEADERS))
    assert letter.id == "0:17"
    assert (letter.reason, letter.consumer) == ("rule_error", "mapper")
    assert letter.error == "rules.photo.deleted: missing field"
    assert letter.origin == "content.photos[5]@42"
    assert (letter.timestamp, letter.dead_lettered_at) == (1_700_000_000_000, 1_700_000_000_500)
    assert [k for k, _ in letter.headers] == ["traceparent", headers.REDRIVE]


def test_missing_headers_read_as_unknown_not_as_an_error() -> None:
    """A record someone put on the topic by hand still lists, with what is missing marked."""
    letter = DeadLetter.from_record(_record([(headers.DLQ_PARTITION, b"x")]))
    assert letter.reason == "unknown"
    assert letter.origin == "[?]@?"


def test_a_redrive_sends_its_own_headers_and_one_mark() -> None:
    """The re-sent record keeps the trace context, drops the dlq.* headers and the mark of an
    earlier re-drive, and carries this dead letter's id."""
    sent = DeadLetter.from_record(_record(DLQ_HEADERS)).redrive_headers()
    assert sent == [("traceparent", b"00-abc-def-01"), (headers.REDRIVE, b"0:17")]


def test_a_ledger_entry_belongs_to_one_record() -> None:
    """An entry written for a record at the same place but of another time (an earlier topic
    of the same name) does not make this one re-driven."""
    letter = DeadLetter.from_record(_record(DLQ_HEADERS))
    redriven = _entry_of(letter, _entry(letter, sent_to="content.photos[5]@43"))
    assert redriven is not None and redriven.sent_to == "content.photos[5]@43"
    older = DeadLetter.from_record(_record(DLQ_HEADERS))
    older.dead_lettered_at -= 1
    assert _entry_of(older, _entry(letter, sent_to="x")) is None
    assert _entry_of(letter, b"not json") is None
    assert _entry_of(letter, None) is None


def test_the_report_splits_sent_from_not_sent() -> None:
    letter = DeadLetter.from_record(_record(DLQ_HEADERS))
    report = RedriveReport(
        dry_run=False,
        outcomes=[
            RedriveOutcome(letter, SENT),
            RedriveOutcome(letter, ALREADY),
            RedriveOutcome(letter, WOULD_FAIL),
        ],
    )
    assert [o.outcome for o in report.sent] == [SENT]
    assert [o.outcome for o in report.not_sent] == [ALREADY, WOULD_FAIL]
