"""The house layout, read from the code's own imports (``ast``): one role per room, imports that only
point down, no import cycle between rooms, no two modules with one name, imports at module level.

A room is a folder (package) of ``caspo``, or a module directly in ``caspo/`` (``caspo/config.py``).
README's Layout section describes the rooms; ``LAYERS`` below is the order it states.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "caspo"

# Rooms from the top down: a module may import its own room and the rooms of lower layers only.
LAYERS = [
    ["caspo.cli"],
    ["caspo.bench"],
    ["caspo.trainer", "caspo.report"],
    ["caspo.mesh", "caspo.serve", "caspo.diagnose"],
    ["caspo.services"],
    ["caspo.evaluation", "caspo.store"],
    ["caspo.models"],
    ["caspo.tasks"],
    ["caspo.answer_worker", "caspo.config", "caspo.errors", "caspo.netutil", "caspo.plots", "caspo.policy_file", "caspo.progress", "caspo.protogen", "caspo.protos", "caspo.telemetry"],
    ["caspo.core"],
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}

# Imports that may stay inside a function, each with its reason. Nothing of the project is here.
LAZY_IMPORTS = {
    ("caspo/models/vllm.py", "vllm"): "the optional gpu extra: the module imports without it",
    ("caspo/plots.py", "matplotlib.pyplot"): "pyplot after choosing the Agg backend, which is process-wide",
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _imported(node: ast.AST, module: str) -> list[str]:
    """The project modules an import statement reads (``from caspo.x import y`` reads caspo.x.y when
    that is a module, else caspo.x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "caspo"]
    if node.level:  # relative: resolve against this module's package
        is_package = MODULES.get(module, Path()).name == "__init__.py"
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != "caspo":
        return []
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]


def _imports() -> list[tuple[str, str, int, bool]]:
    """(importing module, imported project module, line, at module level) for every import in caspo."""
    found = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node, module):
                    found.append((module, target, node.lineno, id(node) not in nested))
    return found


def _room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, target, _, _ in _imports():
        a, b = _room(module), _room(target)
        if a != b and a != "caspo":
            graph.setdefault(a, set()).add(b)
    return graph


def test_every_room_has_a_place_in_the_layers():
    rooms = {_room(m) for m in MODULES} - {"caspo"}
    assert not rooms - set(LAYER), f"rooms missing from LAYERS (and README's Layout): {sorted(rooms - set(LAYER))}"


def test_no_import_cycle_between_rooms():
    graph = _room_graph()
    state: dict[str, str] = {}

    def visit(room: str, path: list[str]) -> None:
        state[room] = "open"
        for nxt in sorted(graph.get(room, ())):
            assert state.get(nxt) != "open", "import cycle between rooms: " + " -> ".join(path[path.index(nxt) :] + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[room] = "done"

    for room in sorted(graph):
        if room not in state:
            visit(room, [room])


def test_imports_point_down():
    up = sorted(
        f"{module} (line {line}) imports {target}"
        for module, target, line, _ in _imports()
        if _room(module) != _room(target) and _room(module) in LAYER and LAYER[_room(module)] >= LAYER.get(_room(target), -1)
    )
    assert not up, "imports that do not point to a lower layer:\n" + "\n".join(up)


def test_no_two_modules_share_a_name():
    names = Counter()
    for module, path in MODULES.items():
        name = module.rsplit(".", 1)[-1]
        if path.name != "base.py" and module != "caspo":
            names[name] += 1  # a package counts by its folder's name: caspo.mesh and bench/mesh.py would clash
    assert not [n for n, c in names.items() if c > 1], f"module names used twice: {sorted(n for n, c in names.items() if c > 1)}"


def test_imports_sit_at_module_level():
    lazy = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        rel = str(path.relative_to(PACKAGE.parent))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, ast.Import):
                    lazy += [(rel, a.name, node.lineno) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    lazy.append((rel, "." * node.level + (node.module or ""), node.lineno))
    unexplained = sorted({f"{rel}:{line} imports {name} inside a function or class" for rel, name, line in lazy if (rel, name) not in LAZY_IMPORTS})
    assert not unexplained, "\n".join(unexplained)
    assert not [key for key in LAZY_IMPORTS if key[1].split(".")[0] == "caspo"], "a project module is imported lazily"


def test_the_rules_see_what_they_check():
    # the checks above pass vacuously if the import reader finds nothing: it must see the real edges
    graph = _room_graph()
    assert "caspo.services" in graph["caspo.mesh"] and "caspo.core" in graph["caspo.tasks"]
    assert ("caspo.services.server", "caspo.services.security") in {(m, t) for m, t, _, _ in _imports()}
    assert _imported(ast.parse("from caspo.services import mesh_servicer").body[0], "caspo.mesh.registry") == ["caspo.services.mesh_servicer"]
