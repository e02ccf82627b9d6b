"""Datasets, ImageNet-C / MNIST-C style corruptions and drifting test streams (numpy, scipy, Pillow; no torch).

Images are float32 NCHW batches in [0, 1]; labels are int64.
"""

from edgeloop.data.corruptions import CORRUPTIONS, SEVERITIES, CorruptionFn, corrupt, register_corruption
from edgeloop.data.datasets import (
    DATA_DIR_ENV,
    DATASET_NAMES,
    SPLITS,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    clear_cache,
    default_data_dir,
    load_dataset,
)
from edgeloop.data.streams import CLEAN, ORDERS, Domain, DomainSpec, Stream, build_stream, iter_batches

__all__ = [
    "CLEAN",
    "CORRUPTIONS",
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "ORDERS",
    "SEVERITIES",
    "SPLITS",
    "CorruptionFn",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "Domain",
    "DomainSpec",
    "Stream",
    "build_stream",
    "clear_cache",
    "corrupt",
    "default_data_dir",
    "iter_batches",
    "load_dataset",
    "register_corruption",
]
