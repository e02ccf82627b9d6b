"""A ``cma.CMAEvolutionStrategy`` whose state lives in numpy arrays (for snapshot, restore and determinism)."""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from device_agents.rng import rng_from_words, rng_to_words
from runtime.checks import require_int

KEYS = ("cma.mean", "cma.sigma", "cma.stds", "cma.rng")
MIN_POPULATION = 2
"""Fewest candidates per generation: CMA-ES ranks them."""
MAX_POPULATION = 1024
"""Most candidates per generation. Each costs a forward pass per generation, and CMA-ES's own default,
4 + ⌊3 ln n⌋, is 45 even for a million search dimensions (FOA uses 3–6): more is a mistake, e.g. a population
of 10**9 that would allocate its candidates for ever."""
MAX_SIGMA0 = 10.0
"""Largest initial step size. FOA searches log-scales (a scale becomes ``weight · exp(δ)``) and shifts in units
of ``|weight|``, starting at 0 with σ0 = 0.1 (0.3 measured): at σ0 = 10 an initial candidate already multiplies a
scale by e^10 ≈ 22 000 at one σ, and ``exp`` overflows float32 beyond δ ≈ 88.7, 8.9 σ — a larger σ0 only yields
candidates whose passes overflow."""

# cma imports these when they are installed, for plotting and for surrogate-model statistics that a
# CMAEvolutionStrategy never uses; loading them costs about 100 MiB of resident memory and 1.5 s
_CMA_OPTIONAL = ("matplotlib", "scipy", "PIL")


def import_cma() -> ModuleType:
    """``import cma`` without its optional plotting and statistics dependencies.

    On a device install (numpy only) cma never finds them; where they are installed (a development machine),
    they are hidden from cma's import so that FOA's memory is the same as on the device. Modules already
    imported by the application stay as they were.
    """
    if "cma" in sys.modules:
        return sys.modules["cma"]
    saved = {name: sys.modules[name] for name in _CMA_OPTIONAL if name in sys.modules}
    try:
        for name in _CMA_OPTIONAL:
            sys.modules[name] = None  # type: ignore[assignment]  # makes ``import name`` raise ImportError
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Could not import matplotlib.pyplot": plotting is not used here
            import cma
    finally:
        for name in _CMA_OPTIONAL:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)
    return cma


class _Randn:
    """cma's ``randn`` option: ``randn(lam, N)`` drawn from the method's own seeded generator, never from
    numpy's global one."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def check_settings(population: object, sigma0: object) -> None:
    """Raise ``ValueError`` naming the setting, its value and the allowed range unless ``population`` is an
    integer in [:data:`MIN_POPULATION`, :data:`MAX_POPULATION`] and ``sigma0`` a finite number in
    (0, :data:`MAX_SIGMA0`]."""
    require_int("population", population, MIN_POPULATION, MAX_POPULATION)
    if (isinstance(sigma0, bool) or not isinstance(sigma0, numbers.Real) or not math.isfinite(sigma0)
            or not 0.0 < sigma0 <= MAX_SIGMA0):
        raise ValueError(f"sigma0 must be a number in (0, {MAX_SIGMA0}], got {sigma0!r}")


class CMASearch:
    """Owns a live ``cma.CMAEvolutionStrategy`` and its array form.

    The arrays — ``cma.mean`` (the search distribution's mean), ``cma.sigma`` (step size), ``cma.stds``
    (per-coordinate standard deviations relative to sigma) and ``cma.rng`` (the sampler's PCG64 state) — are
    what a method's state holds; the live strategy is rebuilt from them (a fresh strategy at that mean, step
    size and diagonal scaling, with the sampler continuing the stored random stream) whenever the state was
    replaced — reset, restore, a rolled-back batch, and a snapshot, so that a snapshot and its restore continue
    identically. In between, the live strategy carries its evolution paths and full covariance across batches.
    A rebuild drops paths and off-diagonal covariance, as ``cma``'s own ``_copy_light`` does, and costs about
    1.4 ms; a generation (ask and tell) about 0.2 ms for a few dimensions.
    """

    def __init__(self, population: int, sigma0: float, seed: int) -> None:
        check_settings(population, sigma0)
        self.population = population
        self.sigma0 = sigma0
        self.seed = seed
        self._strategy: Any = None
        self._rng: np.random.Generator | None = None

    def use_population(self, population: int) -> None:
        """Candidates per generation from now on; a change rebuilds the live strategy from the arrays."""
        require_int("population", population, MIN_POPULATION, MAX_POPULATION)
        if population != self.population:
            self.population = population
            self.invalidate()

    def invalidate(self) -> None:
        """Forget the live strategy; the next :meth:`strategy` rebuilds it from the arrays."""
        self._strategy = None
        self._rng = None

    def strategy(self, state: Mapping[str, np.ndarray], dim: int) -> Any:
        """The live strategy for a ``dim``-dimensional search, rebuilt from ``state`` (or started at 0 with
        ``sigma0`` when ``state`` holds none of that dimension)."""
        if self._strategy is not None and dim == self._strategy.N:
            return self._strategy
        cma = import_cma()
        if "cma.mean" in state and state["cma.mean"].shape == (dim,):
            mean, sigma = state["cma.mean"], float(state["cma.sigma"])
            stds, rng = state["cma.stds"], rng_from_words(state["cma.rng"])
        else:
            mean, sigma, stds, rng = np.zeros(dim), self.sigma0, np.ones(dim), np.random.default_rng(self.seed)
        options = {"popsize": self.population, "seed": np.nan, "verbose": -9, "randn": _Randn(rng),
                   "CMA_stds": np.asarray(stds, np.float64)}
        self._strategy = cma.CMAEvolutionStrategy(np.asarray(mean, np.float64), sigma, options)
        self._rng = rng
        return self._strategy

    def mean(self) -> np.ndarray:
        """The live strategy's mean in the search space (the phenotype: what ``ask`` samples around).

        ``es.mean`` is the genotype, which ``cma`` may re-centre internally: measured on the CIFAR-10 ResNet-8
        stream (severity 3, batch 16, after 640 generations) ``es.mean`` was [2.6e6, 1.7e6] while the
        phenotype mean was [0.68, -0.27]; exporting the genotype made a restored strategy, and any pass at the
        mean, overflow the scale ``exp(δ_s)``."""
        if self._strategy is None:
            raise RuntimeError("no live CMA-ES strategy; call strategy() first")
        es = self._strategy
        return np.array(es.gp.pheno(np.array(es.mean, dtype=np.float64)), dtype=np.float64)

    def export(self) -> dict[str, np.ndarray]:
        """The array form of the live strategy."""
        if self._strategy is None or self._rng is None:
            raise RuntimeError("no live CMA-ES strategy to export; call strategy() first")
        es = self._strategy
        return {"cma.mean": self.mean(), "cma.sigma": np.array(float(es.sigma)),
                "cma.stds": np.asarray(es.stds, np.float64) / float(es.sigma), "cma.rng": rng_to_words(self._rng)}
