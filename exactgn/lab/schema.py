"""The one schema mechanism of the lab: pydantic models whose errors name the dotted key.

Run configurations (:mod:`exactgn.lab.config`), sweep files and study files (:mod:`exactgn.lab.specs`) are
:class:`Table` models: unknown keys are refused (with a close match suggested), types are strict (an integer
is accepted for a float, nothing else is converted), and :func:`validate_table` turns pydantic's errors into
one
:class:`ConfigError` whose message starts with the dotted key, e.g. ``optim.lr: expected a number, got
'abc'``.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "Table", "validate_table", "unknown_key", "field_names", "nested_table"]

T = TypeVar("T", bound="Table")


class ConfigError(ValueError):
    """A configuration, sweep or study file is invalid; the message names the key."""


class Table(BaseModel):
    """A TOML table: unknown keys refused, strict types, frozen after validation."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def field_names(cls: type[BaseModel]) -> list[str]:
    """The keys of a table (as written in TOML), in declaration order."""
    return [field.alias or name for name, field in cls.model_fields.items()]


def nested_table(cls: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The model of the sub-table ``name`` of ``cls``, or ``None`` when ``name`` holds a value."""
    annotation = cls.model_fields[name].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def unknown_key(key: str, known: list[str]) -> ConfigError:
    """The error for an unknown dotted ``key``, suggesting the closest of the ``known`` keys of its table."""
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    table = key.rsplit(".", 1)[0] if "." in key else ""
    where = f"[{table}]" if table else "the top level"
    return ConfigError(f"{key}: unknown key{hint}; the keys of {where} are: {', '.join(known)}")


def _describe(value: Any) -> str:
    return "a table" if isinstance(value, dict) else repr(value)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds directly or as the items of a list: ``Model`` or ``list[Model]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = typing.get_args(annotation) if typing.get_origin(annotation) is list else ()
    return _model_in(args[0]) if args else None


def _owner(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model holding the last key of ``loc`` (list indices are stepped over)."""
    by_alias = {field.alias or name: field for name, field in cls.model_fields.items()}
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        child = _model_in(by_alias[part].annotation) if part in by_alias else None
        if child is None:
            break
        cls = child
        by_alias = {field.alias or name: field for name, field in cls.model_fields.items()}
    return cls


def _choices(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, ...]:
    owner = _owner(cls, loc)
    field = owner.model_fields.get(loc[-1]) if loc and isinstance(loc[-1], str) else None
    return typing.get_args(field.annotation) if field is not None else ()


_TYPE_WORDS = {
    "float_type": "expected a number",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a table",
}


def _message(cls: type[BaseModel], error: dict[str, Any]) -> str:
    kind, loc, value = error["type"], tuple(error["loc"]), error.get("input")
    key, ctx = _dotted(loc), error.get("ctx") or {}
    if kind == "extra_forbidden":
        return str(unknown_key(key, field_names(_owner(cls, loc))))
    if kind == "model_type":
        return f"{key}: expected a table [{key}], got {_describe(value)}"
    if kind in _TYPE_WORDS:
        return f"{key}: {_TYPE_WORDS[kind]}, got {_describe(value)}"
    if kind == "literal_error":
        choices = ", ".join(repr(c) for c in _choices(cls, loc))
        return f"{key}: must be one of {choices}; got {value!r}"
    if kind in ("greater_than_equal", "greater_than"):
        sign, bound = (">=", ctx["ge"]) if "ge" in ctx else (">", ctx["gt"])
        return f"{key}: must be {sign} {bound:g}, got {value!r}"
    if kind == "too_short" and ctx.get("min_length") == 1:
        what = "a non-empty list" if isinstance(value, list) else "non-empty"
        return f"{key}: must be {what}, got {_describe(value)}"
    if kind == "distribution":
        return f"{key}: {error['msg']}; got {_describe(value)}"
    if kind == "string_pattern_mismatch":
        field = _owner(cls, loc).model_fields[loc[-1]]
        return f"{key}: expected {field.description}, got {value!r}"
    if kind == "finite_number":
        return f"{key}: must be finite, got {value!r}"
    if kind == "value_error":  # our validators name the key within their table
        text = str(ctx.get("error", error["msg"]))
        return text if not key or text.startswith(key) else f"{key}: {text}"
    return f"{key}: {error['msg']}, got {_describe(value)}" if key else str(error["msg"])


def validate_table(cls: type[T], data: Any, context: dict[str, Any] | None = None) -> T:
    """``cls`` validated from nested dicts; :class:`ConfigError` naming the dotted key of the first
    problem."""
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(_message(cls, exc.errors()[0])) from None
