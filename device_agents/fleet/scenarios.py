"""Fleet scenarios: who the simulated devices are and what their cameras will see, generated under a seed.

A :class:`Scenario` is a named recipe (registered in :data:`SCENARIOS`, listed by ``edgeloop simulate --help``);
:func:`generate_fleet` turns it into one :class:`DeviceSpec` per device, reproducibly under ``seed``:

* **label skew**: each device's sample pool is its share of a Dirichlet(α) split of the test set
  (:func:`edgeloop.data.partition.dirichlet_partition`; the test labels are tiled when the fleet is larger
  than the split allows, so every device holds samples);
* **drift**: its own schedule of corruption domains (clean or ImageNet-C style corruptions at a severity) with
  *abrupt* switches, *gradual* transitions (the share of the new domain rises linearly over a window) or
  *recurring* domains (two conditions alternating, as day and night); the ground-truth drift points are
  stream positions, known before the run;
* **speed**: batches per round (a slow device sees fewer samples between rounds);
* **dropout**: its probability of being offline in a round (no contribution, no sync that round);
* **byzantine**: a chosen fraction of devices replace their contribution's delta by an attack
  (:mod:`device_agents.fleet.byzantine`).

Everything here is plain data (numpy only, picklable), so the Ray engine ships specs to its actors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from device_agents.fleet.byzantine import ATTACKS

DRIFT_KINDS: tuple[str, ...] = ("abrupt", "gradual", "recurring", "none")
DEFAULT_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "contrast", "brightness",
    "pixelate", "jpeg_compression", "elastic_transform",
)
MIXED_ATTACK = "mixed"


@dataclass(frozen=True)
class Scenario:
    """A fleet recipe. Fractions are in [0, 1]; ranges are inclusive ``(low, high)``.

    ``drift_mix`` maps drift kinds (:data:`DRIFT_KINDS`) to their share of devices. ``segments`` is the number
    of domains in a device's schedule (abrupt and gradual) or of alternations (recurring). ``gradual_width`` is
    the transition window as a fraction of the stream. ``clean_start`` is the share of devices whose first
    domain is clean. ``dropout_max``: each device's per-round dropout probability is uniform in
    [0, dropout_max]. ``attack``: one of :data:`~device_agents.fleet.byzantine.ATTACKS` or ``"mixed"`` (each
    byzantine device draws one). ``labelled``: the share of devices that receive the labels of what they saw
    (after predicting) and take zeroth-order SPSA steps on them (``Agent.learn``). ``late``: the share of
    devices whose uplink straggles: each contribution reaches the server one round late (stale by a version).
    ``restarts``: the probability that a device loses power after a round's batches, before its sync; it boots
    again from its state files (:mod:`device_agents.state`, its outbox) and syncs as if nothing happened.
    """

    name: str
    description: str
    drift_mix: tuple[tuple[str, float], ...] = (("abrupt", 0.4), ("gradual", 0.3), ("recurring", 0.3))
    segments: int = 3
    gradual_width: float = 0.2
    clean_start: float = 0.5
    corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severity: tuple[int, int] = (3, 5)
    dirichlet_alpha: float = 0.5
    speed: tuple[int, int] = (1, 4)
    dropout_max: float = 0.2
    byzantine: float = 0.0
    attack: str = MIXED_ATTACK
    attack_scale: float | None = None
    labelled: float = 0.0
    late: float = 0.0
    restarts: float = 0.0

    def __post_init__(self) -> None:
        check_scenario(self)

    def with_overrides(self, **changes: object) -> Scenario:
        """A copy with the given fields replaced (None values are ignored), validated again."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _fraction(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")


def check_scenario(s: Scenario) -> None:
    """Raise ``ValueError`` naming the first bad field of ``s`` (corruption names: :func:`check_corruptions`)."""
    kinds = dict(s.drift_mix)
    unknown = sorted(set(kinds) - set(DRIFT_KINDS))
    if unknown:
        raise ValueError(f"scenario {s.name!r}: unknown drift kinds {unknown}; known: {', '.join(DRIFT_KINDS)}")
    if any(not (math.isfinite(v) and v >= 0) for v in kinds.values()) or sum(kinds.values()) <= 0:
        raise ValueError(f"scenario {s.name!r}: drift_mix shares must be >= 0 with a positive sum, got {kinds}")
    if s.segments < 2 and any(kinds.get(k, 0) > 0 for k in ("abrupt", "gradual", "recurring")):
        raise ValueError(f"scenario {s.name!r}: a drifting schedule needs segments >= 2, got {s.segments}")
    for name in ("gradual_width", "clean_start", "dropout_max", "byzantine", "labelled", "late", "restarts"):
        _fraction(name, getattr(s, name))
    if s.dropout_max >= 1.0:
        raise ValueError(f"dropout must be below 1 (a device that is always offline never takes part), "
                         f"got {s.dropout_max}")
    if not s.corruptions:
        raise ValueError(f"scenario {s.name!r} names no corruptions")
    lo, hi = s.severity
    if not 1 <= lo <= hi <= 5:
        raise ValueError(f"severity range must satisfy 1 <= low <= high <= 5, got {s.severity}")
    if not (math.isfinite(s.dirichlet_alpha) and s.dirichlet_alpha > 0):
        raise ValueError(f"dirichlet_alpha must be a positive number, got {s.dirichlet_alpha}")
    slo, shi = s.speed
    if not 1 <= slo <= shi:
        raise ValueError(f"speed (batches per round) must satisfy 1 <= low <= high, got {s.speed}")
    if s.attack != MIXED_ATTACK and s.attack not in ATTACKS:
        raise ValueError(f"unknown byzantine attack {s.attack!r}; known: {', '.join([*ATTACKS, MIXED_ATTACK])}")
    if s.attack_scale is not None and not (math.isfinite(s.attack_scale) and s.attack_scale > 0):
        raise ValueError(f"attack_scale must be a positive number, got {s.attack_scale}")


def check_corruptions(s: Scenario) -> None:
    """Raise ``ValueError`` when ``s`` names a corruption that is not registered (imports the data package)."""
    from edgeloop.data.corruptions import CORRUPTIONS

    bad = sorted(set(s.corruptions) - set(CORRUPTIONS))
    if bad:
        raise ValueError(f"scenario {s.name!r}: unknown corruptions {bad}; known: {', '.join(sorted(CORRUPTIONS))}")


SCENARIOS: dict[str, Scenario] = {}


def register_scenario(scenario: Scenario) -> Scenario:
    """Add ``scenario`` to :data:`SCENARIOS` (names are unique)."""
    if scenario.name in SCENARIOS:
        raise ValueError(f"scenario {scenario.name!r} is already registered")
    SCENARIOS[scenario.name] = scenario
    return scenario


for _s in (
    Scenario("mixed", "default: Dirichlet(0.5) label skew; abrupt, gradual and recurring drift; speeds 1-4 "
             "batches/round; dropout up to 20 %"),
    Scenario("abrupt", "every device switches corruption abruptly twice (3 domains), Dirichlet(0.5)",
             drift_mix=(("abrupt", 1.0),)),
    Scenario("gradual", "every device drifts gradually (30 % of its stream per transition) through 3 domains",
             drift_mix=(("gradual", 1.0),), gradual_width=0.3),
    Scenario("recurring", "every device alternates between two conditions (day/night) four times",
             drift_mix=(("recurring", 1.0),), segments=4),
    Scenario("stationary", "one fixed domain per device, no drift: the control for false alarms",
             drift_mix=(("none", 1.0),), segments=1),
    Scenario("iid", "near-IID labels (Dirichlet 100), one shared corruption per device, no dropout",
             drift_mix=(("none", 1.0),), segments=1, dirichlet_alpha=100.0, dropout_max=0.0, clean_start=0.0),
    Scenario("byzantine", "mixed, with 20 % byzantine devices (sign flip, scaled, random updates)",
             byzantine=0.2),
    Scenario("labelled", "mixed, with 30 % of devices receiving labels and taking zeroth-order (SPSA) steps",
             labelled=0.3),
    Scenario("stragglers", "mixed, with speeds 1-6 batches/round, dropout up to 60 % and 30 % of devices whose "
             "contributions arrive a round late", speed=(1, 6), dropout_max=0.6, late=0.3),
    Scenario("reboots", "mixed, and each device loses power after a round with probability 0.25, then boots from "
             "its state files (applied updates, undelivered reports, TTA state, outbox)", restarts=0.25),
):
    register_scenario(_s)
DEFAULT_SCENARIO = "mixed"


def scenario_help() -> str:
    """One line per registered scenario: ``name: description``."""
    width = max(len(n) for n in SCENARIOS)
    return "\n".join(f"  {name:<{width}}  {s.description}" for name, s in SCENARIOS.items())


def get_scenario(name: str) -> Scenario:
    """The registered scenario ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


@dataclass(frozen=True)
class DomainSpan:
    """One leg of a schedule: ``domain`` ("clean" or "corruption@severity") from stream position ``start``;
    a gradual leg blends in from the previous domain over ``ramp`` samples."""

    domain: str
    start: int
    ramp: int = 0


@dataclass(frozen=True)
class DeviceSpec:
    """Everything that makes one simulated device itself (plain data; the stream is built from it lazily)."""

    index: int
    device_id: str
    seed: int
    pool: np.ndarray = field(repr=False)
    drift_kind: str = "none"
    schedule: tuple[DomainSpan, ...] = ()
    batches_per_round: int = 1
    dropout: float = 0.0
    byzantine: str | None = None
    attack_scale: float | None = None
    labelled: bool = False
    late: bool = False

    @property
    def drift_points(self) -> list[int]:
        """Ground truth: stream positions where the domain starts to change."""
        return [span.start for span in self.schedule[1:]]

    def samples(self, rounds: int, batch_size: int) -> int:
        """Stream length over ``rounds`` rounds."""
        return rounds * self.batches_per_round * batch_size

    def summary(self) -> dict[str, object]:
        """JSON-ready description (for the report)."""
        return {
            "device_id": self.device_id, "drift_kind": self.drift_kind,
            "schedule": [{"domain": s.domain, "start": s.start, "ramp": s.ramp} for s in self.schedule],
            "batches_per_round": self.batches_per_round, "dropout": round(self.dropout, 4),
            "byzantine": self.byzantine, "labelled": self.labelled, "late": self.late, "pool_size": int(self.pool.size),
        }


def _domains(rng: np.random.Generator, s: Scenario, count: int, clean_first: bool) -> list[str]:
    """``count`` domain labels, consecutive ones different."""
    out: list[str] = []
    for k in range(count):
        if k == 0 and clean_first:
            out.append("clean")
            continue
        while True:
            name = str(rng.choice(list(s.corruptions)))
            label = f"{name}@{int(rng.integers(s.severity[0], s.severity[1] + 1))}"
            if not out or label != out[-1]:
                out.append(label)
                break
    return out


def _schedule(rng: np.random.Generator, s: Scenario, kind: str, length: int) -> tuple[DomainSpan, ...]:
    clean_first = bool(rng.random() < s.clean_start)
    if kind == "none":
        return (DomainSpan(_domains(rng, s, 1, clean_first)[0], 0),)
    segs = max(2, s.segments)
    cuts = [round(length * k / segs) for k in range(segs)]
    if kind == "recurring":
        pair = _domains(rng, s, 2, clean_first)
        return tuple(DomainSpan(pair[k % 2], cut) for k, cut in enumerate(cuts))
    domains = _domains(rng, s, segs, clean_first)
    if kind == "abrupt":
        return tuple(DomainSpan(d, cut) for d, cut in zip(domains, cuts, strict=True))
    ramp = max(1, round(s.gradual_width * length))
    seg_len = length / segs
    ramp = min(ramp, max(1, int(seg_len)))
    # a transition starts half a ramp before the cut, so it is centred on it
    return (DomainSpan(domains[0], 0), *(DomainSpan(d, max(1, cut - ramp // 2), ramp)
                                           for d, cut in zip(domains[1:], cuts[1:], strict=True)))


def _pools(labels: np.ndarray, n: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Dirichlet(α) pools of test indices, the labels tiled when the split is smaller than the fleet needs."""
    from edgeloop.data.partition import dirichlet_partition

    min_size, mean_pool = 4, 64
    reps = max(1, math.ceil(n * mean_pool / labels.size))
    tiled = np.tile(labels, reps)
    parts = dirichlet_partition(tiled, n, alpha, seed=seed, min_size=min_size, max_tries=200)
    return [np.asarray(p % labels.size, dtype=np.int32) for p in parts]


def generate_fleet(
    scenario: Scenario, devices: int, labels: np.ndarray, *, rounds: int, batch_size: int, seed: int = 0,
) -> list[DeviceSpec]:
    """One :class:`DeviceSpec` per device for ``scenario``; equal arguments give equal fleets.

    ``labels`` are the test labels the pools index. Schedules are laid over each device's own stream length
    (``rounds × batches_per_round × batch_size``), so every device meets its drift within the run.
    """
    if isinstance(devices, bool) or not isinstance(devices, int) or devices <= 0:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    if rounds <= 0:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    check_corruptions(scenario)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    rng = np.random.default_rng([seed, 7919])
    pools = _pools(np.asarray(labels, dtype=np.int64), devices, scenario.dirichlet_alpha, seed)
    kinds, shares = zip(*scenario.drift_mix, strict=True)
    p = np.asarray(shares, dtype=np.float64) / sum(shares)
    n_byz = round(scenario.byzantine * devices)
    byzantine = set(rng.choice(devices, size=n_byz, replace=False).tolist()) if n_byz else set()
    n_lab = round(scenario.labelled * devices)
    labelled = set(rng.choice(devices, size=n_lab, replace=False).tolist()) if n_lab else set()
    n_late = round(scenario.late * devices)
    late = set(rng.choice(devices, size=n_late, replace=False).tolist()) if n_late else set()
    attacks = sorted(ATTACKS)
    width = len(str(devices - 1))
    specs = []
    for i in range(devices):
        kind = str(rng.choice(kinds, p=p))
        speed = int(rng.integers(scenario.speed[0], scenario.speed[1] + 1))
        length = rounds * speed * batch_size
        schedule = _schedule(rng, scenario, kind, length)
        dropout = float(rng.uniform(0.0, scenario.dropout_max)) if scenario.dropout_max > 0 else 0.0
        attack = None
        if i in byzantine:
            attack = str(rng.choice(attacks)) if scenario.attack == MIXED_ATTACK else scenario.attack
        specs.append(DeviceSpec(
            index=i, device_id=f"sim-{i:0{width}d}", seed=int(rng.integers(0, 2**31 - 1)), pool=pools[i],
            drift_kind=kind, schedule=schedule, batches_per_round=speed, dropout=dropout, byzantine=attack,
            attack_scale=scenario.attack_scale, labelled=i in labelled, late=i in late,
        ))
    return specs


def participation(specs: Sequence[DeviceSpec], rounds: int, seed: int = 0) -> np.ndarray:
    """``(devices, rounds)`` booleans: whether each device is online in each round (its dropout draw).

    Drawn up front from ``seed``, so the live run and any re-run agree; round 0 is drawn like the others.
    """
    rng = np.random.default_rng([seed, 104729])
    draws = rng.random((len(specs), rounds))
    dropout = np.asarray([s.dropout for s in specs], dtype=np.float64)[:, None]
    return draws >= dropout


def restart_draws(specs: Sequence[DeviceSpec], rounds: int, probability: float, seed: int = 0) -> np.ndarray:
    """``(devices, rounds)`` booleans: whether each device loses power after each round's batches (drawn up front
    from ``seed``, like :func:`participation`, and independent of it)."""
    _fraction("restarts", probability)
    rng = np.random.default_rng([seed, 15485863])
    return rng.random((len(specs), rounds)) < probability
