"""The architecture, checked: every import in pipeline/, quantize/ and exporters/ points down the layers below,
and no module imports itself back through others. Imports inside functions count too (a lazy import is still a
dependency). docs/CONTRACTS.md explains the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "quantize", "exporters")

# Lowest first. A module may import from its own layer and the layers below it, never from a layer above.
LAYERS = [
    ("core", ["pipeline", "pipeline.errors", "pipeline.schema", "pipeline.registry", "pipeline.progress",
              "pipeline.distributed", "pipeline.cache", "pipeline.report", "pipeline.seeds"]),
    ("data", ["pipeline.data"]),
    ("models", ["pipeline.models"]),
    ("methods", ["pipeline.distill", "exporters"]),
    ("quantization", ["quantize"]),
    ("analysis", ["pipeline.ood", "pipeline.xai"]),
    ("checks and shipping", ["pipeline.validation", "pipeline.release"]),
    ("search", ["pipeline.search"]),       # times candidates on the validate targets
    ("config", ["pipeline.config"]),
    ("stage API", ["pipeline.stage"]),
    ("stages", ["pipeline.stages"]),
    ("entry points", ["pipeline.runner", "pipeline.preflight", "pipeline.suggest", "pipeline.cli"]),
]


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path = REPO) -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (relative imports resolved; `from a import b` is a.b when b is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names the module's group."""
    best, best_len = None, -1
    for index, (_title, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def group_of(module: str) -> str:
    """The package a module belongs to for the package-level check (pipeline's subpackages count separately)."""
    parts = module.split(".")
    return parts[0] if parts[0] != "pipeline" or len(parts) == 1 else ".".join(parts[:2])


def test_every_module_has_a_layer():
    unplaced = [m for m in all_modules() if layer_of(m) is None]
    assert not unplaced, f"modules in no layer of tests/test_layers.py (add them to LAYERS): {unplaced}"


def test_imports_point_down_the_layers():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in sorted(import_graph().items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_module_imports_itself_back():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_no_package_imports_itself_back():
    packages: dict[str, set[str]] = {}
    for m, deps in import_graph().items():
        packages.setdefault(group_of(m), set()).update(group_of(d) for d in deps if group_of(d) != group_of(m))
    found = cycles(packages)
    assert not found, f"package-level import cycles: {found}"


def test_the_device_suite_imports_nothing_of_edgesmith():
    """device_tests/ runs on the device without edgesmith (and without torch): it reads artifacts.json as JSON."""
    offenders = []
    for path in sorted((REPO / "device_tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert not offenders, offenders


@pytest.mark.parametrize("source, expected", [
    ("from ..runner import Build\n", "pipeline.data imports pipeline.runner"),     # up: data -> entry points
    ("from ..stages.distill import DistillStage\n", "pipeline.data imports pipeline.stages.distill"),
])
def test_an_upward_import_is_caught(tmp_path, source, expected):
    """The checker itself: a module with one upward import, planted in pipeline/data, is caught."""
    planted_path = tmp_path / "pipeline" / "data" / "planted.py"
    planted_path.parent.mkdir(parents=True)
    planted_path.write_text(source)
    modules = {**all_modules(), module_name(planted_path, tmp_path): planted_path}
    planted = imports_of("pipeline.data.planted", planted_path, modules)
    upward = [f"pipeline.data imports {d}" for d in planted if layer_of(d) > layer_of("pipeline.data.planted")]
    assert any(u.startswith(expected) for u in upward), upward


def test_a_cycle_is_caught():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
