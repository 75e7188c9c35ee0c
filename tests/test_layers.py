"""The architecture as a test: no module imports a layer above its own, and no circles.

Every `import` and `from ... import` in src/poste is read with `ast`, function
-local ones included (they hide arrows just as well), and checked against the
layers of docs/architecture.md.  A command-line module (`cli.py`, `*_cli.py`)
sits on the top layer wherever its folder is: it may wire anything together.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Lower number = lower layer.  Prefix match, longest first.
LAYERS: dict[str, int] = {
    "poste.metrics": 0,
    "poste.smtp": 1,
    "poste.dns": 1,
    "poste.spam": 1,
    "poste.users": 1,
    "poste.dkim": 2,
    "poste.certs": 2,
    "poste.runtime": 3,
    "poste.services": 4,
    "poste.tools": 5,
    "poste.stack": 5,
    "poste.cli": 6,
    "poste.__main__": 6,
}
TOP = 6


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int | None:
    if module.rsplit(".", 1)[-1] in ("cli",) or module.endswith("_cli"):
        return TOP
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def imports() -> dict[str, set[str]]:
    """module -> the poste modules it imports (resolved, not just their packages)."""
    out: dict[str, set[str]] = {}
    for path in sorted((SRC / "poste").rglob("*.py")):
        mod = module_name(path)
        got: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                got.update(a.name for a in node.names if a.name.startswith("poste"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if not node.module.startswith("poste"):
                    continue
                for a in node.names:  # `from poste.x import y`: y may be a module
                    sub = f"{node.module}.{a.name}"
                    exists = (SRC / Path(*sub.split("."))).with_suffix(".py").exists() or (
                        SRC / Path(*sub.split(".")) / "__init__.py").exists()
                    got.add(sub if exists else node.module)
        out[mod] = got - {mod}
    return out


def service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "services" else None


def test_every_module_has_a_layer() -> None:
    assert [m for m in imports() if layer(m) is None and m != "poste"] == []


def test_no_import_goes_up_a_layer() -> None:
    wrong = []
    for mod, deps in imports().items():
        mine = layer(mod)
        for dep in deps:
            theirs = layer(dep)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{mod} (layer {mine}) imports {dep} (layer {theirs})")
            # a service is its own room: it uses libraries, not another service
            a, b = service_of(mod), service_of(dep)
            if a and b and a != b and mine != TOP:
                wrong.append(f"{mod} imports another service's {dep}")
    assert wrong == [], "\n".join(sorted(wrong))


def test_no_import_circles() -> None:
    graph = imports()
    # Package-level graph (poste.services.relay, poste.dkim, ...), as the folders show it.
    def pkg(m: str) -> str:
        if layer(m) == TOP:  # a command is a node of its own, above its folder
            return m
        parts = m.split(".")
        return ".".join(parts[:3] if len(parts) > 2 and parts[1] == "services" else parts[:2])

    pgraph: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        pgraph.setdefault(pkg(mod), set()).update(pkg(d) for d in deps if pkg(d) != pkg(mod))
    for g in (graph, pgraph):
        cycles = []
        state: dict[str, int] = {}

        def visit(node: str, stack: list[str], g: dict[str, set[str]] = g,
                  cycles: list[str] = cycles, state: dict[str, int] = state) -> None:
            state[node] = 1
            stack.append(node)
            for nxt in sorted(g.get(node, ())):
                if state.get(nxt) == 1:
                    cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
                elif nxt in g and state.get(nxt) is None:
                    visit(nxt, stack)
            stack.pop()
            state[node] = 2

        for node in sorted(g):
            if state.get(node) is None:
                visit(node, [])
        assert cycles == [], "\n".join(cycles)


def test_click_only_on_the_command_line_layer() -> None:
    """Builders and libraries raise their own errors; only commands speak click."""
    wrong = []
    for path in sorted((SRC / "poste").rglob("*.py")):
        mod = module_name(path)
        tree = ast.parse(path.read_text())
        uses = any(
            (isinstance(n, ast.Import) and any(a.name == "click" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "click")
            for n in ast.walk(tree)
        )
        if uses and layer(mod) != TOP and not mod.endswith((".service", ".command")):
            wrong.append(mod)
    assert wrong == [], wrong
