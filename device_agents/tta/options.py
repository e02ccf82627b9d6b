"""A TTA method's settings from ``KEY=VALUE`` strings: what ``edgeloop eval`` and ``edgeloop agent`` take as
``--tta-set`` (e.g. ``--tta foa --tta-set population=6 --tta-set alpha=0.8``).

A key is a field of the method's config class (:attr:`TTAMethod.config_class`; ``alpha_bn`` and ``foa`` carry
the statistics settings of :class:`~device_agents.tta.statistics.BatchStatisticsConfig` themselves); a dotted
key sets a field of a nested config (``statistics.alpha`` for ``lame`` and ``t3a``, whose ``statistics`` is
one; ``statistics=none`` turns it off). A value is converted to the field's declared type: ``true``/
``false`` for booleans, ``none`` where the field may be None, a comma-separated list for a tuple. The config's
own checks then run, so an unknown key, an unconvertible value and an out-of-range one are each a
``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from device_agents.tta.base import TTA_METHODS, TTAConfig, TTAMethod, create_tta_method

_NONE = ("none", "null")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b.c=x"]`` → ``{"a": "1", "b.c": "x"}``; a pair without ``=`` or a key given twice is a
    ``ValueError`` naming it."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"TTA setting {pair!r} is not KEY=VALUE")
        if key in out:
            raise ValueError(f"TTA setting {key!r} is given twice")
        out[key] = value.strip()
    return out


def configure(name: str, options: Mapping[str, str], base: TTAConfig | None = None) -> TTAConfig:
    """The config of the registered method ``name``: ``base`` (default: the method's default config) with
    ``options`` applied (see the module)."""
    if name not in TTA_METHODS:
        raise ValueError(f"unknown TTA method {name!r}; registered: {sorted(TTA_METHODS)}")
    config = base if base is not None else TTA_METHODS[name].config_class()
    for key, value in options.items():
        config = _set(config, key.split("."), value, name, key)
    return config


def create_configured(name: str, options: Mapping[str, str] | None = None, base: TTAConfig | None = None
                      ) -> TTAMethod:
    """:func:`~device_agents.tta.base.create_tta_method` with :func:`configure`'s config."""
    if not options and base is None:
        return create_tta_method(name)
    return create_tta_method(name, configure(name, options or {}, base))


def _set(config: Any, path: list[str], value: str, method: str, key: str) -> Any:
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config) if f.init}
    head = path[0]
    if head not in fields:
        raise ValueError(f"TTA method {method!r} has no setting {key!r}; its settings: {sorted(fields)}")
    hint = hints[head]
    if len(path) > 1:
        nested = getattr(config, head)
        if nested is None:
            nested_type = next((t for t in _members(hint) if dataclasses.is_dataclass(t)), None)
            if nested_type is None:
                raise ValueError(f"TTA setting {key!r}: {head!r} has no settings of its own")
            nested = nested_type()
        if not dataclasses.is_dataclass(nested):
            raise ValueError(f"TTA setting {key!r}: {head!r} has no settings of its own")
        converted: Any = _set(nested, path[1:], value, method, key)
    else:
        converted = _convert(value, hint, key)
    try:
        return dataclasses.replace(config, **{head: converted})
    except ValueError as exc:
        raise ValueError(f"TTA setting {key!r} = {value!r}: {exc}") from exc


def _members(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a union type (``X | None``), or the type itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _convert(value: str, hint: Any, key: str) -> Any:
    members = _members(hint)
    if value.lower() in _NONE and type(None) in members:
        return None
    for member in members:
        if member is type(None) or dataclasses.is_dataclass(member):
            continue
        try:
            return _convert_one(value, member)
        except (TypeError, ValueError):
            continue
    if any(dataclasses.is_dataclass(m) for m in members):
        raise ValueError(f"TTA setting {key!r}: {value!r} is not a value for it; set its fields as "
                         f"'{key}.<field>=VALUE'" + (f" or turn it off with '{key}=none'" if type(None) in members
                                                      else ""))
    raise ValueError(f"TTA setting {key!r}: {value!r} is not {' or '.join(_describe(m) for m in members)}")


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return "a comma-separated list"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    return names.get(kind, str(kind))


def _convert_one(value: str, kind: Any) -> Any:
    if kind is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ValueError(value)
    if kind is int:
        return int(value)
    if kind is float:
        return float(value)
    if kind is str:
        return value
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        item = args[0] if args else str
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts:
            raise ValueError(value)
        return tuple(_convert_one(p, item) for p in parts)
    raise TypeError(f"no conversion to {kind!r}")
