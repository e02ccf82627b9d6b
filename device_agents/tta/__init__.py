"""Forward-only test-time adaptation methods (numpy only; never imports torch).

Registered by name in :data:`TTA_METHODS` (explicitly, below) and created with :func:`create_tta_method`:

========== ================================================================== ==================== ==========
name       what                                                               model                passes
========== ================================================================== ==================== ==========
source     no adaptation                                                      adaptable, predictor 1
alpha_bn   test-time statistics with a running target estimate (Schneider+20) adaptable            1
foa        CMA-ES over norm scale/shift, entropy + statistics fitness (Niu+24) adaptable            population
lame       Laplacian-adjusted outputs on kNN feature affinity (Boudiaf+22)    features needed      1
t3a        prototype classifier from confident features (Iwasawa & Matsuo 21) features needed      1
========== ================================================================== ==================== ==========

Every method is continual by default (``episodic=True`` resets before every batch), exposes
``reset``/``snapshot``/``restore``/``on_drift``/``on_params_changed`` (``restore`` refuses another method's
snapshot, and a state the method never holds, by name), and runs each batch as a transaction: a
batch the model refuses (``runtime.InputError``: wrong shape or dtype, NaN/inf, empty) leaves the state exactly
as it was, and so does a batch the model returns non-finite outputs for (``FloatingPointError``).
"""

from device_agents.tta.alpha_bn import AlphaBN, AlphaBNConfig
from device_agents.tta.base import (
    TTA_METHODS,
    TTAConfig,
    TTAMethod,
    TTAOutput,
    create_tta_method,
    normalized_entropy,
    register_tta_method,
)
from device_agents.tta.foa import FOA, FOAConfig
from device_agents.tta.lame import LAME, LAMEConfig, knn_affinity, laplacian_adjusted
from device_agents.tta.models import ModelCapabilityError
from device_agents.tta.snapshots import TTASnapshot
from device_agents.tta.source import SourceModel
from device_agents.tta.statistics import BatchStatisticsConfig
from device_agents.tta.t3a import T3A, T3AConfig
from runtime.model import softmax

for _cls in (SourceModel, AlphaBN, FOA, LAME, T3A):
    register_tta_method(_cls.name, _cls)
del _cls

__all__ = [
    "FOA",
    "LAME",
    "T3A",
    "TTA_METHODS",
    "AlphaBN",
    "AlphaBNConfig",
    "BatchStatisticsConfig",
    "FOAConfig",
    "LAMEConfig",
    "ModelCapabilityError",
    "SourceModel",
    "T3AConfig",
    "TTAConfig",
    "TTAMethod",
    "TTAOutput",
    "TTASnapshot",
    "create_tta_method",
    "knn_affinity",
    "laplacian_adjusted",
    "normalized_entropy",
    "register_tta_method",
    "softmax",
]
