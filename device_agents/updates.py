"""Checking a received parameter update before it touches the model: signature, bundle, cohort, version
order and the parameters it yields against the ones the device holds (:mod:`runtime.update_codec`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from device_agents.errors import BaseMismatchError, DivergedHistoryError, StaleUpdateError, UpdateIntegrityError
from device_agents.messages import ParameterUpdate
from runtime.errors import InputError, SignatureError
from runtime.params import params_digest
from runtime.update_codec import ErrorFeedbackEncoder, decode_update, encode_full
from runtime.update_signing import UpdateHeader, payload_digest, verify_update_signature


def header_of(update: ParameterUpdate) -> UpdateHeader:
    """The signed header of ``update`` (the payload enters as its sha256)."""
    return UpdateHeader(update.bundle_id, update.cohort, update.version, update.base_version, update.kind,
                        update.round_id, update.created_ms, update.encoding, payload_digest(update.payload),
                        update.sha256, update.base_sha256)


def check_signature(update: ParameterUpdate, keys: Sequence[bytes] | None) -> None:
    """With ``keys``, require a signature by one of them (an unsigned update is refused); without, accept."""
    if keys is None:
        return
    try:
        verify_update_signature(header_of(update), update.signature, keys)
    except SignatureError as exc:
        raise UpdateIntegrityError(str(exc)) from exc


def check_order(update: ParameterUpdate, bundle_id: str, cohort: str | None, newest: int) -> None:
    """The update must be for this bundle (and cohort, when known) and newer than ``newest``."""
    if update.bundle_id != bundle_id:
        raise UpdateIntegrityError(f"update v{update.version} is for bundle {update.bundle_id[:12]!r}, "
                                   f"this agent runs {bundle_id[:12]!r}")
    if cohort is not None and update.payload and update.cohort != cohort:
        raise UpdateIntegrityError(f"update v{update.version} is for cohort {update.cohort!r}, this agent is in "
                                   f"{cohort!r}")
    if update.version <= newest:
        raise StaleUpdateError(f"update v{update.version} is not newer than v{newest} (replayed or reordered)")


def decode_params(update: ParameterUpdate, held: Mapping[str, np.ndarray], held_version: int) -> dict[str, np.ndarray]:
    """The parameters ``update`` yields on a device holding ``held`` (version ``held_version``), checked
    against the update's digest. A delta for another base raises :class:`BaseMismatchError`.

    A full (``"f32"``) update may carry more names than the device holds (a bundle with trainable weights sent
    to a device that only adapts normalisation parameters): the digest is checked over everything it carries,
    and only the names the device holds are returned.
    """
    if update.params is not None and not update.payload:
        params = {k: np.asarray(v) for k, v in update.params.items()}
    elif update.encoding == "f32":
        try:
            params = decode_update(update.payload, "f32", None, {})
        except InputError as exc:
            raise UpdateIntegrityError(f"update v{update.version}: undecodable f32 payload: {exc}") from exc
        missing = sorted(set(held) - set(params))
        if missing:
            raise UpdateIntegrityError(f"update v{update.version} lacks held parameter(s) {missing[:8]}")
        digest = params_digest(params)
        if digest != update.sha256:
            raise UpdateIntegrityError(f"update v{update.version}: parameters hash to {digest[:16]!r}, header says "
                                       f"{update.sha256[:16]!r}")
        return {k: params[k] for k in held} if held else params
    else:  # a delta encoding
        if update.base_version != held_version:
            raise BaseMismatchError(f"update v{update.version} is a delta on v{update.base_version}; this device "
                                    f"holds v{held_version}")
        held_digest = params_digest(held)
        if update.base_sha256 != held_digest:
            raise DivergedHistoryError(f"update v{update.version} is a delta on v{update.base_version} with digest "
                                       f"{update.base_sha256[:16]!r}; the device's v{held_version} hashes to "
                                       f"{held_digest[:16]!r}")
        try:
            params = decode_update(update.payload, update.encoding, held, {k: v.shape for k, v in held.items()})
        except InputError as exc:
            raise UpdateIntegrityError(f"update v{update.version}: undecodable {update.encoding} payload: {exc}"
                                       ) from exc
    digest = params_digest(params)
    if digest != update.sha256:
        raise UpdateIntegrityError(f"update v{update.version}: parameters hash to {digest[:16]!r}, header says "
                                   f"{update.sha256[:16]!r}")
    return params


class SubmissionEncoder:
    """A device's encoder of federated submissions: ``"f32"`` sends the parameters in full; a delta encoding
    sends ``params - base`` compressed with error feedback (the residual is kept across submissions, so what one
    message leaves out goes with the next, :class:`runtime.update_codec.ErrorFeedbackEncoder`)."""

    def __init__(self, encoding: str = "f32", topk_fraction: float = 1.0, dense_below: int = 0) -> None:
        """Encode with ``encoding`` (``topk_fraction`` and ``dense_below`` for ``"int8_topk_delta"``)."""
        self.encoding = encoding
        self._ef = None if encoding == "f32" else ErrorFeedbackEncoder(encoding, topk_fraction, dense_below)

    def encode(self, params: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray] | None) -> bytes:
        """The payload for ``params`` (names: a subset of ``base``'s for a delta encoding)."""
        if self._ef is None:
            return encode_full(params)
        if base is None:
            raise ValueError(f"a {self.encoding} submission needs the base parameters")
        unknown = sorted(set(params) - set(base))
        if unknown:
            raise ValueError(f"parameter(s) {unknown[:8]} are not in the base")
        delta = {k: np.asarray(v, dtype=np.float32) - np.asarray(base[k], dtype=np.float32)
                 for k, v in params.items()}
        return self._ef.encode(delta).payload

    @property
    def residual(self) -> dict[str, np.ndarray]:
        """What earlier submissions left out (empty for ``"f32"``); assign a saved value back to undo an
        :meth:`encode` whose message was not delivered."""
        return {} if self._ef is None else self._ef.residual

    @residual.setter
    def residual(self, value: dict[str, np.ndarray]) -> None:
        if self._ef is not None:
            self._ef.residual = value

    @property
    def residual_norm(self) -> float:
        """L2 norm of the carried residual (0 for ``"f32"``)."""
        if self._ef is None:
            return 0.0
        return float(np.sqrt(sum(float(np.sum(r * r)) for r in self._ef.residual.values())))
