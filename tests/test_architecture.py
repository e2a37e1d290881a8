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


def test_every_training_flag_is_an_option_of_its_stage():
    """A training verb's flags are its options dataclass's fields (ownllm.options; a TrainConfig or ModelConfig field
    inside `train` or `model_overrides`), each read back into it; the stage function takes that dataclass."""
    import argparse
    import dataclasses
    import typing

    from ownllm.cli import build_parser
    from ownllm.cli.options import stage_options
    from ownllm.cli.train import STAGES
    from ownllm.finetune import finetune_classify, finetune_instruct, finetune_prefer
    from ownllm.options import PretrainOptions
    from ownllm.pretrain import pretrain

    verbs = {("pretrain",): (PretrainOptions, pretrain)}
    verbs.update({("finetune", name): (stage.options, function) for (name, stage), function in
                  zip(STAGES.items(), (finetune_classify, finetune_instruct, finetune_prefer))})
    parser = build_parser()
    for words, (options_type, function) in verbs.items():
        assert typing.get_type_hints(function)["options"] == options_type | None
        verb = parser
        for word in words:
            verb = next(a for a in verb._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
        fields = {f.name: f for f in dataclasses.fields(options_type)}
        for action in verb._actions:
            if action.dest in ("help", "nproc"):
                continue
            outer, _, inner = action.dest.partition(".")
            holder = fields[outer].metadata.get("fields_of")
            assert (inner in {f.name for f in dataclasses.fields(holder)}) if inner else holder is None, action.dest
        args = verb.parse_args(["--out", "run", "--lr", "0.5", "--device", "cpu", "--resume"])
        options = stage_options(args, options_type)
        assert (options.out, options.device, options.resume, options.train) == ("run", "cpu", True, {"lr": 0.5})
