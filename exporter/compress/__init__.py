"""Compression passes (torch side): low-rank factorization and N:M sparsity, with one lifecycle and registry.

``prepare`` → ``step``/``calibrate`` (fine-tune hooks) → ``finalize`` → ``report``; run them in order with
:func:`compose` (low-rank → N:M sparsity; int8 is applied by the exporter to the exported ONNX graph).
"""

from exporter.compress.base import (
    PASSES,
    CompressionError,
    CompressionPass,
    UnsupportedLayerError,
    create_pass,
    register_pass,
)
from exporter.compress.finetune import FineTuneConfig, fine_tune
from exporter.compress.lowrank import LowRank, LowRankConfig
from exporter.compress.nm import check_nm, parse_pattern
from exporter.compress.onnx_nm import NMPatternError, OnnxNMReport, check_onnx_nm, require_onnx_nm
from exporter.compress.pipeline import Int8AtExport, compose
from exporter.compress.sparsity import NMSparsity, NMSparsityConfig

__all__ = [
    "PASSES",
    "CompressionError",
    "CompressionPass",
    "FineTuneConfig",
    "Int8AtExport",
    "LowRank",
    "LowRankConfig",
    "NMPatternError",
    "NMSparsity",
    "NMSparsityConfig",
    "OnnxNMReport",
    "UnsupportedLayerError",
    "check_nm",
    "check_onnx_nm",
    "compose",
    "create_pass",
    "fine_tune",
    "parse_pattern",
    "register_pass",
    "require_onnx_nm",
]
