"""Device-side agent: forward-only TTA, drift detection, sample selection, durable outbox, gRPC transport.

Nothing in this package imports torch. Only :mod:`device_agents.client` imports generated protobuf code.
"""
