"""Imports run one way: pico_hf's import graph, read from the source (not by importing), follows the layers that
docs/development.md states, and has no cycle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pico_hf"

# Lowest first: a module imports from its own layer and the layers below it, never from one above.
# A module belongs to the layer of the longest name below that it starts with.
LAYERS = [
    ("core", ["pico_hf.configuration", "pico_hf.assets", "pico_hf.hub_access", "pico_hf.tokenization"]),
    ("models", ["pico_hf", "pico_hf._auto", "pico_hf.models"]),
    ("learning-dynamics measures", ["pico_hf.learning_dynamics", "pico_hf.learning_dynamics.components",
                                    "pico_hf.learning_dynamics.metrics", "pico_hf.learning_dynamics.capture",
                                    "pico_hf.learning_dynamics.tracker"]),
    ("training", ["pico_hf.training"]),
    ("evaluation and learning-dynamics analysis", ["pico_hf.evaluation", "pico_hf.learning_dynamics.callback",
                                                   "pico_hf.learning_dynamics.analysis_config",
                                                   "pico_hf.learning_dynamics.analysis_sources",
                                                   "pico_hf.learning_dynamics.analyze",
                                                   "pico_hf.learning_dynamics.report"]),
    ("hub", ["pico_hf.hub", "pico_hf.convert"]),  # convert's CLI writes the export's card
    ("the run builder", ["pico_hf.training.run"]),
    ("study", ["pico_hf.study"]),
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """The pico_hf modules `name` imports anywhere in its source (inside functions too: a deferred import is
    still a dependency; only `if TYPE_CHECKING:` blocks, which never run, are left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for statement in block.body
        for node in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` imports the module x when there is one
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS and to docs/development.md"
    return max(matches)[1]


def test_the_graph_is_read_from_the_source():
    assert "pico_hf.training.trainer" in GRAPH["pico_hf.training.run"]
    assert (
        "pico_hf.models.pico_decoder" in GRAPH["pico_hf.training.run"]
    )  # `from ..models.pico_decoder import`
    assert GRAPH["pico_hf.configuration"] == set()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for target in sorted(GRAPH[module])
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" once every import is explored

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
