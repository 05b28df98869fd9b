"""Checks on a decoded event that its Avro schema cannot express.

Avro says a field is a string; these say it is a usable one: ids present and
printable, countries as ISO 3166-1 alpha-2, paths absolute. A failing event is
dead-lettered as `invalid_record` with the field named, instead of producing keys
such as `wedding::gallery` that would purge nothing and hide the bug.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cachesync.consumers.errors import InvalidRecord

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")


def validate_event(event_type: str, record: Mapping[str, Any]) -> None:
    problems: list[str] = []
    for name, value in record.items():
        if name.endswith("_id") and isinstance(value, str) and not _ID.match(value):
            problems.append(f"{name}={value!r} is not a valid id")
        elif name.endswith("_ids") and isinstance(value, list):
            problems += [
                f"{name}[{i}]={v!r} is not a valid id"
                for i, v in enumerate(value)
                if not _ID.match(str(v))
            ]
        elif name == "destination_country" and not _COUNTRY.match(str(value)):
            problems.append(f"{name}={value!r} is not an ISO 3166-1 alpha-2 code")
        elif name == "guest_countries":
            problems += [
                f"{name}[{i}]={v!r} is not an ISO 3166-1 alpha-2 code"
                for i, v in enumerate(value)
                if not _COUNTRY.match(str(v))
            ]
        elif name == "path" and isinstance(value, str) and not value.startswith("/"):
            problems.append(f"path={value!r} must start with /")
    if problems:
        raise InvalidRecord(f"{event_type}: " + "; ".join(problems))
