"""Type and range checks for config dataclasses: every field is what its annotation says (JSON,
the command line and hand-edited files can put any value anywhere), and every float is finite.

A wrong type or a NaN then fails when the config is built, as one ``ValueError`` naming the
field, instead of as a ``TypeError`` deep in the model or a NaN score at the end of a run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import cache
from typing import Any, Union


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 10000.0 as 10000: an int is a float here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    args = typing.get_args(hint)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if origin in (list, tuple):
        if not isinstance(value, origin):
            return False
        item = args[0] if args else Any
        return all(_matches(v, item) for v in value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"unsupported annotation {hint!r}")  # pragma: no cover - a bug in a config class


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin in (dict, list, tuple):
        args = ", ".join(_describe(a) for a in typing.get_args(hint) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    return getattr(hint, "__name__", str(hint))


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _floats(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _floats(v)]
    return []


def check_types(obj: Any, where: str) -> None:
    """Raise ValueError unless every field of dataclass ``obj`` matches its annotation and every
    float in it is finite. ``where`` names the config in the message (e.g. "model")."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints[f.name]
        if not _matches(value, hint):
            raise ValueError(f"{where} {f.name} must be {_describe(hint)}, got {value!r:.80} ({type(value).__name__})")
        bad = [x for x in _floats(value) if not math.isfinite(x)]
        if bad:
            raise ValueError(f"{where} {f.name} must be finite, got {value!r:.80}")


def check_range(where: str, name: str, value: float | int, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> None:
    """ValueError unless ``lo <= value <= hi`` (``lo < value`` with ``lo_open``)."""
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        raise ValueError(f"{where} {name} must be in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], got {value!r}")


# Field metadata: a field added after files with its dataclass were first written. A strict read
# (``from_dict(..., required=True)``) lets it be missing, so that older run directories still
# read, and the field takes its default (which must mean "the behaviour before the field").
ADDED_LATER = {"added_later": True}


def added_later_defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls``'s fields marked :data:`ADDED_LATER`: what a file written before
    those fields existed meant by leaving them out."""
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(cls)
        if f.metadata.get("added_later")
    }


def without_added_defaults(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """``values`` (a dict of ``cls``'s fields) less the fields added later that hold their
    defaults: the dict as it was before those fields existed."""
    added = added_later_defaults(cls)
    return {k: v for k, v in values.items() if k not in added or v != added[k]}


def required_fields(cls: type) -> set[str]:
    """The fields a strict read of ``cls`` needs: all but those marked :data:`ADDED_LATER`."""
    return {f.name for f in dataclasses.fields(cls) if not f.metadata.get("added_later")}


def from_dict(cls: type, d: Any, where: str, *, required: bool = False) -> Any:
    """``cls(**d)`` for a dataclass, with one ValueError for a non-dict, unknown keys, or (with
    ``required``) missing ones (fields marked :data:`ADDED_LATER` may be missing), instead of a
    TypeError from the constructor."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object of {cls.__name__} fields, got {d!r:.80}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {where} field(s) {unknown}; valid: {', '.join(sorted(names))}")
    if required:
        missing = sorted(n for n in required_fields(cls) if n not in d)
        if missing:
            raise ValueError(f"{where} is missing field(s) {missing}")
    return cls(**d)
