"""The house (issue 22): each room imports only rooms below it, the runtime imports nothing of the compressor, no
module is shadowed by a function of its own name, and the test helpers live outside the installed package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# rooms, lowest first: a module may import its own room and the rooms below it, never one above
ROOMS = [
    ("base", ("slimdiff", "slimdiff.device", "slimdiff.files", "slimdiff.environment", "slimdiff.failpoints")),
    ("arch", ("slimdiff.arch",)),
    ("runtime", ("slimdiff.runtime",)),
    ("measurement", ("slimdiff.calls", "slimdiff.cost")),
    ("statistics", ("slimdiff.statistics",)),
    ("decomposition math", ("slimdiff.decomposition.closed_form", "slimdiff.decomposition.groups",
                            "slimdiff.decomposition.factorisations", "slimdiff.decomposition.lora_maps",
                            "slimdiff.decomposition.errors")),
    # a decomposition applied to a model: what a plan's widths become, and what a truncation gain measures
    ("applying decompositions", ("slimdiff.decomposition.apply",)),
    ("scoring", ("slimdiff.scoring",)),
    ("planning", ("slimdiff.planning",)),
    ("compressor", ("slimdiff.compress", "slimdiff.baselines")),
    ("pipeline", ("slimdiff.pipeline", "slimdiff.reference")),
    ("command line", ("slimdiff.cli",)),
]
COMPRESSOR = ("slimdiff.calls", "slimdiff.cost", "slimdiff.statistics", "slimdiff.decomposition", "slimdiff.scoring",
              "slimdiff.planning", "slimdiff.compress", "slimdiff.baselines", "slimdiff.pipeline", "slimdiff.cli")


def room(module: str) -> int:
    """The index of the room holding ``module`` (the longest matching prefix)."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(ROOMS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{module} is in no room"
    return index


def modules() -> dict[str, Path]:
    found = {}
    for path in (REPO / "slimdiff").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path) -> set[str]:
    """Every slimdiff module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimdiff"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("slimdiff"))
    return found


def test_every_room_imports_only_rooms_below_it():
    climbs = []
    for name, path in sorted(modules().items()):
        for imported in sorted(imports_of(path)):
            if room(imported) > room(name):
                climbs.append(f"{name} ({ROOMS[room(name)][0]}) imports {imported} ({ROOMS[room(imported)][0]})")
    assert not climbs, "\n".join(climbs)


def test_the_runtime_imports_nothing_of_the_compressor():
    code = ("import json, sys; import slimdiff.runtime.folder, slimdiff.runtime.attention, slimdiff.runtime.resize, "
            "slimdiff.runtime.sampling, slimdiff.runtime.layers; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('slimdiff'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])
    assert "slimdiff.runtime.folder" in loaded
    assert not [m for m in loaded if m.startswith(COMPRESSOR)], loaded



def test_the_served_model_ships_every_module_the_runtime_imports():
    """What ``flows.model_logging`` copies into the MLflow model (the runtime only) holds every slimdiff module the
    runtime imports, directly or through another: a served model never needs the compressor or a missing file."""
    from flows.model_logging import RUNTIME_PACKAGE

    found = modules()
    todo = [n for n in found if n.startswith("slimdiff.runtime")]
    needed: set[str] = set()
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        todo += [m for m in imports_of(found[name]) if m in found]
    shipped = {entry.removesuffix(".py") for entry in RUNTIME_PACKAGE}
    top = {"__init__" if n == "slimdiff" else n.split(".")[1] for n in needed}
    assert top <= shipped, f"the runtime imports {sorted(top - shipped)}, which the served model does not ship"
    assert not [n for n in needed if n.startswith(COMPRESSOR)], sorted(needed)

def test_no_module_is_shadowed_by_a_name_of_its_package_or_itself():
    import importlib

    import slimdiff

    found = modules()
    for name, path in found.items():
        stem = name.rsplit(".", 1)[-1]
        defined = {n.name for n in ast.parse(path.read_text()).body
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        assert stem not in defined, f"{name} defines a function or class named like the module"
        package = name.rsplit(".", 1)[0] if "." in name else None
        if package in found and path.name != "__init__.py":
            exported = set(dir(importlib.import_module(package)))
            value = getattr(importlib.import_module(package), stem, None) if stem in exported else None
            assert value is None or type(value).__name__ == "module", f"{package}.{stem} is not the module {name}"
    assert set(slimdiff.__all__).isdisjoint({n.rsplit(".", 1)[-1] for n in found if n.count(".") == 1})


def test_test_helpers_are_not_in_the_installed_package():
    assert not (REPO / "slimdiff" / "testing.py").exists() and (REPO / "tests" / "helpers.py").is_file()
    assert not [p for p in (REPO / "slimdiff").rglob("*.py") if "from tests" in p.read_text() or "import tests" in p.read_text()]


@pytest.mark.parametrize("old", ["capture", "slim", "evaluate", "influence", "decompose", "allocate", "io", "stages",
                                 "groups", "utils", "testing"])
def test_the_old_flat_modules_are_gone(old):
    assert not (REPO / "slimdiff" / f"{old}.py").exists()
