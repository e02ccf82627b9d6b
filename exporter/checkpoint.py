"""Torch checkpoints of registered architectures: the architecture, its data spec and its weights."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.models import ModelSpec, build_model

CHECKPOINT_FORMAT = 1


def save_checkpoint(model: nn.Module, arch: str, spec: ModelSpec, path: Path, meta: dict[str, Any]) -> str:
    """Write ``model``'s weights with its architecture, spec and free-form ``meta``; return the sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "spec": {
            "in_channels": spec.in_channels,
            "num_classes": spec.num_classes,
            "image_size": spec.image_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "meta": dict(meta),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path`` (eval mode); return it and a dict with arch, spec, meta, sha256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable edgeloop checkpoint: {_load_error(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an edgeloop checkpoint (format {CHECKPOINT_FORMAT})")
    for key, kind in (("arch", str), ("spec", dict), ("meta", dict), ("state_dict", dict)):
        if not isinstance(payload.get(key), kind):
            found = "missing" if key not in payload else f"a {type(payload[key]).__name__}"
            raise ValueError(f"{path}: checkpoint field {key!r} must be a {kind.__name__}, it is {found}")
    s = payload["spec"]
    missing = [k for k in ("in_channels", "num_classes", "image_size", "mean", "std") if k not in s]
    if missing:
        raise ValueError(f"{path}: checkpoint spec lacks {missing}")
    try:
        spec = ModelSpec(s["in_channels"], s["num_classes"], s["image_size"], tuple(s["mean"]), tuple(s["std"]))
    except TypeError as exc:
        raise ValueError(f"{path}: checkpoint spec {s}: {exc}") from exc
    model = build_model(payload["arch"], spec)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"{path}: its weights do not fit architecture {payload['arch']!r} with spec "
                         f"{s}: {detail}") from exc
    model.eval()
    info = {
        "arch": payload["arch"],
        "spec": spec,
        "meta": payload["meta"],
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    return model, info


def _load_error(exc: Exception) -> str:
    """One line of what ``torch.load`` said: the unpickler's own finding when it gives one (its message is a
    page of advice about ``weights_only`` around it), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            return f"{type(exc).__name__}: {lines[i + 1]}"
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
