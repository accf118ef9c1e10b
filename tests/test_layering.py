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
    forbidden = {"prefect", "duckdb", "data", "tasks", "flows", "pyarrow", "img2dataset", "typer"}
    assert not (_imports("blip_core") & forbidden)


def test_data_imports_no_model_or_orchestration() -> None:
    assert not (_imports("data") & {"blip_core", "tasks", "flows", "prefect"})


def test_tasks_do_not_import_flows() -> None:
    assert "flows" not in _imports("tasks")
