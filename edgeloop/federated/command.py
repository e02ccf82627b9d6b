"""``edgeloop federate``: full-model federated learning of trainer devices through a real edgeloop server.

The forward-only fleet is ``edgeloop simulate``; this command runs the devices flagged as trainers: each holds a
Dirichlet(α) label-skewed part of the training set, trains the model locally with SGD (torch) and submits its
weights (``f32`` or a delta codec with error feedback); the server aggregates them with the chosen rule, and the
global model is evaluated on the test set after every round. A fraction of the devices can be byzantine.

Writes ``report.json`` (config, accuracy per round, timing, bytes up and down per message kind) and
``accuracy.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from device_agents.fleet.byzantine import ATTACKS
from runtime.update_codec import ENCODINGS
from server.aggregation import parse_option

logger = logging.getLogger(__name__)

DATASETS = ("digits", "mnist", "cifar10")
DEFAULT_ARCH = {"digits": "small_cnn", "mnist": "smallcnn", "cifar10": "resnet8"}
AGGREGATORS = ("fedavg", "fedau", "trimmed_mean", "median", "krum", "dp_fedavg")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``federate`` subcommand on ``sub`` and return its parser."""
    p = sub.add_parser(
        "federate", help="full-model federated learning of local-SGD trainer devices through a real server",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="digits (embedded), mnist or cifar10 "
                   "(../shared/data or $EDGELOOP_DATA_DIR); default digits")
    p.add_argument("--data-dir", type=Path, default=None, help="where mnist/cifar10 live; default ../shared/data")
    p.add_argument("--arch", default=None, help="registered architecture; default small_cnn (digits), smallcnn "
                   "(mnist), resnet8 (cifar10)")
    p.add_argument("--devices", type=int, default=100, help="trainer devices; default 100")
    p.add_argument("--per-round", type=int, default=10, help="devices sampled per round (seeded); default 10")
    p.add_argument("--rounds", type=int, default=20, help="rounds; default 20")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration; default 0.5")
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round; default 1")
    p.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate; default 0.05")
    p.add_argument("--batch-size", type=int, default=32, help="local batch size; default 32")
    p.add_argument("--aggregator", choices=AGGREGATORS, default="fedavg", help="the server's rule; default fedavg")
    p.add_argument("--aggregator-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the rule (JSON value), e.g. beta=0.3 for trimmed_mean; repeatable")
    p.add_argument("--encoding", choices=ENCODINGS, default="f32", help="parameter messages both ways: f32, "
                   "int8_delta or int8_topk_delta (deltas with error feedback); default f32")
    p.add_argument("--topk-fraction", type=float, default=0.05, help="entries kept per large tensor by "
                   "int8_topk_delta; default 0.05")
    p.add_argument("--byzantine", type=float, default=0.0, help="fraction of devices that attack; default 0")
    p.add_argument("--attack", choices=sorted(ATTACKS), default="sign_flip", help="what byzantine devices send")
    p.add_argument("--attack-scale", type=float, default=None, help="the attack's scale; default per attack")
    p.add_argument("--workers", type=int, default=2, help="devices training at once (threads); default 2")
    p.add_argument("--seed", type=int, default=0, help="partition, sampling, initial weights; default 0")
    p.add_argument("--out", type=Path, required=True, help="directory for report.json and accuracy.png")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~edgeloop.federated.experiment.FederatedConfig` the arguments ask for (checked)."""
    from edgeloop.federated.experiment import FederatedConfig
    from edgeloop.federated.trainer import TrainerConfig

    if args.devices <= 0 or args.rounds <= 0 or args.workers <= 0:
        raise ValueError(f"--devices ({args.devices}), --rounds ({args.rounds}) and --workers ({args.workers}) "
                         "must be positive")
    if not 0 < args.per_round <= args.devices:
        raise ValueError(f"--per-round {args.per_round} must be in 1..--devices ({args.devices})")
    if not args.alpha > 0:
        raise ValueError(f"--alpha {args.alpha} must be positive")
    if args.epochs <= 0 or args.batch_size <= 0 or not args.lr > 0:
        raise ValueError(f"--epochs {args.epochs}, --batch-size {args.batch_size} and --lr {args.lr} must be "
                         "positive")
    if not 0 < args.topk_fraction <= 1:
        raise ValueError(f"--topk-fraction {args.topk_fraction} must be in (0, 1]")
    if not 0 <= args.byzantine < 1:
        raise ValueError(f"--byzantine {args.byzantine} must be in [0, 1)")
    trainer = TrainerConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    return FederatedConfig(
        rounds=args.rounds, clients=args.devices, per_round=args.per_round, alpha=args.alpha, seed=args.seed,
        trainer=trainer, encoding=args.encoding, topk_fraction=args.topk_fraction, aggregator=args.aggregator,
        aggregator_options=dict(map(parse_option, args.aggregator_option)), byzantine_fraction=args.byzantine,
        attack=args.attack, attack_scale=args.attack_scale, workers=args.workers)


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """Accuracy of the global model per round as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [100.0 * a for a in report["accuracy"]]
    cfg = report["config"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=3)
    ax.set_xlabel("round")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{cfg['aggregator']}, {cfg['encoding']}, {cfg['clients']} devices "
                 f"({cfg['byzantine_fraction']:.0%} byzantine)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command(args: argparse.Namespace) -> int:
    """Run ``edgeloop federate``; print one line per round and a summary; return the exit code."""
    from edgeloop.federated.experiment import load_uint8, run_federated, seeded_bundle

    cfg = config_from_args(args)
    arch = args.arch or DEFAULT_ARCH[args.dataset]
    try:
        x, y, xt, yt = load_uint8(args.dataset, args.data_dir)
    except FileNotFoundError as exc:
        raise ValueError(f"dataset {args.dataset!r} is not available: {exc}") from exc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = int(max(y.max(), yt.max())) + 1
    bundle, spec = seeded_bundle(arch, x, num_classes, args.seed, out / "bundle")
    report = run_federated(bundle, arch, spec, (x.astype("float32") / 255.0, y),
                           (xt.astype("float32") / 255.0, yt), cfg)
    report.update(dataset=args.dataset, arch=arch, bundle=str(bundle), model_spec=asdict(spec))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot_accuracy(report, out / "accuracy.png")
    for r in report["rounds"]:
        print(f"round {r['round']:3d}  accuracy {100 * r['accuracy']:6.2f} %  ({r['elapsed_s']:.1f} s)")
    print(f"final accuracy {100 * report['accuracy'][-1]:.2f} %, wall {report['wall_s']:.1f} s, "
          f"{report['bytes_total'] / 1e6:.2f} MB of parameter messages "
          f"({report['bytes_per_message'] / 1e3:.1f} KB each); report in {out / 'report.json'}")
    return 0
