"""The house rules, read from the package's imports (ast): layers a newcomer can trust.

- only engine/ imports ray;
- models/ imports only models/ and data/ of this package (no Config, no ray);
- data/ imports neither models/, engine/, selection/ nor report/; run/ imports only run/;
- selection/ never imports models/ or engine/;
- no product module imports devtools/ at module level (the CLI may, inside a command), and no
  product module is there only for devtools/ (what only benchmarks use lives in devtools/);
- no import cycles, through function-level (lazy) imports too: between modules, and between
  layers (a folder of the package, or a top-level module), so layers import one way;
- no module over 600 lines, no class over 250, no Config module (config/) over 200.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tmars_ray"
MAX_LINES = 600
MAX_CLASS_LINES = 250  # Config was one 491-line class
MAX_CONFIG_MODULE_LINES = 200  # one concern per module: a new knob group gets its own


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, package: str) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import of a source file; relative
    imports are resolved against `package`."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    # imports guarded by `if TYPE_CHECKING:` at top level count as module level too
    for node in tree.body:
        if isinstance(node, ast.If):
            top_level |= {id(n) for n in node.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names]
            out += [(n, id(node) in top_level) for n in [mod, *names]]
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def breaches(root: Path) -> list[str]:
    """Every rule breach in the package at `root` (a folder named like the package)."""
    pkg = root.name
    found = []
    modules = {module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in sorted(modules.items()):
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            found.append(f"{mod}: {lines} lines (> {MAX_LINES})")
        if layer_of(mod) == "config" and lines > MAX_CONFIG_MODULE_LINES:
            found.append(f"{mod}: config module of {lines} lines (> {MAX_CONFIG_MODULE_LINES})")
        found += [
            f"{mod}: class {name}: {n} lines (> {MAX_CLASS_LINES})"
            for name, n in class_sizes(path)
            if n > MAX_CLASS_LINES
        ]
        layer = layer_of(mod)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        graph[mod] = set()
        for target, module_level in imports(path, package):
            top = target.split(".")[0]
            if top == "ray" and layer != "engine":
                found.append(f"{mod}: imports ray (only {pkg}.engine may)")
            if top != pkg:
                continue
            tlayer = layer_of(target)
            if target in modules and target != mod:  # lazy imports too: a cycle all the same
                graph[mod].add(target)
            if layer == "models" and tlayer not in ("models", "data", ""):
                found.append(f"{mod}: models/ imports {target}")
            if layer == "models" and f"{target}.".startswith(f"{pkg}.config."):
                found.append(f"{mod}: models/ imports the Config")
            if layer == "data" and tlayer in ("models", "engine", "selection", "report"):
                found.append(f"{mod}: data/ imports {target}")
            if layer == "run" and tlayer not in ("run", ""):
                found.append(f"{mod}: run/ imports {target}")
            if layer == "selection" and tlayer in ("models", "engine"):
                found.append(f"{mod}: selection/ imports {target}")
            if tlayer == "devtools" and layer != "devtools" and module_level:
                found.append(f"{mod}: imports {target} at module level")
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    importers: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        for target in targets:
            importers.setdefault(target, set()).add(mod)
    for target, by in sorted(importers.items()):
        product = layer_of(target) != "devtools" and modules[target].name != "__init__.py"
        if product and all(layer_of(b) == "devtools" for b in by):
            found.append(f"{target}: only devtools/ imports it (move it there)")
    layers: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        a = layer_of(mod)
        layers.setdefault(a, set()).update(b for t in targets if (b := layer_of(t)) != a)
    found += [f"layer cycle: {' -> '.join(c)}" for c in cycles(layers)]
    return sorted(set(found))


def class_sizes(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        (n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    out, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                out.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return out


def test_package_follows_the_house_rules():
    assert breaches(PACKAGE) == []


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root.parent).parents:
        init = root.parent / parent / "__init__.py"
        if parent != Path(".") and not init.exists():
            init.write_text("")
    path.write_text(text)


@pytest.mark.parametrize(
    "rel, text, expected",
    [
        ("models/bad.py", "import ray\n", "imports ray"),
        ("models/bad.py", "from tmars_ray.config import Config\n", "models/ imports"),
        ("selection/bad.py", "from tmars_ray.engine import stages\n", "selection/ imports"),
        ("selection/bad.py", "from ..models import clip\n", "selection/ imports"),
        ("data/bad.py", "from tmars_ray.models.detect import x\n", "data/ imports"),
        ("report/bad.py", "from tmars_ray.devtools import synth\n", "at module level"),
        ("run/big.py", "x = 1\n" * 601, "601 lines"),
        ("engine/a.py", "from tmars_ray.engine import b\n", "import cycle"),
        ("engine/a.py", "def f():\n    from tmars_ray.engine import b\n", "import cycle"),
        ("devtools/bench.py", "def f():\n    from tmars_ray.engine import b\n", "only devtools/"),
        ("report/big.py", "class Big:\n" + "    x = 1\n" * 250, "class Big: 251 lines"),
        ("config/models.py", "x = 1\n" * 201, "config module of 201 lines"),
        # config -> report (lazily) while report -> config: no module cycle, a layer cycle
        ("config/extra.py", "def f():\n    from tmars_ray.report import views\n", "layer cycle"),
    ],
)
def test_the_rules_can_fail(tmp_path, rel, text, expected):
    """Each rule flags a module written to a temp tree that breaks it."""
    root = tmp_path / "tmars_ray"
    write(root, "engine/b.py", "from tmars_ray.engine import a\n" if "cycle" in expected else "")
    write(root, "cli.py", "def inspect():\n    from tmars_ray.devtools import synth\n")
    write(root, "report/views.py", "from tmars_ray.config import Config\n")
    assert breaches(root) == []
    write(root, rel, text)
    found = breaches(root)
    assert any(expected in b for b in found), found
