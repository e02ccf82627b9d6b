"""The no-adaptation baseline."""

from __future__ import annotations

from typing import Any

import numpy as np

from device_agents.tta.base import TTAMethod, TTAOutput
from device_agents.tta.models import source_pass


class SourceModel(TTAMethod):
    """No adaptation: α = 0 with the model's current (source or cloud-updated) statistics on an adaptable
    graph, or a plain ``predict`` on a folded or foreign model. Stateless."""

    name = "source"

    def forward_and_adapt(self, model: Any, x: np.ndarray) -> TTAOutput:
        """One eval-mode pass."""
        logits, probs, features = source_pass(model, x)
        return TTAOutput(logits=logits, features=features, probs=probs)
