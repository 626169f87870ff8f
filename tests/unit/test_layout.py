"""The house layout, read from the code's own imports (``ast``): one role per room, imports that only
point down, no import cycle between rooms, no two modules with one name, imports at module level.

A room is a folder (package) of ``caspo``, or a module directly in ``caspo/`` (``caspo/config.py``).
The rule has one source, the code block of README's Layout section, which this test reads: a line
that starts with a path names a room, a blank line starts the next group down.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "caspo"


def read_layers(readme: str) -> list[list[str]]:
    """Rooms from the top down, as README's Layout block lists them: a module may import its own room and
    the rooms of lower groups only."""
    section = readme.split("\n## Layout\n", 1)[1]
    block = section.split("```\n", 1)[1].split("```", 1)[0]
    layers: list[list[str]] = [[]]
    for line in block.splitlines():
        if not line.strip():
            if layers[-1]:
                layers.append([])
            continue
        if line[0].isspace():
            continue  # a room's description, continued
        path = line.split()[0]
        if not re.fullmatch(r"caspo/\w+(/|\.py)", path):
            raise AssertionError(f"README's Layout block: {path!r} is not a room (caspo/<folder>/ or caspo/<module>.py)")
        layers[-1].append(path.removesuffix("/").removesuffix(".py").replace("/", "."))
    return [group for group in layers if group]


LAYERS = read_layers((ROOT / "README.md").read_text())
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
    missing = unplaced(MODULES)
    assert not missing, f"rooms missing from README's Layout block: {missing}"
    assert not set(LAYER) - {_room(m) for m in MODULES}, f"README's Layout block lists rooms that do not exist: {sorted(set(LAYER) - {_room(m) for m in MODULES})}"


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


def upward(imports, layer: dict[str, int] = LAYER) -> list[str]:
    """The imports that break the rule: into a room of the same or a higher group."""
    return sorted(
        f"{module} (line {line}) imports {target}"
        for module, target, line, _ in imports
        if _room(module) != _room(target) and _room(module) in layer and layer[_room(module)] >= layer.get(_room(target), -1)
    )


def unplaced(modules, layer: dict[str, int] = LAYER) -> list[str]:
    """Rooms of the package that README's Layout block does not list."""
    return sorted({_room(m) for m in modules} - {"caspo"} - set(layer))


def test_imports_point_down():
    up = upward(_imports())
    assert not up, "imports that do not point to a lower layer:\n" + "\n".join(up)


def test_the_rule_fails_a_forbidden_import_and_an_unlisted_room():
    # a test of the test: what README forbids must fail here
    assert LAYER["caspo.report"] == LAYER["caspo.diagnose"] < LAYER["caspo.mesh"] < LAYER["caspo.core"]
    found = _imports()
    assert upward([*found, ("caspo.report", "caspo.diagnose", 1, True)]) == ["caspo.report (line 1) imports caspo.diagnose"]
    assert upward([*found, ("caspo.core.search", "caspo.models.hf", 7, True)]) == ["caspo.core.search (line 7) imports caspo.models.hf"]
    assert unplaced([*MODULES, "caspo.newroom.x"]) == ["caspo.newroom"]
    # the reader takes groups and rooms as README writes them, and refuses a line that names no room
    text = "## Layout\n\n```\ncaspo/cli/   the command\n             more words\n\ncaspo/a.py  x\ncaspo/b/    y\n```\n"
    assert read_layers("intro\n" + text) == [["caspo.cli"], ["caspo.a", "caspo.b"]]
    try:
        read_layers("intro\n" + text.replace("caspo/a.py", "a.py"))
    except AssertionError as e:
        assert "'a.py' is not a room" in str(e)
    else:
        raise AssertionError("a line that names no room was read")


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
