"""The architecture's boundaries, checked statically: every import of every module in olacache/ and olatrain/
(top-level and lazy, i.e. inside functions; ``if TYPE_CHECKING:`` blocks excluded), parsed with ``ast``.

Rules (README "Layout"; docs/method.md §8 for why the contract is what it is):
- no import cycle anywhere in the two packages;
- olatrain imports from olacache only the contract: ``olacache.store``, ``olacache.inputs``, ``olacache.common``
  (plus ``olacache.teachers``, lazily, from ``olatrain/online.py`` alone);
- the layers of olacache stay in order: inputs and common import nothing above them, the store imports only
  inputs/common, teachers never import the build;
- the data pipeline (``olatrain/data``) never imports the model, the trainer or any teacher.
The runtime counterpart (a cached-targets PT step imports no teacher module) is in test_train.py.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("olacache", "olatrain")
# the only olatrain modules that may import teacher code, lazily: the online-targets adapter and the `olatrain show`
# inspection command (its --decode runs the depth teacher's head); nothing in the package imports the latter
TEACHER_DOORS = ("olatrain.online", "olatrain.show")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for sub in child.orelse:
                yield from _walk_stmt(sub, lazy)
            continue
        inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield child, inner
        yield from _walk(child, inner)


def _walk_stmt(stmt: ast.AST, lazy: bool) -> Iterator[tuple[ast.AST, bool]]:
    yield stmt, lazy
    yield from _walk(stmt, lazy)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported module, lazy, line) for every import statement of ``module``. ``from a import b`` counts as an
    import of ``a.b`` when that is a known module, else of ``a``."""
    out: list[tuple[str, bool, int]] = []
    for node, lazy in _walk(ast.parse(source), False):
        if isinstance(node, ast.Import):
            out += [(a.name, lazy, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in known else target, lazy, node.lineno))
    return out


def import_graph(root: Path) -> dict[str, list[tuple[str, bool, int]]]:
    """module -> its imports of modules inside the packages (and of anything else, for the boundary rules)."""
    files = {
        _module_name(p, root): p for pkg in PACKAGES if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py")
    }
    known = set(files)
    return {m: imports_of(p.read_text(), m, p.name == "__init__.py", known) for m, p in files.items()}


def find_cycle(graph: dict[str, list[tuple[str, bool, int]]]) -> list[str] | None:
    """One import cycle among the graph's own modules, or None."""
    edges = {m: sorted({t for t, _, _ in imps if t in graph and t != m}) for m, imps in graph.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(graph: dict[str, list[tuple[str, bool, int]]]) -> list[str]:
    """Every import that breaks a boundary rule (see the module docstring), as 'module:line -> target (why)'."""
    bad = []
    for m, imps in sorted(graph.items()):
        for target, lazy, line in imps:
            where = f"{m}:{line} -> {target}"
            if _under(m, "olatrain") and _under(target, "olacache"):
                if _under(target, "olacache.teachers"):
                    if not (m in TEACHER_DOORS and lazy):
                        bad.append(f"{where} (teacher code only through olatrain/online.py or the inspection "
                                   "command olatrain/show.py, lazily)")
                elif not _under(target, "olacache.store", "olacache.inputs", "olacache.common"):
                    bad.append(f"{where} (olatrain may use only olacache.store/inputs/common)")
            if _under(m, "olatrain.data") and (
                _under(target, "olatrain.model", "olatrain.train", "olatrain.online", "olacache.teachers")
                or _under(target, "diffusers")
            ):
                bad.append(f"{where} (the data pipeline never imports the model, the trainer or a teacher)")
            if _under(m, "olacache.inputs", "olacache.common") and _under(target, "olacache", "olatrain") and not (
                _under(target, m.rsplit(".", 1)[0] if m.count(".") > 1 else m)
            ):
                bad.append(f"{where} (inputs/common sit below everything else)")
            if _under(m, "olacache.store") and _under(target, "olacache.teachers", "olacache.build",
                                                       "olacache.shards", "olacache.verify", "olatrain"):
                bad.append(f"{where} (the store sits below teachers and the build)")
            if _under(m, "olacache.teachers") and _under(target, "olacache.build", "olacache.shards", "olatrain"):
                bad.append(f"{where} (teachers never import the build or the trainer)")
    return bad


# ----------------------------------------------------------------------------------------------- the rules


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, bool, int]]]:
    return import_graph(ROOT)


def test_no_import_cycle(graph) -> None:
    assert len(graph) > 40  # the walk found the packages
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_boundaries_hold(graph) -> None:
    assert violations(graph) == []


def test_online_adapter_is_the_only_lazy_door(graph) -> None:
    doors = [(m, lazy) for m, imps in graph.items() for t, lazy, _ in imps
             if _under(m, "olatrain") and _under(t, "olacache.teachers")]
    assert doors and all(m in TEACHER_DOORS and lazy for m, lazy in doors)
    assert any(m == "olatrain.online" for m, _ in doors)


def _closure(graph: dict[str, list[tuple[str, bool, int]]], start: str) -> set[str]:
    """Every module ``start`` can import, directly or through others (lazy imports included)."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen or m not in graph:
            continue
        seen.add(m)
        todo += [t for t, _, _ in graph[m]]
    return seen


def test_show_is_an_island_and_probing_sweeping_reach_no_teacher(graph) -> None:
    """olatrain/show.py is imported by no module of the packages (only the CLI's `show` command), and nothing
    that probing, sweeping or training can import reaches teacher code or show.py (online.py, the opt-in live
    teachers of `train.targets: online`, is the one exception the training path has)."""
    importers = [m for m, imps in graph.items() for t, _, _ in imps if t == "olatrain.show"]
    assert importers == []
    for start in ("olatrain.probe", "olatrain.probe_source", "olatrain.sweep", "olatrain.sweep_summary",
                  "olatrain.report", "olatrain.plots"):
        # the training loop's lazy door to online teachers (opt-in) is cut; what remains must be teacher-free
        reach = _closure_without(graph, start, "olatrain.online")
        assert start in reach
        bad = sorted(m for m in reach if _under(m, "olacache.teachers") or m == "olatrain.show")
        assert not bad, (start, bad)
    # the check can fail: show.py itself reaches teacher code
    assert any(_under(m, "olacache.teachers") for m in _closure(graph, "olatrain.show"))


def _closure_without(graph: dict[str, list[tuple[str, bool, int]]], start: str, cut: str) -> set[str]:
    g = {m: [(t, lz, ln) for t, lz, ln in imps if not _under(t, cut)] for m, imps in graph.items()}
    return _closure(g, start)


# ----------------------------------------------------------------------------------------------- the checker


def _fake_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_finds_a_cycle_and_a_data_module_importing_a_teacher(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path, {
        "olacache/__init__.py": "",
        "olacache/teachers/__init__.py": "",
        "olacache/store/__init__.py": "from olacache.store.a import x\n",
        "olacache/store/a.py": "def f():\n    from olacache.store.b import y\n",  # lazy imports count too
        "olacache/store/b.py": "from . import a\n",
        "olatrain/__init__.py": "",
        "olatrain/data/__init__.py": "",
        "olatrain/data/dataset.py": "import typing\nif typing.TYPE_CHECKING:\n    import olatrain.model\n"
                                    "def g():\n    from olacache.teachers import load_teacher\n",
    })
    g = import_graph(root)
    cycle = find_cycle(g)
    assert cycle is not None and {"olacache.store.a", "olacache.store.b"} <= set(cycle)
    bad = violations(g)
    assert any("olatrain.data.dataset:5 -> olacache.teachers" in b for b in bad)
    assert not any("olatrain.model" in b for b in bad)  # TYPE_CHECKING-only imports do not count
