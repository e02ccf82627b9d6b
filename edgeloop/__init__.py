"""edgeloop: edge/on-device continual adaptation runtime (CLI, demo, datasets)."""

__version__ = "0.1.0"
