"""TTA method settings from KEY=VALUE strings (``--tta-set``): conversion by the declared field types, nested
settings, the configs' own checks, and errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from device_agents.tta import TTA_METHODS, AlphaBNConfig, BatchStatisticsConfig
from device_agents.tta.options import configure, create_configured, parse_options


@pytest.mark.parametrize("name", sorted(TTA_METHODS))
def test_every_plain_setting_round_trips_from_its_text(name: str) -> None:
    """Each setting of every registered method, given as the text of its default, yields the default config."""
    default = TTA_METHODS[name].config_class()
    for field in dataclasses.fields(default):
        value = getattr(default, field.name)
        if dataclasses.is_dataclass(value):
            continue
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        assert configure(name, {field.name: text}) == default, field.name


def test_values_follow_the_declared_types() -> None:
    foa = configure("foa", parse_options(["population=6", "alpha=0.8", "per_channel=yes", "flip_view=none",
                                          "layers=2"]))
    assert (foa.population, foa.alpha, foa.per_channel, foa.flip_view, foa.layers) == (6, 0.8, True, None, 2)
    assert configure("foa", {"layers": "bn2, bn3"}).layers == ("bn2", "bn3")  # int | tuple[str, ...]
    lame = configure("lame", {"statistics.alpha": "0.5", "balanced_laplacian_weight": "None"})
    assert lame.statistics == BatchStatisticsConfig(alpha=0.5) and lame.balanced_laplacian_weight is None
    assert configure("t3a", {"statistics": "none"}).statistics is None
    # a nested setting of a config that is off starts from its defaults
    assert configure("t3a", {"statistics": "none", "statistics.alpha": "0.3"}).statistics == BatchStatisticsConfig(
        alpha=0.3)


def test_settings_apply_on_top_of_a_base_config() -> None:
    from edgeloop.pipeline import LOOP_ALPHA, agent_tta

    base = AlphaBNConfig(alpha=0.6, batch_weight=1.0)
    assert configure("alpha_bn", {"alpha": "0.9"}, base) == AlphaBNConfig(alpha=0.9, batch_weight=1.0)
    loop = agent_tta("alpha_bn", {"episodic": "true"}).config  # the agent's loop config, one setting changed
    assert (loop.alpha, loop.batch_weight, loop.episodic) == (LOOP_ALPHA, 1.0, True)
    assert create_configured("source").name == "source"


@pytest.mark.parametrize(("name", "options", "message"), [
    ("foa", {"populaton": "3"}, r"TTA method 'foa' has no setting 'populaton'; its settings: \['alpha'"),
    ("foa", {"population": "three"}, r"'population': 'three' is not an integer or none"),
    ("foa", {"population": "1"}, r"'population' = '1': population must be an integer in \[2, 1024\], got 1"),
    ("foa", {"per_channel": "maybe"}, r"'per_channel': 'maybe' is not true/false"),
    ("foa", {"layers": ""}, r"'layers': '' is not an integer or a comma-separated list"),
    ("foa", {"alpha": "none"}, r"'alpha': 'none' is not a number"),
    ("foa", {"seed": "-1"}, r"'seed' = '-1': seed must be >= 0"),
    ("foa", {"layers": "bn1,bn1"}, r"'layers' = 'bn1,bn1': layers names a layer more than once"),
    ("lame", {"statistics": "x"}, r"set its fields as 'statistics.<field>=VALUE' or turn it off"),
    ("lame", {"statistics.nope": "1"}, r"has no setting 'statistics.nope'"),
    ("lame", {"knn.k": "1"}, r"'knn' has no settings of its own"),
    ("nonsense", {}, r"unknown TTA method 'nonsense'"),
])
def test_bad_settings_are_refused_by_name(name: str, options: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        configure(name, options)


def test_parse_options_refuses_malformed_pairs() -> None:
    assert parse_options([" a = 1 ", "b.c=x=y"]) == {"a": "1", "b.c": "x=y"}
    for pairs, message in ((["a"], "not KEY=VALUE"), (["=1"], "not KEY=VALUE"), (["a=1", "a=2"], "given twice")):
        with pytest.raises(ValueError, match=message):
            parse_options(pairs)
