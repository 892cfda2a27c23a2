"""Engine configs as pydantic models: a mistyped key in a profile fails naming the key and the allowed ones.

Every stage table of a profile (``[translate]``, ``[layout]`` …) is validated against the model of its
engine before a run does any work (``tasks.run.profile.validate_profile`` → a typed ``Profile``), and
every engine builder validates the table it is given, so direct library use fails the same way. The
models hold every default, once: :func:`check_config` returns the table *normalised* (every key, defaults
filled in), which is what engines read and what config hashes are taken over, so a profile that spells
out a default makes the same shards as one that leaves it out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError


class ProfileError(ValueError):
    """A profile table that does not fit its engine's config model."""


class StrictModel(BaseModel):
    """Base of every engine config: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _allowed(model: Any) -> list[str]:
    fields = getattr(model, "model_fields", None) or getattr(model, "__dataclass_fields__", {})
    return sorted(fields)


def plain(value: Any) -> Any:
    """A config value as JSON-like data (tuples as lists, models and dataclasses as dicts): what config
    hashes are taken over."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def check_config(section: str, table: Mapping[str, Any] | None, model: Any) -> dict[str, Any]:
    """Validate ``table`` against ``model`` (a pydantic model, or a dataclass such as ``RenderConfig``);
    return it normalised (every field, defaults filled in, JSON-like). The error names the section,
    every offending key and the allowed keys."""
    table = dict(table or {})
    if dataclasses.is_dataclass(model):
        unknown = sorted(set(table) - {f.name for f in dataclasses.fields(model)})
        if not unknown:
            try:
                obj = model(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})
            except (TypeError, ValueError) as exc:
                raise ProfileError(f"[{section}]: {exc}") from None
            return plain(obj)
    else:
        try:
            return plain(model.model_validate(table))
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


def engine_union(key: str, default: str, models: Mapping[str, type[BaseModel]]) -> Any:
    """A pydantic type: the config model of the engine ``table[key]`` names (``default`` when absent)."""

    def pick(value: Any) -> str:
        return str(value.get(key, default) if isinstance(value, Mapping) else getattr(value, key))

    choices = tuple(Annotated[m, Tag(name)] for name, m in models.items())
    return Annotated[Union[choices], Discriminator(pick)]  # noqa: UP007 (a runtime tuple of types)


def stage_config(model: type[BaseModel], value: Any, **overrides: Any) -> Any:
    """A stage's typed sub-config from itself, or from a profile (a Profile or a mapping: its tables
    picked by field name, validated: unknown keys inside a table fail, other tables are not this
    stage's); ``overrides``: fields that do not come from the profile (e.g. the run's formats)."""
    if isinstance(value, model) and not overrides:
        return value
    if isinstance(value, BaseModel):
        value = {k: getattr(value, k) for k in model.model_fields if hasattr(value, k)}
    picked = {k: v for k, v in dict(value or {}).items() if k in model.model_fields}
    return model.model_validate({**picked, **overrides})
