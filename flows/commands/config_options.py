"""Command-line options made from a stage's config dataclass, so a field is written once.

Each field of the config (and of its nested `execution` block) becomes one option,
``top_p`` -> ``--top-p``, with the field's default and, as its help, the comment the
field carries in its class. `build` turns the parsed values back into the config, whose
own checks then run (so the CLI and a run config refuse the same values the same way).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import typer

# A field line with a trailing comment: `    top_p: float = 0.9  # nucleus mass (BLIP: 0.9)`.
_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")
# Option names that differ from the field's (kept as the commands have always spelled them).
_RENAMED = {"num_workers": "workers"}


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its trailing comment in the class source ("" where it has none)."""
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD_COMMENT.match(line)
        if match:
            helps[match.group(1)] = match.group(2)
    return helps


def _nested(cls: type) -> dict[str, type]:
    """The fields of `cls` that are themselves config dataclasses (the `execution` block)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _option(name: str, annotation: Any, default: Any, help_text: str) -> inspect.Parameter:
    flag = "--" + _RENAMED.get(name, name).replace("_", "-")
    if annotation is bool:
        declared = typer.Option(default, f"{flag}/--no-{flag[2:]}", help=help_text)
    elif typing.get_origin(annotation) is tuple:  # a variable-length tuple: a repeatable option
        annotation, default = list[typing.get_args(annotation)[0]], None
        declared = typer.Option(default, flag, help=help_text + " (repeat for several)")
    else:
        if isinstance(annotation, types.UnionType):
            annotation = typing.Optional[next(a for a in typing.get_args(annotation) if a is not type(None))]  # noqa: UP045
        declared = typer.Option(default, flag, help=help_text)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=declared, annotation=annotation)


def options(cls: type, exclude: frozenset[str] | set[str] = frozenset()) -> list[inspect.Parameter]:
    """One keyword parameter per field of `cls` and of its nested config blocks, but `exclude`."""
    hints, helps, nested = typing.get_type_hints(cls), field_help(cls), _nested(cls)
    params: list[inspect.Parameter] = []
    for f in dataclasses.fields(cls):
        if f.name in nested:
            params += options(nested[f.name], exclude)
        elif f.name not in exclude:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            params.append(_option(f.name, hints[f.name], default, helps.get(f.name, "")))
    return params


def build(cls: type, values: dict[str, Any]) -> Any:
    """The config `cls` from parsed option values (nested blocks from their own fields)."""
    hints, nested = typing.get_type_hints(cls), _nested(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in nested:
            kwargs[f.name] = build(nested[f.name], values)
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value or ()) if typing.get_origin(hints[f.name]) is tuple else value
    return cls(**kwargs)


def config_command(
    cls: type, leading: list[inspect.Parameter], run: Callable[..., None], doc: str,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> Callable[..., None]:  # fmt: skip
    """A typer command taking `leading` parameters (inputs, outputs, models) then one option
    per config field (but `exclude`, left at their defaults); it calls
    ``run(cfg, **leading_values)``. A failed config check is a bad parameter, naming it."""

    def command(**values: Any) -> None:
        given = {p.name: values.pop(p.name) for p in leading}
        try:
            cfg = build(cls, values)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        run(cfg, **given)

    command.__signature__ = inspect.Signature(leading + options(cls, exclude))  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command
