"""Command-line options built from the flows' pydantic parameter models (one place for every default).

Each field of a parameter model becomes ``--field-name``; its help is the field's description and its
default is shown from the model, never repeated here. An option left out is left out of the model, so
the model's default applies. Scalars keep their type; booleans get ``--x/--no-x``; lists are
comma-separated; tables and nested models are JSON (``'{"train": 0.8, ...}'``) or ``@file.json``.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import BaseModel, ValidationError

_SCALARS = (str, int, float)


def _strip_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _kind(tp: Any) -> str:
    """How a field is spelled on the command line: scalar, bool, list, literal or json."""
    tp = _strip_optional(tp)
    if tp is bool:
        return "bool"
    if tp in _SCALARS:
        return "scalar"
    if typing.get_origin(tp) is Literal:
        return "literal"
    if typing.get_origin(tp) in (list, tuple) and all(
        a in _SCALARS or typing.get_origin(a) is Literal for a in typing.get_args(tp) if a is not Ellipsis
    ):
        return "list"
    return "json"


def _default_text(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "model defaults"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def model_options(model: type[BaseModel], *, skip: Iterable[str] = ()) -> list[inspect.Parameter]:
    """``inspect.Parameter`` objects (typer options) for the fields of ``model``."""
    params = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        kind = _kind(field.annotation)
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or ''} (default: {_default_text(field)})".strip()
        if kind == "bool":
            option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
            annotation: Any = bool | None
        elif kind == "scalar":
            option = typer.Option(None, flag, help=help_text, show_default=False)
            annotation = _strip_optional(field.annotation) | None
        else:
            hint = {"list": " (comma-separated)", "literal": "", "json": " (JSON or @file.json)"}[kind]
            option = typer.Option(None, flag, help=help_text + hint, show_default=False)
            annotation = str | None
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
        )
    return params


def parse_option(model: type[BaseModel], name: str, raw: Any) -> Any:
    field = model.model_fields[name]
    kind = _kind(field.annotation)
    if kind == "list" and isinstance(raw, str):
        return [x.strip() for x in raw.split(",") if x.strip()]
    if kind == "json" and isinstance(raw, str):
        text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
        try:
            return json.loads(text)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--" + name.replace("_", "-")) from exc
    return raw


def params_from(model: type[BaseModel], values: dict[str, Any], **extra: Any) -> BaseModel:
    """The parameter model from the options given (None = not given: the model's default applies)."""
    data = {
        k: parse_option(model, k, v) for k, v in values.items() if v is not None and k in model.model_fields
    }
    data.update({k: v for k, v in extra.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        ]
        raise typer.BadParameter("; ".join(lines)) from None


def with_model_options(
    model: type[BaseModel], *, skip: Iterable[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add ``model``'s fields as keyword options to a typer command ``f(**options)``.

    The command receives the given values in ``options`` (absent ones as None) beside its own params."""
    extra = model_options(model, skip=skip)

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(func).parameters.values())
        own = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
        func.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
        func.__annotations__ = {
            **typing.get_type_hints(func, include_extras=True),
            **{p.name: p.annotation for p in extra},
        }
        return func

    return wrap
