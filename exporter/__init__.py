"""Torch side of edgeloop: built-in architectures, training, the adaptable graph, ONNX export and bundles."""
