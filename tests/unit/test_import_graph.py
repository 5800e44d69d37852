"""peftlab's modules import each other without cycles, read from the source with ``ast`` (nothing is imported).

An edge ``a -> b`` is an ``import`` of peftlab module ``b`` (or of a name from it) in ``a``; importing
``peftlab.x.y`` also runs the package ``peftlab.x``'s ``__init__``, so it is an edge to that package too (except
from inside the package, which is being initialised already). Function-local imports are counted: they are
the usual way to hide a cycle, and their number may only go down.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "peftlab"
#: function-local imports of peftlab/ (any module): 222 before issue #29, 208 after its refactor, 263 once the
#: chat, evaluation, serving and tracker work was merged; lower it when you remove some
LOCAL_IMPORTS_MAX = 249


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, package: str, known: dict) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            anchor = package
            for _ in range(node.level - 1):
                anchor = anchor.rpartition(".")[0]
            base = f"{anchor}.{base}" if base else anchor
        # `from peftlab.methods import lora` imports the submodule; `from peftlab.methods import LoRA` the package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return [n for n in names if n == "peftlab" or n.startswith("peftlab.")]


def _module_of(name: str, known: dict) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]], int]:
    """(module-level edges, function-local edges, number of function-local imports), package edges included."""
    known = modules()
    top: dict[str, set[str]] = {m: set() for m in known}
    local: dict[str, set[str]] = {m: set() for m in known}
    count = 0
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            edges = local if id(node) in in_function else top
            count += id(node) in in_function
            for target in _targets(node, package, known):
                target = _module_of(target, known)
                parts = target.split(".") if target else []
                # the target and every package above it that the importer is not inside of
                for i in range(1, len(parts) + 1):
                    owner = ".".join(parts[:i])
                    if owner in known and owner != name and not name.startswith(owner + "."):
                        edges[name].add(owner)
    return top, local, count


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_package_init():
    graph = {"peftlab.a": {"peftlab.methods"}, "peftlab.methods": {"peftlab.methods.base"},
             "peftlab.methods.base": {"peftlab.a"}, "peftlab.b": {"peftlab.a"}}
    assert cycles(graph) == [["peftlab.a", "peftlab.methods", "peftlab.methods.base"]]
    assert cycles({"peftlab.a": {"peftlab.b"}, "peftlab.b": set()}) == []


def test_the_graph_reads_package_edges_and_local_imports():
    top, local, count = import_graph()
    # peftlab.api imports peftlab.adapters at module level; the registry is in peftlab.methods (its __init__ runs)
    assert "peftlab.adapters" in top["peftlab.api"]
    assert {"peftlab.methods", "peftlab.methods.registry"} <= local["peftlab.api"]
    assert "peftlab.methods" not in top["peftlab.methods.base"]  # inside the package: no edge to its __init__
    assert count > 0


def test_no_import_cycle_among_peftlab_modules():
    top, _, _ = import_graph()
    assert cycles(top) == [], "module-level import cycle"


def test_no_import_cycle_through_function_local_imports():
    top, local, _ = import_graph()
    both = {m: top[m] | local[m] for m in top}
    assert cycles(both) == [], "import cycle through a function-local import: give the shared code its own module"


def test_function_local_imports_do_not_grow():
    _, _, count = import_graph()
    assert count <= LOCAL_IMPORTS_MAX, (f"{count} function-local imports in peftlab/ (at most {LOCAL_IMPORTS_MAX}); "
                                        "import at module level unless the import is heavy or optional")


def test_the_unit_boundary_fails_a_test_that_starts_a_process_or_loads_a_packaged_model():
    """The unit guard (tests/conftest.py's _unit_boundary): what would make a unit test an integration test fails it, naming the fix."""
    import subprocess
    import sys

    from transformers import AutoModel

    from peftlab import assets

    with pytest.raises(AssertionError, match="belongs in tests/integration/"):
        subprocess.run([sys.executable, "-c", "pass"])
    with pytest.raises(AssertionError, match="belongs in tests/integration/"):
        AutoModel.from_pretrained(assets.resolve_model("packaged:all-MiniLM-L6-v2"))
    assert subprocess.run(["git", "--version"], capture_output=True).returncode == 0  # a fact a run record names


def test_the_base_class_module_stays_small():
    """methods/base.py holds the lifecycle only (#29): the loss, optimizer, checkpoints, capabilities and registry
    have their own modules, and a new concern gets one too rather than growing the base class past 500 lines."""
    lines = (PACKAGE / "methods" / "base.py").read_text(encoding="utf-8").count("\n")
    assert lines < 500, f"peftlab/methods/base.py has {lines} lines; move a concern into its own module"
