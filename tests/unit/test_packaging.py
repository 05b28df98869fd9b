"""The wheel installs one import package, `cachesync`, and the data files the code reads."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_has_one_top_level_package_and_its_data(tmp_path: Path) -> None:
    """No generic `consumers`, `schemas` or `topology` lands in a user's site-packages."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cachesync-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"cachesync"}
    assert "cachesync/topology/topology.yaml" in names
    assert "cachesync/schemas/avro/events/photo.uploaded.v2.avsc" in names
    assert "cachesync/consumers/cli/app.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "cachesync = cachesync.consumers.cli.app:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )
