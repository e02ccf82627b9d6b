"""Checks shared by the exporter's and the device's configs: a count must be an integer, never a bool or a float.

``True`` is an ``int`` to Python and ``2.5 < 3`` compares fine, so a bare ``value < 1`` check lets both
through; they surface later as a one-epoch run, a ``range()`` ``TypeError``, a silently truncated shape or an
allocation that never ends. These helpers refuse them when a config is built, naming the field. (In
``runtime``, which both the exporter and the device side import; no torch.)
"""

from __future__ import annotations

import math
import numbers


def require_int(field: str, value: object, minimum: int, maximum: int | None = None, why: str = "") -> int:
    """Return ``value`` as an ``int`` when it is an integer (numpy integers too, not a bool) ``>= minimum`` and,
    when given, ``<= maximum``; else raise ``ValueError`` naming ``field``, the allowed range and the value
    (``why``, e.g. "BatchNorm needs 2 samples", is appended in parentheses)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f">= {minimum} (an integer)" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        reason = f" ({why})" if why else ""
        raise ValueError(f"{field} must be {bound}{reason}, got {value!r}")
    return int(value)


def is_finite_number(value: object) -> bool:
    """Whether ``value`` is a finite ``int`` or ``float`` (numpy's float64 included), not a bool: what a real
    setting must be before its range is compared (``True`` is 1 to Python, and NaN fails no ``<``)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def require_optional_int(field: str, value: object, minimum: int) -> int | None:
    """:func:`require_int` for a count that may be None (None means: not set); the error says None is allowed."""
    if value is None:
        return None
    try:
        return require_int(field, value, minimum)
    except ValueError:
        raise ValueError(f"{field} must be >= {minimum} (an integer) or None, got {value!r}") from None

