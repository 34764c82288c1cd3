"""No import cycles between the packages (read with ``ast``; nothing is imported).

Units: each subpackage of ``mxmoe_jax`` (``quant``, ``models``, ``kernels``, ``calib``, ...) and
each top-level module (``mxmoe_jax.ops``, ``mxmoe_jax.config``, ...), ``kernels/`` and
``convert/`` under the names pyproject's ``package-dir`` installs them as. Every import counts:
module-level and function-local, ``import x`` and ``from x import y`` (relative ones resolved),
``importlib.import_module("literal")``; only those under ``if TYPE_CHECKING:`` are skipped. A
function-local import dodges a cycle at run time, not in the layering (../shared/ARCHITECTURE.md).
A failure lists every strongly connected component of more than one unit, one import per edge.
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest
from conftest import REPO

ROOT_PACKAGE = "mxmoe_jax"


@dataclasses.dataclass(frozen=True, slots=True)
class Import:
    """One import statement's target module, where it is written."""

    target: str  # absolute dotted name (for ``from m import n``: ``m.n`` when that is a module)
    file: str  # path relative to the repository
    line: int
    code: str  # the statement, for the failure message


def package_roots(repo: Path) -> dict[str, Path]:
    """Dotted package name -> its folder, from pyproject's ``[tool.setuptools] package-dir``."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: repo / folder for name, folder in meta["package-dir"].items()}


def module_files(roots: Mapping[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the roots (``__init__`` = package)."""
    out: dict[str, Path] = {}
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((package, *rel))] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node``, leaving out the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                yield sub
                yield from _statements(sub)
            continue
        yield child
        yield from _statements(child)


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        if level - 1 > len(parts):
            raise ValueError(f"{module}: relative import beyond the top package")
        parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, name] if name else parts)


def read_imports(module: str, path: Path, known: Iterable[str], repo: Path) -> list[Import]:
    """The internal imports of one file (targets under ``ROOT_PACKAGE``)."""
    known = set(known)
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    rel = str(path.relative_to(repo)) if path.is_relative_to(repo) else str(path)
    is_package = path.name == "__init__.py"
    out = []

    def add(target: str, node: ast.AST) -> None:
        if target == ROOT_PACKAGE or target.startswith(ROOT_PACKAGE + "."):
            code = (ast.get_source_segment(source, node) or "").split("\n")[0]
            out.append(Import(target, rel, node.lineno, code))

    for node in _statements(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module)
                    if node.level else node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node)
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "import_module"))):
            add(node.args[0].value, node)
    return out


def unit_of(module: str) -> str:
    """The layering unit of a module: ``mxmoe_jax.<first component>`` (or the root itself)."""
    return ".".join(module.split(".")[:2])


def unit_graph(imports: Iterable[tuple[str, Import]]) -> dict[tuple[str, str], list[Import]]:
    """(source unit, target unit) -> the import statements that make the edge (one per
    ``file:line``); self edges dropped."""
    edges: dict[tuple[str, str], list[Import]] = {}
    for module, imp in imports:
        edge = (unit_of(module), unit_of(imp.target))
        if edge[0] == edge[1]:
            continue
        seen = edges.setdefault(edge, [])
        if not seen or (seen[-1].file, seen[-1].line) != (imp.file, imp.line):
            seen.append(imp)
    return edges


def strongly_connected(nodes: Iterable[str], edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (each sorted; the list sorted)."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                comps.append(sorted(comp))
    return sorted(comps)


def cycles(edges: Mapping[tuple[str, str], list[Import]]) -> list[tuple[list[str], list[str]]]:
    """Each component of more than one unit, with a line per edge inside it: its first import
    (and how many more make the same edge)."""
    out = []
    for comp in strongly_connected([], edges):
        if len(comp) < 2:
            continue
        inside = set(comp)
        lines = []
        for (a, b), imps in sorted(edges.items()):
            if a in inside and b in inside:
                more = f"  (+{len(imps) - 1} more)" if len(imps) > 1 else ""
                lines.append(f"  {a} -> {b}: {imps[0].file}:{imps[0].line}  {imps[0].code}{more}")
        out.append((comp, lines))
    return out


def repository_edges(repo: Path = REPO) -> dict[tuple[str, str], list[Import]]:
    files = module_files(package_roots(repo))
    imports = [(module, imp) for module, path in files.items()
               for imp in read_imports(module, path, files, repo)]
    return unit_graph(imports)


def test_no_import_cycles_between_packages():
    found = cycles(repository_edges())
    message = [f"{len(found)} import cycle(s) between packages (units: mxmoe_jax.<package> or a "
               "top-level module); each edge with one import that makes it:"]
    for comp, lines in found:
        message.append(" <-> ".join(comp))
        message.extend(lines)
    if found:
        pytest.fail("\n".join(message), pytrace=False)


# -- the checker itself, on synthetic graphs and files -------------------------------------------


def test_strongly_connected_finds_exactly_the_cycles():
    edges = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a"), ("e", "f"), ("f", "e"), ("f", "g"),
             ("h", "h")]
    comps = strongly_connected(["z"], edges)
    assert [c for c in comps if len(c) > 1] == [["a", "b", "c"], ["e", "f"]]
    assert ["z"] in comps and ["h"] in comps and ["d"] in comps
    assert all(len(c) == 1 for c in strongly_connected([], [("a", "b"), ("b", "c"), ("a", "c")]))


def test_cycles_report_every_edge_inside_a_component():
    def imp(line):
        return Import("t", "f.py", line, "import t")

    edges = {("x.a", "x.b"): [imp(1)], ("x.b", "x.c"): [imp(2)], ("x.c", "x.a"): [imp(3)],
             ("x.b", "x.a"): [imp(4), imp(6)], ("x.c", "x.d"): [imp(5)]}
    [(comp, lines)] = cycles(edges)
    assert comp == ["x.a", "x.b", "x.c"]
    assert [ln.split(":")[0].strip() for ln in lines] == [
        "x.a -> x.b", "x.b -> x.a", "x.b -> x.c", "x.c -> x.a"]
    assert "f.py:4" in lines[1] and lines[1].endswith("(+1 more)")
    assert cycles({("x.a", "x.b"): [imp(1)]}) == []


def test_reader_sees_local_relative_and_dynamic_imports_but_not_type_checking(tmp_path):
    pkg = tmp_path / "mxmoe_jax"
    (pkg / "p" / "sub").mkdir(parents=True)
    (pkg / "q").mkdir()
    for f in ("__init__.py", "p/__init__.py", "p/sub/__init__.py", "q/__init__.py", "q/mod.py",
              "r.py", "s.py", "t.py", "u.py"):
        (pkg / f).touch()
    (pkg / "p" / "sub" / "m.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import numpy\n"
        "from .. import sibling\n"          # mxmoe_jax.p (sibling is no module): unit p
        "from ...q import mod\n"            # mxmoe_jax.q.mod
        "if TYPE_CHECKING:\n"
        "    from mxmoe_jax import t\n"     # skipped
        "else:\n"
        "    import mxmoe_jax.u\n"          # kept: the else branch runs
        "def f():\n"
        "    from mxmoe_jax import r\n"     # function-local: counted
        "    import importlib\n"
        "    return importlib.import_module('mxmoe_jax.s')\n")
    roots = {"mxmoe_jax": pkg}
    files = module_files(roots)
    assert "mxmoe_jax.p.sub.m" in files and "mxmoe_jax.p" in files
    got = read_imports("mxmoe_jax.p.sub.m", files["mxmoe_jax.p.sub.m"], files, tmp_path)
    assert [(i.target, i.line) for i in got] == [
        ("mxmoe_jax.p", 3), ("mxmoe_jax.q.mod", 4), ("mxmoe_jax.u", 8), ("mxmoe_jax.r", 10),
        ("mxmoe_jax.s", 12)]
    assert got[0].file == "mxmoe_jax/p/sub/m.py" and got[1].code == "from ...q import mod"
    edges = unit_graph([("mxmoe_jax.p.sub.m", i) for i in got])
    assert set(edges) == {("mxmoe_jax.p", u) for u in
                          ("mxmoe_jax.q", "mxmoe_jax.u", "mxmoe_jax.r", "mxmoe_jax.s")}


def test_checkout_folders_map_under_the_namespace():
    files = module_files(package_roots(REPO))
    assert files["mxmoe_jax.kernels.pallas.tuning"] == REPO / "kernels" / "pallas" / "tuning.py"
    assert files["mxmoe_jax.convert"] == REPO / "convert" / "__init__.py"
    edges = repository_edges()
    assert ("mxmoe_jax.kernels", "mxmoe_jax.quant") in edges  # kernels/pallas/tuning.py's import
