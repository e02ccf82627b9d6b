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
        raise ValueError(f"{path} is not a readable edgeloop checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an edgeloop checkpoint (format {CHECKPOINT_FORMAT})")
    s = payload["spec"]
    spec = ModelSpec(s["in_channels"], s["num_classes"], s["image_size"], tuple(s["mean"]), tuple(s["std"]))
    model = build_model(payload["arch"], spec)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    info = {
        "arch": payload["arch"],
        "spec": spec,
        "meta": payload["meta"],
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    return model, info
