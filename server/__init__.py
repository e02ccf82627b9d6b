"""The edgeloop cloud server: gRPC servicers, handlers, registry and blob store, rounds and distillation.

Only ``server.servicers`` and ``server.app`` import generated protobuf code; torch is imported only by
``server.distill``, and only when a distillation round runs.
"""
