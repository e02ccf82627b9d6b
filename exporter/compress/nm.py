"""N:M pattern arithmetic on numpy arrays: grouping along the input dimension, magnitude masks, verification.

A weight is N:M sparse along its input dimension when every group of M consecutive values along that
dimension holds at most N non-zeros (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"; Zhou et
al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch"). Weights are viewed as
2-D ``(dims[0], prod(dims[1:]))``:

* ``axis=1`` — groups run along each row: ``nn.Linear``/ONNX ``Gemm(transB=1)`` weights ``(out, in)`` and
  convolution weights ``(C_out, C_in, kh, kw)``, whose input dimension is flattened in ``(C_in, kh, kw)`` order;
* ``axis=0`` — groups run down each column: ONNX ``MatMul`` weights ``(K, N)`` (and ``Gemm(transB=0)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_pattern(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``1 <= n < m <= 255`` (ints)."""
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"N:M needs integers, got {n!r}:{m!r}")
    if not 1 <= n < m <= 255:
        raise ValueError(f"N:M needs 1 <= N < M <= 255, got {n}:{m}")


def parse_pattern(text: str) -> tuple[int, int]:
    """Parse ``"N:M"`` (e.g. ``"2:4"``) into ``(n, m)``."""
    parts = text.strip().split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"sparsity pattern must look like '2:4', got {text!r}") from exc
    check_pattern(n, m)
    return n, m


def grouped(weight: Any, m: int, axis: int = 1) -> np.ndarray:
    """The weight as an array of groups ``(G, m)`` along ``axis`` of its 2-D view (see the module docstring).

    Raises ``ValueError`` when the grouped dimension is not divisible by ``m`` or the axis is not 0 or 1.
    """
    w = np.asarray(weight)
    if w.ndim < 2 or axis not in (0, 1):
        raise ValueError(f"N:M grouping needs a tensor of rank >= 2 and axis 0 or 1, got shape {w.shape}, axis {axis}")
    view = w.reshape(w.shape[0], -1)
    if axis == 0:
        view = view.T
    if view.shape[1] % m:
        raise ValueError(f"dimension {view.shape[1]} (axis {axis} of shape {w.shape}) is not divisible by M={m}")
    return np.ascontiguousarray(view).reshape(-1, m)


def check_nm(weight: Any, n: int, m: int, axis: int = 1) -> bool:
    """True when every group of ``m`` along ``axis`` holds at least ``m - n`` zeros (``-0.0`` counts as zero).

    A dimension not divisible by ``m`` gives False. ``weight`` is any array-like (a torch tensor on CPU works:
    pass ``t.detach().numpy()``).
    """
    check_pattern(n, m)
    try:
        groups = grouped(weight, m, axis)
    except ValueError:
        return False
    return bool(np.all((groups == 0).sum(axis=1) >= m - n))


def magnitude_mask(weight: np.ndarray, n: int, m: int, axis: int = 1) -> np.ndarray:
    """A 0/1 mask of ``weight``'s shape keeping the ``n`` largest-magnitude values of every group of ``m``.

    Ties keep the earlier position (a stable sort), so the mask is deterministic.
    """
    check_pattern(n, m)
    groups = np.abs(grouped(weight, m, axis))
    order = np.argsort(-groups, axis=1, kind="stable")[:, :n]
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    w = np.asarray(weight)
    rows = w.shape[0]
    view = keep.reshape(rows, -1) if axis == 1 else keep.reshape(-1, rows).T
    return view.reshape(w.shape)


def sparsity(weight: Any) -> float:
    """Fraction of exactly-zero values."""
    w = np.asarray(weight)
    return float((w == 0).sum() / w.size) if w.size else 0.0
