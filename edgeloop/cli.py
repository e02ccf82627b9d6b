"""The ``edgeloop`` command line: train, export, eval, inspect, serve, admin, agent, demo, simulate, federate.

Each subcommand imports only what it needs, so ``edgeloop agent`` and ``edgeloop eval`` run on a device
install without torch. Progress bars and tables (rich) live here and in :mod:`edgeloop.demo` only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from device_agents.errors import AgentError
from runtime.errors import EdgeloopRuntimeError
from runtime.manifest import INVARIANCES

DATASETS = ("digits", "mnist", "cifar10")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a built-in architecture (source student or teacher)")
    p.add_argument("--arch", default="small_cnn", help="registered architecture: small_cnn (the demo's student), "
                   "wide_cnn (its teacher), smallcnn (the MNIST SmallCNN), resnet8 (CIFAR-10); default small_cnn")
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="training data; default digits "
                   "(embedded); mnist and cifar10 read ../shared/data or $EDGELOOP_DATA_DIR")
    p.add_argument("--epochs", type=int, default=15, help="passes over the training split; default 15")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size; default 64")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (cosine schedule); default 3e-3")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and augmentation; default 0")
    p.add_argument("--augment", action="store_true", help="corruption augmentation on half of the batches "
                   "(for teachers that must be robust to shift)")
    p.add_argument("--flip-crop", action="store_true", help="random horizontal flips and 4-pixel crops (for "
                   "natural images such as cifar10, not digits); the checkpoint then declares the hflip invariance, "
                   "which export carries into the bundle for FOA's mirrored view")
    p.add_argument("--limit", type=int, default=None, help="use a stratified subset of this many training images")
    p.add_argument("--threads", type=int, default=1, help="torch threads; default 1 (small models train fastest "
                   "single-threaded on shared cores)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.pt)")
    p.set_defaults(func=_cmd_train)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="compress and export a model to a signed, verified bundle (ONNX, TFLite)")
    p.add_argument("model", nargs="?", default=None, help="torch checkpoint written by `edgeloop train`, or a "
                   "Python import path module:attr giving an nn.Module (needs --dataset)")
    p.add_argument("--from-onnx", type=Path, default=None, help="wrap a foreign ONNX classifier instead")
    p.add_argument("--from-tflite", type=Path, default=None, help="wrap a foreign TFLite classifier instead")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="data for fine-tuning, calibration, golden "
                   "vectors and source statistics; default: the checkpoint's training dataset")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None, help="add int8 models: "
                   "onnxruntime static QDQ per-channel (ONNX), PT2E static or dynamic-range (TFLite); default on")
    p.add_argument("--sparsity", default=None, metavar="N:M", help="N:M structured sparsity (e.g. 2:4) with a "
                   "masked fine-tune whose gradient flow to pruned weights decays; packed in the bundle")
    p.add_argument("--low-rank", default=None, metavar="SPEC", help="SVD factorization of Linear/Conv layers: "
                   "energy=0.95 (rank per layer by kept energy) or budget=0.5 (fraction of parameters kept)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="module path (glob) the "
                   "compression passes leave alone, e.g. features.0; repeatable")
    p.add_argument("--fine-tune-epochs", type=int, default=None, help="epochs of fine-tuning after each "
                   "compression pass (0: none); default 3")
    p.add_argument("--formats", default=None, help="comma-separated: onnx, tflite; default onnx")
    p.add_argument("--folded", action=argparse.BooleanOptionalAction, default=None, help="also export the "
                   "folded (fastest, not adaptable) graph of each format; default on")
    p.add_argument("--tflite-int8", choices=("static", "dynamic"), default=None, help="TFLite int8 mode: "
                   "PT2E static (calibrated) or dynamic-range; default static")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None, help="ship N:M-sparse ONNX "
                   "and TFLite models in the packed transport encoding (decoded on load); default on with --sparsity")
    p.add_argument("--calibration-samples", type=int, default=None, help="images for int8 calibration; default 256")
    p.add_argument("--trainable", action="store_const", const=True, default=None, help="also ship the model's "
                   "full float weights (trainable.bin) for local-SGD trainer devices and full-model federated "
                   "averaging")
    p.add_argument("--invariance", action="append", default=None, choices=sorted(INVARIANCES), help="declare that "
                   "the model's predictions are invariant to this input transformation (hflip: trained with random "
                   "horizontal flips); FOA then averages in a mirrored view; repeatable; default: what the "
                   "checkpoint's meta declares (none for foreign models)")
    p.add_argument("--layout", choices=("NCHW", "NHWC"), default=None, help="foreign model input layout; default NCHW")
    p.add_argument("--value-range", default=None, type=_value_range,
                   help="foreign model input value range lo,hi; default 0,1")
    p.add_argument("--input-dtype", choices=("float32", "uint8", "int8"), default=None, help="foreign model "
                   "input dtype as fed by devices; default: the model's own (float for float models)")
    p.add_argument("--output-kind", choices=("logits", "probabilities"), default=None, help="what a "
                   "foreign model outputs; default logits")
    p.add_argument("--output-name", default=None, help="foreign model: the output holding the class scores, when "
                   "it has several")
    p.add_argument("--features", default=None, metavar="auto|none|TENSOR", help="foreign model: the penultimate "
                   "tensor exposed as the features output (for lame, t3a, feature drift detectors): auto (found in "
                   "the graph), a tensor name, or none; default auto")
    p.add_argument("--name", default=None, help="bundle name in the manifest; default <arch>-<dataset>")
    p.add_argument("--seed", type=int, default=0, help="seed for fine-tuning and data selection; default 0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--signing-key", type=Path, default=None, help="Ed25519 private key (PEM) that signs the "
                   "bundle; it must exist (create one with `edgeloop keygen --out PATH`); default "
                   "$EDGELOOP_SIGNING_KEY or ~/.config/edgeloop/signing_key.pem, created there if absent")
    p.set_defaults(func=_cmd_export)


def _add_tta_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the TTA method's config, repeatable (e.g. population=6, alpha=0.8, "
                   "statistics.alpha=0.5 for lame/t3a, balanced_laplacian_weight=none); unknown keys and bad values "
                   "are refused by name")


def _tta_settings(args: argparse.Namespace) -> dict[str, str]:
    from device_agents.tta.options import parse_options

    return parse_options(args.tta_set)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy of a bundle on clean or corrupted data, with or without adaptation")
    p.add_argument("bundle", type=Path, nargs="?", help="bundle directory (verified before use)")
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="evaluation data (test split); default digits")
    p.add_argument("--corruption", default="clean", help="corruption name, or clean (default); see --list-corruptions")
    p.add_argument("--severity", type=int, default=3, help="corruption severity 1-5; default 3")
    p.add_argument("--tta", default="source", help="test-time adaptation: source (none), alpha_bn, foa, lame, "
                   "t3a (folded/foreign models: source, lame, t3a); default source")
    _add_tta_set(p)
    p.add_argument("--model", default=None, help="bundle model to run (fp32, int8); default: the manifest's default")
    p.add_argument("--backend", choices=("auto", "onnx", "tflite"), default="auto", help="inference backend: "
                   "onnx (onnxruntime), tflite (LiteRT), auto (the chosen model's format); default auto")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass; default 64")
    p.add_argument("--limit", type=int, default=None, help="evaluate on a stratified subset of this many images")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads; default: the backend's choice")
    p.add_argument("--seed", type=int, default=0, help="corruption and ordering seed; default 0")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON to this file")
    p.add_argument("--list-corruptions", action="store_true", help="print the corruption names and exit")
    p.add_argument("--trusted-key", type=Path, action="append", default=None, help="public key (PEM) the bundle "
                   "must be signed by; repeatable; default: any valid signature")
    p.set_defaults(func=_cmd_eval)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC cloud server until SIGINT/SIGTERM", description="Run the gRPC "
                       "cloud server until SIGINT/SIGTERM. Settings come from --config FILE (TOML, keys as in "
                       "server.config.ServerConfig; see docs/SERVER.md) and the flags below, which win over the file.")
    p.add_argument("--config", type=Path, default=None, help="TOML config file (unknown keys are an error)")
    p.add_argument("--host", default=None, help="address to bind; default 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="port to bind (0: any free port); default 50051")
    p.add_argument("--data-dir", type=Path, default=None, help="registry (SQLite) and blob store directory "
                   "(required here or in --config)")
    p.add_argument("--bundle", type=Path, default=None, help="publish this bundle directory at start-up")
    p.add_argument("--teacher", type=Path, default=None, help="teacher checkpoint for distillation rounds")
    p.add_argument("--student", type=Path, default=None, help="student checkpoint the bundle was exported from")
    p.add_argument("--alpha", type=float, default=None, help="the devices' α for BN statistics mixing, "
                   "used when distilling; default 0.5")
    p.add_argument("--distill-steps", type=int, default=None, help="optimizer steps per distillation round; "
                   "default 100")
    p.add_argument("--max-distill-steps", type=int, default=None, help="the most steps a StartRound may ask for "
                   "(more is refused); default 10000")
    p.add_argument("--device", default=None, help="torch device for distillation: auto, cpu, cuda")
    p.add_argument("--trusted-publisher-key", type=Path, action="append", default=None, help="public key (PEM) "
                   "allowed to sign published bundles; repeatable; default: any valid signature")
    p.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM); turns on TLS")
    p.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, default=None, help="CA (PEM) that client certificates must be "
                   "signed by; turns on mutual TLS")
    p.add_argument("--enrollment-secret-file", type=Path, default=None, help="file holding the shared enrollment "
                   "secret; turns on device tokens (needs --admin-token-file)")
    p.add_argument("--admin-token-file", type=Path, default=None, help="file holding the admin service's token")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this HTTP port")
    p.add_argument("--insecure", action="store_const", const=True, default=None, help="allow a non-loopback "
                   "--host without TLS and tokens (trusted networks only)")
    p.set_defaults(func=_cmd_serve)


def _add_agent(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run a device agent on a simulated camera stream against a server")
    p.add_argument("--server", required=True, help="server address host:port")
    p.add_argument("--device-id", required=True, help="this device's id")
    p.add_argument("--work-dir", type=Path, required=True,
                   help="where the bundle, the outbox and the agent state live (kept across runs)")
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="stream source (test split); default digits")
    p.add_argument("--domains", default="clean:0,gaussian_noise:4,defocus_blur:3",
                   help="comma-separated corruption:severity domains the stream passes through")
    p.add_argument("--samples-per-domain", type=int, default=200, help="stream images per domain; default 200")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass; default 16")
    p.add_argument("--tta", default="alpha_bn", help="adaptation method: source, alpha_bn, foa, lame, t3a; "
                   "default alpha_bn")
    _add_tta_set(p)
    p.add_argument("--seed", type=int, default=0, help="stream seed; default 0")
    from device_agents.drift import DETECTORS

    p.add_argument("--detector", default="page_hinkley", choices=DETECTORS,
                   help="drift detector: page_hinkley, adwin or kswin on prediction entropy; mmd on feature windows; "
                   "mahalanobis against the bundle's class-conditional source Gaussians; default page_hinkley")
    p.add_argument("--json", type=Path, default=None, help="write the agent's statistics as JSON to this file")
    p.add_argument("--trusted-key", type=Path, action="append", default=None, help="public key (PEM) the bundle "
                   "must be signed by; repeatable; default: any valid signature")
    p.add_argument("--enrollment-secret-file", type=Path, default=None, help="file holding the fleet's enrollment "
                   "secret: enroll once, keep the device token in WORK_DIR/device.token")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA (PEM) of the server's certificate; turns on TLS")
    p.add_argument("--tls-cert", type=Path, default=None, help="this device's certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", type=Path, default=None, help="this device's private key (PEM), for mutual TLS")
    p.add_argument("--tls-server-name", default=None, help="name in the server's certificate, when it differs "
                   "from the --server host")
    p.set_defaults(func=_cmd_agent)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole loop on embedded digits: train, export, serve, 4 agents, report")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory; default demo_out")
    p.add_argument("--devices", type=int, default=4, help="number of device agents; default 4")
    p.add_argument("--seed", type=int, default=0, help="seed for training and streams; default 0")
    p.set_defaults(func=_cmd_demo)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from edgeloop.simulate import add_parser

    add_parser(sub).set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from edgeloop.simulate import command

    return command(args)


def _add_federate(sub: argparse._SubParsersAction) -> None:
    from edgeloop.federated.command import add_parser

    add_parser(sub).set_defaults(func=_cmd_federate)


def _cmd_federate(args: argparse.Namespace) -> int:
    from edgeloop.federated.command import command

    return command(args)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    from edgeloop.inspecting import add_parser, command

    add_parser(sub).set_defaults(func=command)


def _add_admin(sub: argparse._SubParsersAction) -> None:
    from edgeloop.admin_cli import add_parser, command

    add_parser(sub).set_defaults(func=command)


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="create an Ed25519 signing key pair for bundles")
    p.add_argument("--out", type=Path, required=True, help="private key file to create (PEM, mode 0600); the "
                   "public key is written beside it as OUT.pub")
    p.set_defaults(func=_cmd_keygen)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from exporter.signing import generate_key, public_key_raw, public_path
    from runtime.signing import key_id

    key = generate_key(args.out)
    print(f"private key {args.out}, public key {public_path(args.out)} (key id {key_id(public_key_raw(key))})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="edgeloop", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_export, _add_eval, _add_inspect, _add_serve, _add_admin, _add_agent, _add_demo,
                _add_simulate, _add_federate, _add_keygen):
        add(sub)
    return parser


def _write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _cmd_train(args: argparse.Namespace) -> int:
    from edgeloop import pipeline

    metrics = pipeline.train_checkpoint(
        arch=args.arch, dataset=args.dataset, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, augment=args.augment, limit=args.limit, threads=args.threads,
        flip_crop=args.flip_crop,
    )
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _value_range(text: str) -> tuple[float, float]:
    """``--value-range lo,hi``: two finite numbers, lo < hi."""
    parts = text.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers lo,hi, got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"expected finite numbers with lo < hi, got {text!r}")
    return lo, hi


# export options that apply to one kind of model only: given for the other, they are refused, not ignored
_TORCH_ONLY = {"int8": "--int8/--no-int8", "sparsity": "--sparsity", "low_rank": "--low-rank", "exclude": "--exclude",
               "fine_tune_epochs": "--fine-tune-epochs", "formats": "--formats", "folded": "--folded/--no-folded",
               "tflite_int8": "--tflite-int8", "pack": "--pack/--no-pack",
               "calibration_samples": "--calibration-samples", "trainable": "--trainable"}
_FOREIGN_ONLY = {"layout": "--layout", "value_range": "--value-range", "input_dtype": "--input-dtype",
                 "output_kind": "--output-kind", "output_name": "--output-name", "features": "--features"}


def _given(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    return [flag for dest, flag in options.items() if getattr(args, dest) not in (None, [])]


def _cmd_export(args: argparse.Namespace) -> int:
    from edgeloop import exporting
    from edgeloop.pipeline import signing_key

    if args.signing_key is not None:  # checked first: a typo must not sign with a fresh key devices do not trust
        signing_key(args.signing_key, create=False)
    foreign = [(fmt, path) for fmt, path in (("onnx", args.from_onnx), ("tflite", args.from_tflite)) if path]
    if len(foreign) + (args.model is not None) != 1:
        raise ValueError("give exactly one of MODEL, --from-onnx FILE, --from-tflite FILE")
    misplaced = _given(args, _TORCH_ONLY) if foreign else _given(args, _FOREIGN_ONLY)
    if misplaced:
        verb = "applies" if len(misplaced) == 1 else "apply"
        where = ("to exporting a torch model; a foreign model (--from-onnx, --from-tflite) is wrapped as it is"
                 if foreign else "to wrapping a foreign model (--from-onnx, --from-tflite); a torch model's input and "
                 "output are its own")
        raise ValueError(f"{', '.join(misplaced)} only {verb} {where}")
    if foreign:
        if args.dataset is None:
            raise ValueError("wrapping a foreign model needs --dataset for its golden vectors")
        path = exporting.wrap_foreign(
            foreign[0][1], foreign[0][0], out=args.out, dataset=args.dataset, layout=args.layout or "NCHW",
            value_range=args.value_range or (0.0, 1.0), dtype=args.input_dtype,
            output_kind=args.output_kind or "logits", name=args.name, overwrite=args.overwrite,
            key_path=args.signing_key, invariances=tuple(args.invariance or ()), output_name=args.output_name,
            features=None if args.features == "none" else args.features or "auto",
        )
    else:
        formats = args.formats if args.formats is not None else "onnx"
        request = exporting.ExportRequest(
            model=args.model, out=args.out, dataset=args.dataset, int8=args.int8 is not False,
            sparsity=args.sparsity, low_rank=args.low_rank, exclude=tuple(args.exclude),
            fine_tune_epochs=3 if args.fine_tune_epochs is None else args.fine_tune_epochs,
            formats=tuple(f.strip() for f in formats.split(",") if f.strip()), folded=args.folded is not False,
            tflite_int8=args.tflite_int8 or "static", pack=args.pack is not False,
            calibration_samples=256 if args.calibration_samples is None else args.calibration_samples,
            name=args.name, overwrite=args.overwrite, seed=args.seed, key_path=args.signing_key,
            trainable=bool(args.trainable), invariances=None if args.invariance is None else tuple(args.invariance),
        )
        path = exporting.run_export(request)
    print(f"bundle written to {path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from edgeloop import pipeline

    if args.list_corruptions:
        from edgeloop.data import CORRUPTIONS

        print("\n".join(["clean", *sorted(CORRUPTIONS)]))
        return 0
    if args.bundle is None:
        raise ValueError("a bundle directory is required (or --list-corruptions)")
    result = pipeline.evaluate_bundle(
        args.bundle, dataset=args.dataset, corruption=args.corruption, severity=args.severity, tta=args.tta,
        model=args.model, backend=args.backend, batch_size=args.batch_size, limit=args.limit,
        threads=args.threads, seed=args.seed, trusted=args.trusted_key, tta_settings=_tta_settings(args),
    )
    print(json.dumps(result, indent=2, sort_keys=True))
    _write_json(args.json, result)
    return 0


_SERVE_DEFAULTS = {"host": "127.0.0.1", "port": 50051}
_SERVE_FLAGS = {"host": "host", "port": "port", "data_dir": "data_dir", "teacher": "teacher_ckpt",
                "student": "student_ckpt", "alpha": "distill_alpha", "distill_steps": "distill_steps",
                "max_distill_steps": "max_distill_steps",
                "device": "device", "trusted_publisher_key": "trusted_publisher_keys", "tls_cert": "tls_cert",
                "tls_key": "tls_key", "tls_client_ca": "tls_client_ca", "metrics_port": "metrics_port",
                "insecure": "insecure"}


def serve_config(args: argparse.Namespace) -> Any:
    """The :class:`~server.config.ServerConfig` of ``edgeloop serve``: defaults < ``--config`` file < flags."""
    from server.config import ServerConfig, config_values, load_toml

    values: dict[str, Any] = dict(_SERVE_DEFAULTS)
    if args.config is not None:
        values.update(config_values(load_toml(args.config), args.config.parent))
    values.update({key: getattr(args, flag) for flag, key in _SERVE_FLAGS.items() if getattr(args, flag) is not None})
    for flag, key in (("enrollment_secret_file", "enrollment_secret"), ("admin_token_file", "admin_token")):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag).read_text().strip()
    if "data_dir" not in values:
        raise ValueError("the data directory is not set: give --data-dir or data_dir in --config")
    return ServerConfig(**values)


def _cmd_serve(args: argparse.Namespace) -> int:
    from edgeloop import pipeline

    pipeline.serve(serve_config(args), bundle=args.bundle)
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    from device_agents.channel import TlsOptions
    from edgeloop import pipeline

    secret = args.enrollment_secret_file.read_text().strip() if args.enrollment_secret_file else None
    tls_given = any(v is not None for v in (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name))
    tls = TlsOptions(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name) if tls_given else None

    stats = pipeline.run_agent(
        server=args.server, device_id=args.device_id, work_dir=args.work_dir, dataset=args.dataset,
        domains=args.domains, samples_per_domain=args.samples_per_domain, batch_size=args.batch_size,
        tta=args.tta, seed=args.seed, trusted=args.trusted_key, enrollment_secret=secret, tls=tls,
        detector=args.detector, tta_settings=_tta_settings(args),
    )
    print(json.dumps(stats, indent=2, sort_keys=True))
    _write_json(args.json, stats)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgeloop.demo import run_demo

    run_demo(out=args.out, devices=args.devices, seed=args.seed)
    return 0


# the optional dependencies a command may import, by top-level module: the install that provides them
_EXTRAS = {
    **dict.fromkeys(("scipy", "sklearn", "PIL", "matplotlib", "rich"), 'pip install ".[data]"'),
    "ai_edge_litert": 'pip install ".[litert]"',
    **dict.fromkeys(("torch", "onnx", "onnxscript", "litert_torch"), 'pip install "torch==2.13.0" ".[export]"'),
    **dict.fromkeys(("prometheus_client", "grpc_reflection"), 'pip install "torch==2.13.0" ".[server]"'),
    "ray": 'pip install ".[fleet]"',
}


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    """What to install for a missing optional dependency (None: not one of them)."""
    top = (exc.name or "").partition(".")[0]
    return f"this command needs {top!r}, which is not installed: {_EXTRAS[top]}" if top in _EXTRAS else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgeloop`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except ModuleNotFoundError as exc:  # an optional dependency of this command (a device install without it)
        hint = _missing_extra(exc)
        if hint is None:
            raise
        print(f"edgeloop {args.command}: error: {hint}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, EdgeloopRuntimeError, AgentError) as exc:
        print(f"edgeloop {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
