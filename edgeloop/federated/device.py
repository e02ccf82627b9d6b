"""A federated device over the real gRPC API: pulls the global parameters (a delta from what it holds when
the server can compute one), trains locally, and submits its parameters encoded with the chosen codec.

Everything goes through :class:`device_agents.client.DeviceClient`, so bytes are counted per message on the
device; updates are checked (signature, base, digest) as an agent checks them (:mod:`device_agents.updates`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from device_agents.client import DeviceClient
from device_agents.fleet.byzantine import attack_params
from device_agents.updates import SubmissionEncoder, check_signature, decode_params
from runtime.params import params_digest

Train = Callable[[Mapping[str, np.ndarray]], tuple[dict[str, np.ndarray], int]]


class FederatedDevice:
    """One device: ``held`` (the full federated parameter set it holds, version ``held_version``), a training
    function (e.g. :meth:`LocalSGDTrainer.train_round`) and an encoder for its submissions.

    ``dense_below``: with ``"int8_topk_delta"``, tensors of at most this many entries are sent whole.
    ``byzantine`` names an attack of :mod:`device_agents.fleet.byzantine` applied to the device's honest delta
    before it is encoded (None: honest).
    """

    def __init__(self, client: DeviceClient, bundle_id: str, initial: Mapping[str, np.ndarray], train: Train, *,
                 encoding: str = "f32", topk_fraction: float = 1.0, dense_below: int = 8192,
                 trusted_keys: Sequence[bytes] | None = None,
                 byzantine: str | None = None, attack_scale: float | None = None, seed: int = 0) -> None:
        """Start from ``initial`` (version 0: the bundle's parameters)."""
        self.client = client
        self.bundle_id = bundle_id
        self.held = {k: np.asarray(v, dtype=np.float32) for k, v in initial.items()}
        self.held_version = 0
        self.held_sha256 = params_digest(self.held)
        self.train = train
        self.encoder = SubmissionEncoder(encoding, topk_fraction, dense_below)
        self.trusted_keys = None if trusted_keys is None else tuple(trusted_keys)
        self.byzantine = byzantine
        self.attack_scale = attack_scale
        self._rng = np.random.default_rng(seed)

    def sync(self) -> bool:
        """Pull the newest parameters; True when they changed."""
        update = self.client.pull_update(self.bundle_id, self.held_version, self.held_sha256)
        if update is None:
            return False
        check_signature(update, self.trusted_keys)
        self.held = decode_params(update, self.held, self.held_version)
        self.held_version = update.version
        self.held_sha256 = update.sha256
        return True

    def contribute(self) -> int:
        """Sync, train on the held parameters, submit; return the submission id."""
        self.sync()
        params, num_samples = self.train(self.held)
        params = {k: np.asarray(v, dtype=np.float32) for k, v in params.items() if k in self.held}
        if self.byzantine is not None:
            params = attack_params(params, self.held, self.byzantine, self._rng, self.attack_scale)
        payload = self.encoder.encode(params, self.held)
        return self.client.submit_update(self.bundle_id, self.held_version, num_samples, encoding=self.encoder.encoding,
                                         payload=payload, base_sha256=self.held_sha256)
