"""Rule templates render over event fields."""

from __future__ import annotations

import pytest

from cachesync.topology import MissingField, render, render_all


def test_plain_fields() -> None:
    assert render("wedding:{wedding_id}:gallery", {"wedding_id": "w1"}) == ["wedding:w1:gallery"]


def test_null_field_drops_the_item() -> None:
    assert render("album:{album_id}", {"album_id": None}) == []


def test_list_field_expands() -> None:
    assert render("/w/{wedding_id}/{pages}", {"wedding_id": "w1", "pages": ["rsvp", "faq"]}) == [
        "/w/w1/rsvp",
        "/w/w1/faq",
    ]


def test_missing_field_is_an_error_naming_it() -> None:
    with pytest.raises(MissingField) as info:
        render("vendor:{vendor_id}", {"wedding_id": "w1"})
    assert info.value.field == "vendor_id"


def test_render_all_dedupes_in_order() -> None:
    assert render_all(["a:{x}", "b", "a:{x}"], {"x": 1}) == ["a:1", "b"]


def test_format_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="plain"):
        render("{x!r}", {"x": 1})
