"""Engine configs as pydantic models: a mistyped key in a profile fails naming the key and the allowed ones.

Every stage table of a profile (``[translate]``, ``[layout]`` …) is validated against the model of its
engine before a run does any work (``tasks.run.profile.validate_profile``), and every engine builder
validates the table it is given, so direct library use fails the same way. The engines keep reading
their tables as dicts; the models only add the check, the types and the documentation of each key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class ProfileError(ValueError):
    """A profile table that does not fit its engine's config model."""


class StrictModel(BaseModel):
    """Base of every engine config: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _allowed(model: Any) -> list[str]:
    fields = getattr(model, "model_fields", None) or getattr(model, "__dataclass_fields__", {})
    return sorted(fields)


def check_config(section: str, table: Mapping[str, Any] | None, model: Any) -> dict[str, Any]:
    """Validate ``table`` against ``model`` (a pydantic model, or a dataclass such as ``RenderConfig``);
    return it as a dict. The error names the section, every offending key and the allowed keys."""
    table = dict(table or {})
    if dataclasses.is_dataclass(model):
        unknown = sorted(set(table) - {f.name for f in dataclasses.fields(model)})
        if not unknown:
            try:
                model(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})
            except (TypeError, ValueError) as exc:
                raise ProfileError(f"[{section}]: {exc}") from None
            return table
    else:
        try:
            model.model_validate(table)
            return table
        except ValidationError as exc:
            unknown = [".".join(map(str, e["loc"])) for e in exc.errors() if e["type"] == "extra_forbidden"]
            if not unknown:
                detail = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or '(table)'}: {e['msg']}" for e in exc.errors()
                )
                raise ProfileError(f"[{section}]: {detail}") from None
    raise ProfileError(
        f"[{section}]: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
        f"allowed: {', '.join(_allowed(model))}"
    )


def pick_engine(
    section: str, table: Mapping[str, Any] | None, key: str, engines: Mapping[str, Any], default: str
):
    """The config model of the engine a table names (``key``: ``engine`` or ``miner``)."""
    name = (table or {}).get(key, default)
    if name not in engines:
        raise ProfileError(f"[{section}]: unknown {key} {name!r}; known: {', '.join(sorted(engines))}")
    return engines[name]
