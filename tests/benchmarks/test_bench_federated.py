"""The federated benchmark's edgeloop side at toy scale (digits, a few clients, 2 rounds): real server, real
gRPC, real training; the Flower side is not run in tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import bench_federated as bench  # noqa: E402
from edgeloop.federated.experiment import load_uint8, seeded_bundle  # noqa: E402


@pytest.mark.slow
def test_edgeloop_side_runs_and_measures(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_toy(tmp_path)
    finally:
        torch.set_num_threads(before)


def _run_toy(tmp_path: Path) -> None:
    data = load_uint8("digits")
    assert data[0].dtype == np.uint8 and data[0].shape[1:] == (1, 8, 8)
    bundle, spec = seeded_bundle("small_cnn", data[0], 10, 0, tmp_path / "bundle")
    proto = {"clients": 6, "per_round": 3, "rounds": 2, "robust_rounds": 2, "alpha": 0.5, "seed": 0}
    old = bench.ARCH
    bench.ARCH = "small_cnn"
    try:
        fp32 = bench.edgeloop_run(bundle, spec, data, proto, 2, encoding="f32")
        again = bench.edgeloop_run(bundle, spec, data, proto, 2, encoding="f32")
        codec = bench.edgeloop_run(bundle, spec, data, proto, 2, **bench.CODEC)
        attacked = bench.edgeloop_run(bundle, spec, data, proto, 2, encoding="f32", byzantine_fraction=0.5,
                                      attack="sign_flip", attack_scale=4.0)
    finally:
        bench.ARCH = old
    assert len(fp32["accuracy"]) == 2 and fp32["accuracy"][-1] > 0.3
    assert again["accuracy"] == fp32["accuracy"]  # seeded sampling, partition and training: reproducible
    assert fp32["messages_up"] == 6 and codec["messages_up"] == 6
    assert codec["bytes_total"] * 3 < fp32["bytes_total"]
    assert len(attacked["byzantine_clients"]) == 3
    runs = {"edgeloop_fedavg_fp32": fp32, "edgeloop_fedavg_codec": codec, "robust_clean_fedavg": fp32,
            "robust_attacked_fedavg": attacked, "robust_attacked_trimmed_mean": attacked}
    results = {"protocol": proto, "codec": bench.CODEC, "robust": bench.ROBUST, "attack": bench.ATTACK,
               "runs": runs, "targets": bench.targets(runs), "flower_unavailable": "not run in tests"}
    text = bench.render(results)
    assert "edgeloop_fedavg_codec" in text and "Flower did not run" in text and "not met" in text
