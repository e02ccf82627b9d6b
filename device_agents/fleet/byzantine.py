"""Byzantine behaviours of simulated devices: what a faulty or malicious device submits instead of its update.

Each attack maps the honest update (a delta from the base parameters, name → array) to what is sent. numpy
only, deterministic under the generator passed in.

- ``sign_flip``: ``-scale · Δ`` (gradient-ascent direction, scaled; Blanchard et al. 2017 use such attacks
  to break averaging).
- ``scaled``: ``scale · Δ`` (a boosted update, model-replacement style).
- ``random``: Gaussian noise with standard deviation ``scale`` times the honest update's RMS per tensor
  (``scale`` when the update is zero), no information at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

Update = Mapping[str, np.ndarray]
Attack = Callable[[Update, float, np.random.Generator], dict[str, np.ndarray]]


def sign_flip(delta: Update, scale: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``-scale · delta``."""
    return {k: (-scale * np.asarray(v, np.float32)).astype(np.float32) for k, v in delta.items()}


def scaled(delta: Update, scale: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``scale · delta``."""
    return {k: (scale * np.asarray(v, np.float32)).astype(np.float32) for k, v in delta.items()}


def random_update(delta: Update, scale: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Gaussian noise, per tensor with standard deviation ``scale`` × the honest RMS (or ``scale``)."""
    out: dict[str, np.ndarray] = {}
    for k, v in delta.items():
        arr = np.asarray(v, np.float32)
        rms = float(np.sqrt(np.mean(arr.astype(np.float64) ** 2))) if arr.size else 0.0
        sigma = scale * (rms if rms > 0 else 1.0)
        out[k] = rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return out


ATTACKS: dict[str, Attack] = {"sign_flip": sign_flip, "scaled": scaled, "random": random_update}
DEFAULT_SCALE: dict[str, float] = {"sign_flip": 4.0, "scaled": 10.0, "random": 3.0}


def attack(name: str, delta: Update, rng: np.random.Generator, scale: float | None = None) -> dict[str, np.ndarray]:
    """Apply the attack ``name`` (one of :data:`ATTACKS`) with ``scale`` (default: :data:`DEFAULT_SCALE`)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown byzantine attack {name!r}; known: {sorted(ATTACKS)}")
    s = DEFAULT_SCALE[name] if scale is None else float(scale)
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"attack scale must be a positive finite number, got {scale}")
    return ATTACKS[name](delta, s, rng)


def attack_params(
    contribution: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], name: str, rng: np.random.Generator,
    scale: float | None = None,
) -> dict[str, np.ndarray]:
    """``base + attack(contribution - base)``: the attack applied to the contribution's delta.

    Variances stay positive (a negative variance would be refused by the server's checks as a crash, not as
    an attack): ``.var`` entries are clipped at 1e-6 after the attack.
    """
    delta = {k: np.asarray(v, np.float64) - np.asarray(base[k], np.float64) for k, v in contribution.items()}
    attacked = attack(name, delta, rng, scale)
    out = {}
    for k, d in attacked.items():
        value = np.asarray(base[k], np.float64) + d
        if k.endswith(".var"):
            value = np.maximum(value, 1e-6)
        out[k] = value.astype(np.float32)
    return out
