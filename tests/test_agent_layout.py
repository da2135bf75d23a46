"""The agent's house rules, checked on its source: one clock, and no module over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"
CLOCK_READS = {"time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "perf_counter_ns"}
SHIM = AGENT / "ranks" / "shim.py"
"""Runs as `python -I -S`, where gpuorch cannot be imported: it reads `time` itself (only to time waits)."""


def modules() -> list[Path]:
    return sorted(AGENT.rglob("*.py"))


def direct_clock_reads(path: Path) -> list[str]:
    """Every `time.<read>()` call and every `from time import <read>` in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in CLOCK_READS:
            if isinstance(node.value, ast.Name) and node.value.id == "time":
                found.append(f"{path.relative_to(AGENT.parent)}:{node.lineno} time.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            found += [f"{path.relative_to(AGENT.parent)}:{node.lineno} from time import {a.name}" for a in node.names]
    return found


def test_the_agent_reads_time_only_through_its_clock() -> None:
    assert modules(), f"no modules found under {AGENT}"
    reads = [read for path in modules() if path != SHIM for read in direct_clock_reads(path)]
    assert reads == [], "read gpuorch.clock.Clock instead:\n" + "\n".join(reads)


def test_the_check_sees_a_direct_read() -> None:
    assert direct_clock_reads(SHIM), "the shim's own time.monotonic() should be found"


def test_no_agent_module_is_over_400_lines() -> None:
    long = {str(path.relative_to(AGENT.parent)): n for path in modules() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_agent_never_imports_the_coordinator() -> None:
    offenders = {str(path): sorted(m for m in imported_modules(path) if m.split(".")[0] == "coordinator") for path in modules()}
    assert {path: found for path, found in offenders.items() if found} == {}


def test_rank_lifecycle_rules_are_pure_and_the_shim_stdlib_only() -> None:
    lifecycle = imported_modules(AGENT / "ranks" / "lifecycle.py") - {"__future__"}
    assert lifecycle <= {"enum", "signal", "collections.abc", "dataclasses", "gpuorch.v1"}, lifecycle
    shim = imported_modules(SHIM)
    assert not {m for m in shim if m.split(".")[0] in {"agent", "gpuorch", "coordinator", "structlog", "grpc"}}, shim


def test_every_agent_package_is_installed() -> None:
    """A folder without __init__.py is left out of the wheel (setuptools' find), and the agent then
    cannot start its ranks on an installed node."""
    folders = {path.parent for path in modules() if "__pycache__" not in path.parts}
    assert sorted(str(f.relative_to(AGENT.parent)) for f in folders if not (f / "__init__.py").exists()) == []
