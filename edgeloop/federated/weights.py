"""A torch model's trainable weights as named float32 numpy arrays (what a bundle's ``trainable`` block holds).

The trainable set of a model is every parameter plus the running statistics of its batch-norm layers: what
local SGD changes and what FedAvg averages. Constant buffers (input normalisation, counters) are left out.
torch is imported by the caller (this module only touches the model it is given).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def trainable_names(model: Any) -> list[str]:
    """Parameter names, then ``running_mean``/``running_var`` of each batch-norm layer, in state-dict order."""
    import torch.nn as nn

    names = [name for name, _ in model.named_parameters()]
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            names += [f"{prefix}.running_mean" if prefix else "running_mean",
                      f"{prefix}.running_var" if prefix else "running_var"]
    order = {name: i for i, name in enumerate(model.state_dict())}
    return sorted(names, key=lambda n: order.get(n, len(order)))


def trainable_state(model: Any) -> dict[str, np.ndarray]:
    """name → float32 copy of each trainable tensor of ``model``."""
    state = model.state_dict()
    return {name: state[name].detach().cpu().numpy().astype(np.float32, copy=True) for name in trainable_names(model)}


def load_trainable(model: Any, params: Mapping[str, np.ndarray], *, strict: bool = True) -> int:
    """Copy ``params`` into ``model``'s matching tensors; return how many were set.

    With ``strict`` every trainable name must be present (extra names, e.g. a bundle's adaptable parameters,
    are ignored). Raises ``ValueError`` naming a missing tensor or a shape that does not fit.
    """
    import torch

    state = model.state_dict()
    names = trainable_names(model)
    missing = [n for n in names if n not in params]
    if strict and missing:
        raise ValueError(f"parameters lack trainable tensor(s) {missing[:8]}")
    n = 0
    with torch.no_grad():
        for name in names:
            if name not in params:
                continue
            value = np.asarray(params[name], dtype=np.float32)
            if tuple(value.shape) != tuple(state[name].shape):
                raise ValueError(f"trainable {name!r}: shape {value.shape}, model has {tuple(state[name].shape)}")
            state[name].copy_(torch.from_numpy(value))
            n += 1
    return n
