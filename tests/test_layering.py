"""Imports inside tsq_vllm point only downward: core → format → checkpoint/data/models →
quantize/kernels → serve/eval/CLIs, read from the source with `ast` (nothing is imported).

A module may import its own subpackage and any lower layer; modules of one layer do not import
each other's subpackages. The package root only holds the version and a lazy `load_quantized`,
so anything may import it. The one allowed import cycle is vLLM's config ↔ linear-method pair.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tsq_vllm"

LAYERS = {
    "core": 0,
    "format": 1,
    "checkpoint": 2,
    "data": 2,
    "models": 2,
    "quantize": 3,
    "kernels": 3,
    "serve": 4,
    "eval": 4,
}
ALLOWED_CYCLES = [{"tsq_vllm.serve.config", "tsq_vllm.serve.linear"}]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every tsq_vllm module `path` imports, anywhere in the file (also lazily, in functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "tsq_vllm")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "tsq_vllm":
                continue
            # `from pkg import name` may name a submodule: count it as that module.
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if _exists(sub) else mod)
    return out


def _exists(module: str) -> bool:
    p = PKG.parent.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def test_every_subpackage_has_a_layer():
    assert {_layer(m) for m in MODULES} - {None} <= set(LAYERS), "add the new subpackage to LAYERS"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    src = _layer(module)
    if src is None:
        return  # the root is the facade; its eager imports are checked below
    for target in sorted(GRAPH[module]):
        dst = _layer(target)
        if dst is None or dst == src:
            continue
        assert LAYERS[dst] < LAYERS[src], (
            f"{module} imports {target}: layer {dst!r} ({LAYERS[dst]}) is not below {src!r} "
            f"({LAYERS[src]})"
        )


def test_root_imports_nothing_eagerly():
    tree = ast.parse((PKG / "__init__.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(n, ast.ImportFrom) and n.module in ("__future__", "typing") for n in top)


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_but_the_vllm_pair():
    # A package's __init__ re-exporting its modules is not a cycle of the code itself.
    graph = {
        m: {t for t in ts if not (MODULES[m].name == "__init__.py" and t.startswith(m + "."))}
        for m, ts in GRAPH.items()
    }
    graph = {m: {t for t in ts if t in graph} for m, ts in graph.items()}
    assert all(c in ALLOWED_CYCLES for c in _cycles(graph)), _cycles(graph)


def test_the_checker_sees_imports():
    """An oracle for the parser: known edges are found (relative, absolute and lazy imports)."""
    assert "tsq_vllm.format.gptq" in GRAPH["tsq_vllm.kernels.reference"]
    assert "tsq_vllm.serve.linear" in GRAPH["tsq_vllm.serve.config"]
    assert "tsq_vllm.checkpoint.hf" in GRAPH["tsq_vllm"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]
