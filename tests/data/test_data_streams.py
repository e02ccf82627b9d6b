"""Tests of edgeloop.data.streams: domains, drift points, sampling, class-sorted order and batching."""

from __future__ import annotations

import numpy as np
import pytest

from edgeloop.data import Dataset, Domain, Stream, build_stream, iter_batches, load_dataset

DOMAINS = [Domain("clean"), Domain("gaussian_noise", 3), Domain("contrast", 2), Domain("motion_blur", 5)]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", "test")


def _tiny_dataset(n: int = 10) -> Dataset:
    x = np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)
    return Dataset(x=x, y=(np.arange(n) % 5).astype(np.int64), labels=list("abcde"), name="tiny")


def _class_runs(y: np.ndarray) -> int:
    return 1 + int(np.count_nonzero(np.diff(y)))


def test_drift_points_at_domain_boundaries(digits: Dataset) -> None:
    stream = build_stream(digits, DOMAINS, samples_per_domain=50, seed=0)
    assert len(stream) == 200 and stream.x.shape == (200, 1, 8, 8)
    assert stream.x.dtype == np.float32 and stream.y.dtype == np.int64
    assert stream.drift_points == [50, 100, 150]
    assert stream.domains == DOMAINS
    np.testing.assert_array_equal(stream.domain_index, np.repeat(np.arange(4), 50))
    changes = np.flatnonzero(np.diff(stream.domain_index)) + 1
    assert changes.tolist() == stream.drift_points
    assert stream.domain_at(49).is_clean and stream.domain_at(50) == Domain("gaussian_noise", 3)
    assert stream.labels == digits.labels


def test_segments_hold_the_right_images(digits: Dataset) -> None:
    stream = build_stream(digits, DOMAINS, samples_per_domain=40, seed=1)
    source = digits.x[stream.source_index]
    np.testing.assert_array_equal(stream.y, digits.y[stream.source_index])
    np.testing.assert_array_equal(stream.x[:40], source[:40])  # clean segment untouched
    assert not np.allclose(stream.x[40:80], source[40:80])  # noisy
    clean_std = source[80:120].std(axis=(1, 2, 3))
    np.testing.assert_allclose(stream.x[80:120].std(axis=(1, 2, 3)), 0.3 * clean_std, rtol=1e-3)
    assert stream.x.min() >= 0.0 and stream.x.max() <= 1.0


def test_sampling_without_and_with_replacement(digits: Dataset) -> None:
    stream = build_stream(digits, DOMAINS[:2], samples_per_domain=300, seed=2)
    for k in range(2):
        segment = stream.source_index[k * 300 : (k + 1) * 300]
        assert len(np.unique(segment)) == 300
    tiny = build_stream(_tiny_dataset(10), [Domain("clean")], samples_per_domain=25, seed=2)
    assert len(tiny) == 25 and set(tiny.source_index.tolist()) <= set(range(10))


def test_same_seed_same_stream_other_seed_differs(digits: Dataset) -> None:
    a = build_stream(digits, DOMAINS, 30, seed=7)
    b = build_stream(digits, DOMAINS, 30, seed=7)
    c = build_stream(digits, DOMAINS, 30, seed=8)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.source_index, c.source_index)


def test_class_sorted_segments_come_in_class_runs(digits: Dataset) -> None:
    stream = build_stream(digits, DOMAINS, samples_per_domain=100, seed=3, order="class_sorted")
    for k in range(len(DOMAINS)):
        segment = stream.y[k * 100 : (k + 1) * 100]
        assert _class_runs(segment) == len(np.unique(segment))  # one contiguous run per class
    shuffled = build_stream(digits, DOMAINS, samples_per_domain=100, seed=3)
    assert _class_runs(shuffled.y[:100]) > 50


def test_equal_consecutive_domains_are_not_drift(digits: Dataset) -> None:
    specs = [("clean", 0), ("contrast", 2), "contrast@2", None]
    stream = build_stream(digits, specs, samples_per_domain=10, seed=0)
    assert stream.drift_points == [10, 30]
    assert [d.label for d in stream.domains] == ["clean", "contrast@2", "contrast@2", "clean"]


@pytest.mark.parametrize(
    ("corruption", "severity"),
    [("fog", 1), ("contrast", 0), ("contrast", 6), ("clean", 2), ("gaussian_noise", True), ("pixelate", 2.0)],
)
def test_invalid_domain_raises(corruption: str, severity: object) -> None:
    with pytest.raises(ValueError):
        Domain(corruption, severity)  # type: ignore[arg-type]


def test_unknown_domain_lists_choices() -> None:
    with pytest.raises(ValueError, match="clean, gaussian_noise"):
        Domain("snow", 3)


@pytest.mark.parametrize("spec", ["contrast", "contrast@x", 3, ("contrast",), ["contrast", 2]])
def test_unparseable_domain_spec_raises(spec: object) -> None:
    with pytest.raises(ValueError):
        Domain.parse(spec)  # type: ignore[arg-type]


def test_domain_parse_round_trip() -> None:
    for domain in [Domain("clean"), Domain("elastic_transform", 4)]:
        assert Domain.parse(domain.label) == domain
        assert Domain.parse((domain.corruption, domain.severity)) == domain
    assert Domain.parse((None, 0)) == Domain("clean", 0)
    assert Domain("shot_noise", np.int64(2)).severity == 2  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": "random"}, "order"),
        ({"samples_per_domain": 0}, "samples_per_domain"),
        ({"samples_per_domain": 2.5}, "samples_per_domain"),
        ({"domains": []}, "at least one domain"),
        ({"domains": [("blur", 1)]}, "blur"),
    ],
)
def test_invalid_build_arguments_raise(digits: Dataset, kwargs: dict, match: str) -> None:
    args = {"domains": DOMAINS, "samples_per_domain": 5, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_stream(digits, **args)


def test_iter_batches_covers_the_stream_in_order(digits: Dataset) -> None:
    stream = build_stream(digits, DOMAINS, samples_per_domain=25, seed=0)
    batches = list(iter_batches(stream, 32))
    assert [start for start, _, _ in batches] == [0, 32, 64, 96]
    assert [len(x) for _, x, _ in batches] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate([x for _, x, _ in batches]), stream.x)
    np.testing.assert_array_equal(np.concatenate([y for _, _, y in batches]), stream.y)
    assert [len(x) for _, x, _ in iter_batches(stream, 32, drop_last=True)] == [32, 32, 32]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            list(iter_batches(stream, bad))  # type: ignore[arg-type]


def test_stream_validates_its_arrays() -> None:
    x, y = np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="disagree"):
        Stream(x=x, y=y[:3], domain_index=y, domains=[Domain("clean")], drift_points=[])
    with pytest.raises(ValueError, match="domain_index"):
        Stream(x=x, y=y, domain_index=y + 1, domains=[Domain("clean")], drift_points=[])
    with pytest.raises(ValueError, match="drift_points"):
        Stream(x=x, y=y, domain_index=y, domains=[Domain("clean")], drift_points=[4])


@pytest.mark.shared_data
def test_cifar_stream_from_real_data() -> None:
    try:
        cifar = load_dataset("cifar10", "test", limit=100)
    except FileNotFoundError as exc:
        pytest.skip(f"real CIFAR-10 data absent: {exc}")
    stream = build_stream(cifar, [Domain("clean"), Domain("jpeg_compression", 5)], 60, seed=0)
    assert stream.x.shape == (120, 3, 32, 32) and stream.drift_points == [60]
