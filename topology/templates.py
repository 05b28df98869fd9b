"""Rule templates: Python format strings over an event's fields.

A null field drops the item (an optional album, say); a list field expands the
item once per element; a field the event lacks raises `MissingField`, which the
mapper dead-letters, because it means the rule and the schema disagree.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

_FORMATTER = string.Formatter()
# Field values a template does not format as they are: None drops the item, a list or
# tuple expands it.
_NOT_SCALAR = (type(None), list, tuple)


class MissingField(KeyError):
    """A template names a field that the event does not carry."""

    def __init__(self, template: str, field: str) -> None:
        super().__init__(field)
        self.template = template
        self.field = field

    def __str__(self) -> str:
        return f"template {self.template!r} references missing field {self.field!r}"


@lru_cache(maxsize=4096)
def fields_of(template: str) -> tuple[str, ...]:
    """The field names a template references, in order, without duplicates."""
    names: list[str] = []
    for _, name, spec, conv in _FORMATTER.parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ValueError(f"template {template!r}: only plain {{field}} references are allowed")
        if name not in names:
            names.append(name)
    return tuple(names)


def render(template: str, fields: Mapping[str, Any]) -> list[str]:
    """Every string the template yields for these fields (zero, one or many)."""
    names = fields_of(template)
    # The common case, every field a present scalar: one format call, no product.
    try:
        if all(not isinstance(fields[n], _NOT_SCALAR) for n in names):
            return [template.format_map(fields)]
    except KeyError:
        pass  # named below, with the template
    choices: list[list[str]] = []
    for name in names:
        if name not in fields:
            raise MissingField(template, name)
        value = fields[name]
        if value is None:
            return []
        if isinstance(value, list | tuple):
            if not value:
                return []
            choices.append([str(v) for v in value])
        else:
            choices.append([str(value)])
    if not names:
        return [template]
    return [
        template.format_map(dict(zip(names, combo, strict=True)))
        for combo in itertools.product(*choices)
    ]


def render_all(templates: Iterable[str], fields: Mapping[str, Any]) -> list[str]:
    """Render many templates, keeping first-seen order and dropping repeats."""
    out: dict[str, None] = {}
    for template in templates:
        for item in render(template, fields):
            out[item] = None
    return list(out)
