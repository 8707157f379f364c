"""The package's modules import one another without a circle (issue #29): every `from himerge.x import`, `from .x
import`, `import himerge.x`, at module level, inside a function or under `TYPE_CHECKING`, and every deferred
`lazy("himerge.x")` (himerge.lazy), is an edge, and the graph they make is acyclic."""
import ast
from pathlib import Path

import himerge

PACKAGE = Path(himerge.__file__).parent


def imported_modules(tree: ast.AST, package: str = "himerge") -> set:
    "The package's modules a module's syntax tree imports, wherever the import sits."
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: base = node.module                   # from .x import y; from . import x
            elif node.level == 0 and node.module and node.module.split(".")[0] == package:
                base = node.module.partition(".")[2] or None          # from himerge.x import y; from himerge import x
            else: continue
            if base: found.add(base.split(".")[0])
            else: found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")}
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "lazy"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and node.args[0].value.startswith(package + ".")):
            found.add(node.args[0].value.split(".")[1])              # lazy("himerge.x"): imported on first use
    return found


def import_graph() -> dict:
    "module -> the package's modules it imports (`__init__` and the generated `_modidx` left out)."
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")}
    return {name: sorted(imported_modules(ast.parse(path.read_text())) & set(modules) - {name})
            for name, path in modules.items()}


def find_cycle(graph: dict) -> list | None:
    "One circle of `graph` as [a, b, ..., a], or None."
    state, stack = {}, []
    def visit(node):
        state[node] = "open"; stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open": return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)): return cycle
        state[node] = "done"; stack.pop()
        return None
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)): return cycle
    return None


def test_finds_a_planted_cycle():
    "The checker itself: a graph with a circle is caught, one without is not."
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None
    tree = ast.parse("from .x import y\nimport himerge.z\n"
                     "def f():\n    from himerge.w import v\n    from himerge import u\n"
                     "_t, _l = lazy('torch'), lazy('himerge.later')\n")
    assert imported_modules(tree) == {"x", "z", "w", "u", "later"}


# Edges allowed to close a circle, each with its reason. None: `ConfigError` and the YAML reader live in
# `config_file`, below both `config` and `mergekit_config`, so `config` can read a mergekit YAML through the latter.
KNOWN: set = set()


def test_package_import_graph_is_acyclic():
    graph = import_graph()
    assert {"plan", "run", "report"} <= set(graph["merge"])      # the graph is read (an empty one would pass)
    for a, b in KNOWN: assert b in graph[a], f"{a} no longer imports {b}: remove the edge from KNOWN"
    cycle = find_cycle({a: [b for b in bs if (a, b) not in KNOWN] for a, bs in graph.items()})
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_gains_and_merge_sit_where_the_issue_puts_them():
    "Gains import nothing of himerge; merge imports neither the comparison nor the zoo; the zoo sits above merge."
    graph = import_graph()
    assert graph["gains"] == []
    assert not {"compare", "zoo", "card"} & set(graph["merge"])
    assert "merge" in graph["zoo"] and "compare" not in graph["zoo"] and "compare" not in graph["card"]
