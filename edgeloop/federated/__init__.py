"""Full-model federated learning through the edgeloop server (simulation): local-SGD trainer devices
(:mod:`edgeloop.federated.trainer`, torch), a device that pulls and submits over gRPC with the update codec
(:mod:`edgeloop.federated.device`), and a driver for whole runs (:mod:`edgeloop.federated.experiment`).

Nothing here is imported by the device runtime; torch is imported only when a trainer is built. The package
imports no submodule itself, so the trainer can be used without gRPC (e.g. in Flower's environment).
"""
