"""The package's layers: each imports only the layers below it, no module imports itself back, modules stay short."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "outbox_pipeline"

# Lowest first; the package root's modules (definitions, cli, the old paths kept for users) and the benches sit on top.
LAYERS = ["config", "stores", "producer", "relay", "monitoring", "orchestration"]
TOP = len(LAYERS)
# Layers an application or the relay core load: Dagster stays out of them at import time.
WITHOUT_DAGSTER = {"config", "stores", "producer", "relay"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else TOP


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every import of the package's own modules."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                name = candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() else node.module
                found.append((name, id(node) in top_level))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, id(node) in top_level) for alias in node.names)
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def own_imports(module: str) -> list[str]:
    return [name for name, _ in imports(MODULES[module]) if name.startswith("outbox_pipeline") and name in MODULES]


def test_every_import_points_down_the_layers():
    upward = [
        f"{module} imports {target}"
        for module in MODULES
        if module != "outbox_pipeline"  # the root's public names are imported on first use
        for target in own_imports(module)
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_no_import_cycle():
    graph = {module: set(own_imports(module)) - {"outbox_pipeline"} for module in MODULES}
    cycles = []

    def visit(module: str, stack: list[str], done: set[str]) -> None:
        for target in graph[module]:
            if target in stack:
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in done:
                visit(target, [*stack, target], done)
        done.add(module)

    done: set[str] = set()
    for module in graph:
        if module not in done:
            visit(module, [module], done)
    assert cycles == []


@pytest.mark.parametrize("module", [m for m in MODULES if m.split(".")[1:2] and m.split(".")[1] in WITHOUT_DAGSTER])
def test_the_lower_layers_do_not_load_dagster_at_import(module):
    assert [name for name, top in imports(MODULES[module]) if top and name.split(".")[0] == "dagster"] == []


def test_no_module_is_over_400_lines():
    assert [f"{m} ({n})" for m, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400] == []


def test_the_public_names_come_from_the_package_root():
    import outbox_pipeline

    assert {name: getattr(outbox_pipeline, name).__name__ for name in outbox_pipeline.__all__} == {
        "OutboxEvent": "OutboxEvent", "OutboxRelay": "OutboxRelay", "RawEvent": "RawEvent",
        "publish": "publish", "publish_many": "publish_many",
    }
