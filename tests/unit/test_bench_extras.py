"""`make bench` says when the stack's test extras (two more brokers and MirrorMaker 2, left
running by `make test`) shared the machine with it: found by their live PID files, and
named in the results' header."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import bench.common
from bench.common import RESULTS, extras_running
from bench.report import markdown, table


def test_only_live_extras_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / ".stack" / "run"
    run.mkdir(parents=True)
    (run / "mm2.pid").write_text(f"{os.getpid()}\n")  # alive: this process
    (run / "kafka-secure.pid").write_text("999999999\n")  # no such process
    (run / "kafka-eu-west.pid").write_text("not a pid\n")
    monkeypatch.setattr(bench.common, "REPO", tmp_path)
    assert extras_running() == ["mm2"]


def test_the_header_says_so() -> None:
    out = json.loads((RESULTS / "latest.json").read_text())
    out["extras_running"] = ["kafka-secure", "mm2"]
    assert "test extras were running** (kafka-secure, mm2)" in markdown(out, table(out))
    out["extras_running"] = []
    assert "test extras" not in markdown(out, table(out))
