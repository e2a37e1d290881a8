"""The package's shape, read from the source with `ast`: no import circle among the modules of src/ownllm (imports
under `if TYPE_CHECKING:` count: a circle there is a circle in the design), the layer table (which package may not
import which), no module using another module's private names, and storage that knows no stage and no foreign
format. An import inside a function is left out of the graph: that is how a module imports a heavy dependency
lazily, and it runs only when called."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ownllm"

# A row: modules whose name starts with the key -> name prefixes they may not import, directly or through other
# modules, anywhere in their files (inside functions too: a lazy import is still knowledge of that layer).
# `ownllm.chat` covers ownllm.chat_templates too.
FORBIDDEN_IMPORTS: dict[str, tuple[str, ...]] = {
    "ownllm.interop": ("ownllm.serve", "ownllm.training", "ownllm.finetune", "ownllm.pretrain", "ownllm.cli"),
    "ownllm.interop.readers": ("ownllm.runs", "ownllm.interop.writers"),  # plain data out; runs builds the model
    "ownllm.interop.names": ("ownllm.runs", "ownllm.interop.readers", "ownllm.interop.writers"),
    "ownllm.kvcache": ("ownllm.model",),
    "ownllm.checkpoint": ("ownllm.finetune", "ownllm.interop", "ownllm.runs", "ownllm.pretrain", "ownllm.training",
                          "ownllm.serve"),
    "ownllm.serve": ("ownllm.training", "ownllm.finetune", "ownllm.pretrain", "ownllm.distributed"),  # never trains
    "ownllm.decoding": ("ownllm.data", "ownllm.chat"),  # tokens -> text, no templates (ownllm.chat_templates too)
    "ownllm.retrieval": ("ownllm.serve",),
    "ownllm.chat": ("ownllm.data", "ownllm.training"),  # chat.py and chat_templates.py
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _module_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported, and those under `if TYPE_CHECKING:`; not the
    ones inside functions."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            yield from _module_level_imports(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _module_level_imports(node.body + node.orelse + node.finalbody
                                             + [s for h in node.handlers for s in h.body])
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _module_level_imports(node.body)


def _absolute(name: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against module `name`)."""
    if not node.level:
        return node.module or ""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(anchor + ([node.module] if node.module else []))


def imported_modules(name: str) -> set[str]:
    """The ownllm modules that module `name` imports at module level (TYPE_CHECKING imports included)."""
    found: set[str] = set()
    for node in _module_level_imports(ast.parse(MODULES[name].read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = _absolute(name, node)
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names)  # `from ownllm import checkpoint`
    return {module for module in found if module in MODULES and module != name}


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(name) for name in MODULES}


def every_import(name: str) -> set[str]:
    """The ownllm modules module `name` imports anywhere in its file (inside functions too), with the packages
    whose `__init__` such an import runs (`ownllm.finetune` for `ownllm.finetune.classify`; not `ownllm` itself)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, node)
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(2, len(m.split(".")))}
    return {module for module in found | parents if module in MODULES and module != name}


def full_import_graph() -> dict[str, set[str]]:
    return {name: every_import(name) for name in MODULES}


def layer_violations(graph: dict[str, set[str]], table: dict[str, tuple[str, ...]]) -> list[str]:
    """"A -> ... -> B" for each module A under a row of `table` that imports a module B the row forbids, directly
    or through other modules (the shortest such chain)."""
    found = []
    for name in sorted(graph):
        forbidden = tuple(prefix for row, prefixes in table.items() if name.startswith(row) for prefix in prefixes)
        if not forbidden:
            continue
        came_from = {name: ""}
        todo = [name]
        for module in todo:  # breadth first: `todo` grows while it is walked
            for nxt in sorted(graph[module] - came_from.keys()):
                came_from[nxt] = module
                todo.append(nxt)
        for module in sorted(m for m in came_from if m != name and m.startswith(forbidden)):
            chain = [module]
            while came_from[chain[-1]]:
                chain.append(came_from[chain[-1]])
            found.append(" -> ".join(reversed(chain)))
    return found


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


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_name_uses(name: str, source: str | None = None) -> list[str]:
    """Another ownllm module's private names that module `name` (its file, or `source`) uses: `from ownllm.x import
    _y`, or `x._y` where `x` is an ownllm module it imported (anywhere in the file, functions included)."""
    tree = ast.parse(source if source is not None else MODULES[name].read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}  # a local name -> the ownllm module it stands for
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                elif base in MODULES and base != name and _is_private(alias.name):
                    uses.append(f"from {base} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            chain = _dotted(node.value)
            module = aliases.get(chain, chain)  # `tokenizer._x`, or `ownllm.tokenizer._x` after `import ownllm...`
            if module in MODULES and module != name:
                uses.append(f"{module}.{node.attr}")
    return uses


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert {"ownllm.checkpoint", "ownllm.interop.readers.hf"} <= graph["ownllm.runs"]
    assert "ownllm.checkpoint" in graph["ownllm.training"]  # `from ownllm import checkpoint, distributed`
    assert "ownllm.cli.train" in graph["ownllm.cli"]  # `from ownllm.cli import ..., train, use`
    assert "ownllm.runs" in graph["ownllm"]  # under `if TYPE_CHECKING:`
    assert "ownllm.decoding" not in graph["ownllm"]  # imported inside a function only


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layer_violations_name_the_chain():
    graph = {"a.low": {"a.mid"}, "a.mid": {"b.top"}, "b.top": set(), "c": {"b.top"}}
    assert layer_violations(graph, {"a": ("b",)}) == ["a.low -> a.mid -> b.top", "a.mid -> b.top"]
    assert layer_violations(graph, {"c": ("a",)}) == []


def test_the_full_graph_sees_imports_inside_functions_and_the_packages_they_run():
    graph = full_import_graph()
    assert "ownllm.decoding" in graph["ownllm"]  # imported inside a function
    assert "ownllm.runs" in graph["ownllm.retrieval"]  # inside functions and for type checkers
    assert {"ownllm.interop", "ownllm.interop.readers"} <= graph["ownllm.runs"]  # the packages a reader import runs


def test_the_layer_table_holds():
    assert layer_violations(full_import_graph(), FORBIDDEN_IMPORTS) == []


def test_private_name_uses_are_found():
    source = ("from ownllm.tokenizer import _merge_pair, load_tokenizer\n"
              "from ownllm import tokenizer\n"
              "import ownllm.model as model\n"
              "def f(run):\n"
              "    from ownllm.checkpoint import _fsync_and_replace\n"
              "    return tokenizer._byte_of_symbol(), model._init, run._private, tokenizer.__name__\n")
    assert sorted(private_name_uses("ownllm.runs", source)) == [
        "from ownllm.checkpoint import _fsync_and_replace", "from ownllm.tokenizer import _merge_pair",
        "ownllm.model._init", "ownllm.tokenizer._byte_of_symbol"]


def test_no_module_uses_another_modules_private_names():
    uses = {name: found for name in sorted(MODULES) if (found := private_name_uses(name))}
    assert uses == {}


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
