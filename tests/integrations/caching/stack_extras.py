"""The local stack's extras (CACHESYNC_STACK_EXTRAS in deploy/local/env.sh): a SASL_SSL
broker ("secure") and eu-west's own cluster with MirrorMaker 2 ("two-clusters").

A test that needs one starts it through deploy/local/up.sh, which leaves whatever
already answers alone (`make test` has started them before), and reads the settings
the script wrote under the stack's folder. A failure to start is a test failure, never
a skip.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO


def stack_dir() -> Path:
    return Path(os.environ.get("CACHESYNC_STACK_DIR") or REPO / ".stack")


def start_extra(name: str) -> None:
    """Bring the stack up with the extra `name` (idempotent)."""
    proc = subprocess.run(
        ["bash", str(REPO / "deploy/local/up.sh")],
        env={**os.environ, "CACHESYNC_STACK_EXTRAS": name},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"deploy/local/up.sh with extra {name!r} failed:\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )


def read_env(path: Path) -> dict[str, str]:
    """VAR=value lines, as the stack's scripts write them."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {name.strip(): value.strip() for name, value in pairs}
