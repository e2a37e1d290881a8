"""The package's shape: no import circle among the modules of src/ownllm, and storage that knows no stage and no
foreign format. Read from the source with `ast` (module-level imports; those under `if TYPE_CHECKING:` are for type
checkers only and never run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ownllm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            yield from _top_level_imports(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level_imports(node.body + node.orelse + node.finalbody
                                          + [s for h in node.handlers for s in h.body])


def imported_modules(name: str) -> set[str]:
    """The ownllm modules that importing `name` imports at once (its module-level import statements)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # a relative import
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names)  # `from ownllm import checkpoint`
    return {module for module in found if module in MODULES and module != name}


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "ownllm.checkpoint" in graph["ownllm.runs"] and "ownllm.interop.hf" in graph["ownllm.runs"]
    assert "ownllm.checkpoint" in graph["ownllm.training"]  # `from ownllm import checkpoint, distributed`
    assert "ownllm.cli.train" in graph["ownllm.cli"]  # `from ownllm.cli import ..., train, use`


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_storage_imports_no_stage_and_no_foreign_format():
    path = MODULES["ownllm.checkpoint"]
    every_import = [node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                    if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name for node in every_import if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module or "" for node in every_import if isinstance(node, ast.ImportFrom)}
    names |= {f"{node.module}.{alias.name}" for node in every_import if isinstance(node, ast.ImportFrom)
              for alias in node.names}
    forbidden = [n for n in names if n.startswith(("ownllm.finetune", "ownllm.interop", "ownllm.runs",
                                                   "ownllm.pretrain", "ownllm.training", "ownllm.serve"))]
    assert forbidden == []


def test_the_cli_is_not_imported_by_the_api():
    graph = import_graph()
    for name, imported in graph.items():
        if not name.startswith(("ownllm.cli", "ownllm.__main__")):
            assert not {m for m in imported if m.startswith("ownllm.cli")}, name


def test_every_training_flag_is_a_parameter_of_its_stage():
    """The flag tables hold no defaults (the functions' signatures do): each flag must name a real parameter."""
    import dataclasses
    import inspect

    from ownllm.cli.options import MODEL_OVERRIDES, PRETRAIN, RUN, TRAIN
    from ownllm.cli.train import STAGES, _stage_tables
    from ownllm.config import ModelConfig, TrainConfig
    from ownllm.finetune import finetune_classify, finetune_instruct
    from ownllm.pretrain import pretrain

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(MODEL_OVERRIDES) <= model_fields
    for function, tables in ((pretrain, (PRETRAIN, RUN, TRAIN)),
                             (finetune_classify, _stage_tables(STAGES["classify"])),
                             (finetune_instruct, _stage_tables(STAGES["instruct"]))):
        parameters = inspect.signature(function).parameters
        for option in (o for table in tables for o in table if o.to_api):
            assert (option.keyword in parameters or option.keyword in train_fields
                    or (function is pretrain and option.keyword in MODEL_OVERRIDES)), (function.__name__, option)
