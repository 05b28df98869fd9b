"""A running pipeline's cyclic GC: what is loaded at start is frozen out of collections,
and collections run after GC_THRESHOLD allocations; cycles are still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from cachesync.consumers.pipeline.assemble import GC_THRESHOLD, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_freezes_what_is_loaded_and_raises_the_threshold() -> None:
    before = gc.get_freeze_count()
    tune_gc()

    assert gc.get_threshold() == GC_THRESHOLD
    assert gc.get_freeze_count() > before
    node = _Node()
    gone = weakref.ref(node)
    del node
    gc.collect()
    assert gone() is None
