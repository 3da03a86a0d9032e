"""Dataclass configs from untrusted mappings (TOML files, JSON ``--config`` files, checkpoints, flags).

One mechanism for every config: unknown keys and values of the wrong type are refused with a one-line
:class:`~sarloc.core.errors.ConfigError` that names the key, before a wrong value can fail deep in a run. The
dataclass's own ``__post_init__`` then checks ranges. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from sarloc.core.errors import ConfigError

T = TypeVar("T")


def finite_number(v: Any) -> float | None:
    """``v`` as a finite float, or None when it is not a finite JSON number (bools excluded, and integers too large
    for a float, which ``math.isfinite`` would raise ``OverflowError`` on)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def type_ok(value: Any, hint: Any) -> bool:
    """Is ``value`` acceptable for a dataclass field annotated ``hint``?

    ``bool`` is not an ``int`` here, an ``int`` is a ``float``, floats must be finite, and ``tuple[X, Y]`` checks
    its length and elements (``tuple[X, ...]`` its elements); other generics check the container type only.
    """
    if hint is Any:
        return True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return finite_number(value) is not None
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint) or hint
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(type_ok(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(type_ok(v, h) for v, h in zip(value, args, strict=True)))
    if origin in (dict, list):
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


def build_dataclass(cls: type[T], values: Any, where: str) -> T:
    """``cls(**values)`` after checking that ``values`` is a mapping of known keys with values of the right types.

    Args:
        cls: a dataclass.
        values: the untrusted mapping.
        where: what to name in errors (a file and table, ``--config x.json``, ...).

    Raises:
        ConfigError: not a mapping, unknown keys, a wrong type, or what ``cls.__post_init__`` refuses.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key, Any)
        if not type_ok(value, hint):
            want = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
            raise ConfigError(f"{where}: {key} = {value!r:.40} has the wrong type (expected {want or hint})")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None
