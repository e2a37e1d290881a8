"""The flags of a training verb, derived from its options dataclass (ownllm.options), as litgpt derives its CLI from
signatures.

    add_stage_flags(sub.add_parser("pretrain"), PretrainOptions)   # one flag per field, with its help and group
    pretrain(stage_options(args, PretrainOptions))                 # the flags given, back into the dataclass

A field made with `ownllm.config.option` is a flag: `--name-with-dashes` (or its `flag`), its help, argparse
settings (choices, nargs, metavar) and help group from the field's metadata, its type from the annotation: an int
or float field reads one, a bool field is a switch (`--no-NAME` too when it is on by default, or when it overrides a
preset). A dict field of another dataclass's fields (`train`: TrainConfig's, `model_overrides`: ModelConfig's) is
one flag per field of that dataclass. `--out`, `--force` and `--device` are ownllm.cli.common's, as for every verb.
A flag not given is left out, so the dataclass's default applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

from ownllm.cli.common import add_device_flag, add_force_flag, add_out_flag
from ownllm.options import StageOptions, flag_of

SHARED = {"out": add_out_flag, "force": add_force_flag, "device": add_device_flag}  # declared once, in common


def _flag_fields(options_type: type[StageOptions]) -> Iterator[tuple[str, dataclasses.Field, Any, str | None]]:
    """(dest, field, annotation, group of the enclosing dict) of every flag: "lr" of `train` is dest "train.lr"."""
    hints = typing.get_type_hints(options_type)
    for field in dataclasses.fields(options_type):
        if "help" not in field.metadata:
            continue  # not a flag (show_progress)
        inner = field.metadata.get("fields_of")
        if inner is None:
            yield field.name, field, hints[field.name], None
            continue
        inner_hints = typing.get_type_hints(inner)
        for item in dataclasses.fields(inner):
            if "help" in item.metadata and item.name not in options_type.TRAIN_FLAGS_LEFT_OUT:
                yield f"{field.name}.{item.name}", item, inner_hints[item.name], field.metadata.get("group")


def _settings(field: dataclasses.Field, hint: Any, inside_dict: bool) -> dict[str, Any]:
    """argparse settings of a flag: the field's own, and the type or switch its annotation says."""
    settings = dict(field.metadata.get("argparse", {}))
    kinds = [kind for kind in (typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,))
             if kind is not type(None)]
    if kinds == [bool]:
        off_by_default = field.default is False and not inside_dict
        settings["action"] = "store_true" if off_by_default else argparse.BooleanOptionalAction
    elif len(kinds) == 1 and kinds[0] in (int, float):
        settings["type"] = kinds[0]
    if "action" not in settings and "choices" not in settings:
        settings.setdefault("metavar", field.name.upper())
    return settings


def _with_default(field: dataclasses.Field, help_text: str) -> str:
    """The help, with the field's default where it says something (the train settings' depend on the preset or
    stage, and a help that names its default already keeps its words)."""
    if field.default in (None, False, dataclasses.MISSING) or "default" in help_text:
        return help_text
    shown = " ".join(field.default) if isinstance(field.default, tuple) else field.default
    return f"{help_text} (default {shown})".strip()


def add_stage_flags(parser: argparse.ArgumentParser,
                    options_type: type[StageOptions]) -> dict[str, argparse._ArgumentGroup]:
    """One flag per option of `options_type`, each under its help group; the groups by title."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for dest, field, hint, outer_group in _flag_fields(options_type):
        group = field.metadata.get("group") or outer_group
        target = parser if group is None else groups.setdefault(group, parser.add_argument_group(group))
        help_text = field.metadata["help"]
        if dest in SHARED:
            SHARED[dest](target, *[help_text] if help_text else [])
            continue
        if "." not in dest:
            help_text = _with_default(field, help_text)
        target.add_argument(flag_of(field), dest=dest, help=help_text or None, default=None,
                            **_settings(field, hint, "." in dest))
    return groups


def stage_options(args: argparse.Namespace, options_type: type[StageOptions]) -> StageOptions:
    """The options the flags given on the command line set; the dataclass's defaults for the rest."""
    values: dict[str, Any] = {}
    for dest, *_ in _flag_fields(options_type):
        value = getattr(args, dest)
        if value is None:
            continue
        outer, _, inner = dest.partition(".")
        if inner:
            values.setdefault(outer, {})[inner] = value
        else:
            values[outer] = value
    return options_type(**values)
