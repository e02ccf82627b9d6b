"""``edgeloop inspect``: what a bundle holds, and every check a device runs on it, for every model (no torch).

See :mod:`runtime.bundle_info`. Exit status 0 when every check passed (a model whose runtime is not installed
here is skipped, and said so), 1 when one failed, 2 when there is no bundle to inspect.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``inspect`` subcommand's parser."""
    p = sub.add_parser(
        "inspect", help="describe a bundle and verify it: signature, sha256 of every file, golden vectors of every "
        "model", description="Describe a bundle (input, labels, normalisation layers, compression, each model's "
        "bytes and parity against torch) and run every check a device runs on load, for every model: the "
        "Ed25519 signature, the manifest schema, each file's sha256, each model's golden vectors in its own "
        "runtime. Exit status 0 when every check passed, 1 when one failed.")
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--trusted-key", type=Path, action="append", default=None, help="public key (PEM) the bundle "
                   "must be signed by; repeatable; default: any valid signature")
    p.add_argument("--no-golden", action="store_true", help="skip running the models on their golden vectors")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for the golden runs; default 1")
    p.add_argument("--json", type=Path, default=None, help="also write the inspection as JSON to this file")
    return p


def command(args: argparse.Namespace) -> int:
    """Inspect, print, optionally write JSON; 0 when verified, 1 when a check failed."""
    from edgeloop.pipeline import trusted_keys
    from runtime.bundle_info import inspect_bundle, render_inspection

    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    inspection = inspect_bundle(args.bundle, trusted_keys(args.trusted_key), golden=not args.no_golden,
                                threads=args.threads)
    print(render_inspection(inspection))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(inspection.to_dict(), indent=2, default=str) + "\n")
    return 0 if inspection.ok else 1
