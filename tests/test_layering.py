"""The dependency line: blip_core imports neither Prefect, duckdb nor `data`; data holds no model code."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> set[str]:
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_blip_core_imports_only_the_model_stack() -> None:
    forbidden = {"prefect", "duckdb", "data", "tasks", "flows", "pyarrow", "img2dataset", "typer", "fsspec", "s3fs"}
    assert not (_imports("blip_core") & forbidden)


def test_data_imports_no_model_or_orchestration() -> None:
    assert not (_imports("data") & {"blip_core", "tasks", "flows", "prefect"})


def test_tasks_do_not_import_flows() -> None:
    assert "flows" not in _imports("tasks")


# ----------------------------------------------------------------------------- no import circles

PROJECT = ("blip_core", "data", "tasks", "flows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PROJECT for p in (ROOT / package).rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` lives in (`pkg.mod.attr` -> `pkg.mod`), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement reaches: `from pkg import sub` names `pkg.sub`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parent = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(parent[: len(parent) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def _import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports, at module level or inside functions.

    Importing a submodule is not counted as importing its package's `__init__`."""
    modules = _project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node, name, path.name == "__init__.py"):
                    found = _resolve(target, modules)
                    if found and found != name:
                        graph[name].add(found)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as `[a, b, ..., a]`, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_cycle_finder_reports_a_circle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_project_has_no_import_cycles() -> None:
    graph = _import_graph()
    assert "blip_core.med" in graph["blip_core.train.state"]  # the graph sees real imports
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


# ----------------------------------------------------------------------------- no Prefect in tasks/


def test_tasks_do_not_import_prefect() -> None:
    """Stages are plain functions; their Prefect tasks live in `flows.steps`."""
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "tasks").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(name.split(".")[0] == "prefect" for name in _imported(node, _module_name(path), False))
    ]
    assert not offenders, f"prefect imported in tasks/: {offenders}"


# ----------------------------------------------------------------------------- one atomic write per layer

# The only functions that rename a file or folder into place: `data.shards.atomic_path` for
# data / tasks / flows, and its copy in `blip_core.atomic` (blip_core may not import data).
RENAMERS = {"data.shards.atomic_path", "blip_core.atomic.atomic_path", "blip_core.atomic.replace_folder"}


def _is_rename(call: ast.Call) -> bool:
    """`os.replace` / `os.rename` / `shutil.move`, or `<path>.replace(target)` / `<path>.rename(target)`.

    `Path.replace` is told from `str.replace(old, new)` by its single argument;
    `dataclasses.replace(obj, **changes)` is left out by name."""
    func = call.func
    if not isinstance(func, ast.Attribute) or func.attr not in {"replace", "rename", "renames", "move"}:
        return False
    owner = func.value.id if isinstance(func.value, ast.Name) else None
    if owner in {"os", "shutil"}:
        return True
    return func.attr in {"replace", "rename"} and owner != "dataclasses" and len(call.args) == 1 and not call.keywords


def _renames_by_function() -> dict[str, list[int]]:
    """Qualified name of the enclosing function (or the module) -> lines of its renames."""
    found: dict[str, list[int]] = {}

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}"
            elif isinstance(child, ast.Call) and _is_rename(child):
                found.setdefault(scope, []).append(child.lineno)
            visit(child, inner)

    for name, path in _project_modules().items():
        visit(ast.parse(path.read_text()), name)
    return found


def test_rename_finder_tells_path_replace_from_str_replace() -> None:
    calls = [ast.parse(src).body[0].value for src in ("os.replace(a, b)", "tmp.replace(dst)", "Path(t).rename(d)")]
    assert all(isinstance(c, ast.Call) and _is_rename(c) for c in calls)
    others = [ast.parse(src).body[0].value for src in ('s.replace("a", "b")', "dataclasses.replace(cfg)", "x.rename()")]
    assert not any(isinstance(c, ast.Call) and _is_rename(c) for c in others)


def test_files_are_renamed_into_place_by_one_function() -> None:
    found = _renames_by_function()
    assert set(found) <= RENAMERS, {k: v for k, v in found.items() if k not in RENAMERS}
    assert set(found) == RENAMERS  # the allow-list names functions that still exist
