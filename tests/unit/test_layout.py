"""The house rules of the layout (ARCHITECTURE.md section 5), checked on the source.

Rooms are ranked; a module may import its own room and the rooms below it, never one
above: a running role never imports an operator tool, a sink never imports the
pipeline that drives it. Nothing outside tests/ imports tests/.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {
    "consumers": "cachesync.consumers",
    "schemas": "cachesync.schemas",
    "topology": "cachesync.topology",
}

# Higher rank imports lower rank. Modules directly in consumers/ are the shared core.
RANKS = {
    "cachesync.schemas": 0,
    "cachesync.topology": 0,
    "cachesync.consumers": 1,  # errors, keys, commands, settings, telemetry
    "cachesync.consumers.mapping": 2,
    "cachesync.consumers.sinks": 2,
    "cachesync.consumers.vendor_api": 2,
    "cachesync.consumers.pipeline": 3,
    "cachesync.consumers.ops": 4,
    "cachesync.consumers.cli": 5,
    "cachesync.consumers.__main__": 6,  # `python -m cachesync.consumers`
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES.get(parts[0], parts[0])
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _room(module: str) -> str | None:
    best = None
    for room in RANKS:
        if (module == room or module.startswith(room + ".")) and (
            best is None or len(room) > len(best)
        ):
            best = room
    # consumers/x.py is core; consumers/<room>/... is that room.
    if best == "cachesync.consumers" and module.count(".") > 2:
        return None
    return best


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_no_module_imports_a_higher_room() -> None:
    """Every import goes to the importer's own room or one ranked below it."""
    upward = []
    for path in _sources(*PACKAGES):
        me = _room(_module_name(path))
        assert me is not None, path
        for target in _imports(path):
            room = _room(target)
            if room is not None and room != me and RANKS[room] >= RANKS[me]:
                upward.append(f"{path.relative_to(REPO)} imports {target}")
    assert upward == []


def test_nothing_outside_tests_imports_tests() -> None:
    """Product, deploy and bench code import no test module (the stand-ins live in deploy/)."""
    offenders = [
        f"{p.relative_to(REPO)}: {name}"
        for p in _sources(*PACKAGES, "bench", "deploy")
        for name in _imports(p)
        if name == "tests" or name.startswith("tests.")
    ]
    assert offenders == []


def test_no_import_cycles_between_modules() -> None:
    """The module graph of the package has no cycle, counting imports inside functions."""
    graph = {_module_name(path): _imports(path) for path in _sources(*PACKAGES)}
    edges = {m: {n for n in targets if n in graph and n != m} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return [*stack, m, n]
            if n not in state and (cycle := visit(n, [*stack, m])):
                return cycle
        state[m] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            assert visit(module, []) is None


def test_every_package_folder_is_in_the_wheel() -> None:
    """pyproject lists every folder with an __init__.py, so `pip install .` misses none."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {_module_name(p) for p in _sources(*PACKAGES) if p.name == "__init__.py"}
    assert folders == listed
    assert config["package-dir"] == {v: k for k, v in PACKAGES.items()}
