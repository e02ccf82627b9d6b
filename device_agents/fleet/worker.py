"""A fleet worker: a group of simulated devices that share one inference session and one gRPC channel.

Each device is a real :class:`~device_agents.agent.Agent` — its own TTA state, drift detector, entropy-band
selector, outbox, health monitor, parameters and :class:`~device_agents.client.DeviceClient` (byte counters
of its own) — but the devices of a worker run on one verified bundle: one onnxruntime session, since the
adaptable graph takes the parameters and statistics as inputs (every :class:`~runtime.AdaptableModel` made
from the same :class:`~runtime.bundle.Bundle` keeps its own parameters and calls the shared session). The
worker registers each device, downloads and verifies the bundle once (counted in the first device's bytes),
and then, per round: streams each device's batches through its agent (and through the baselines: the source
model with no adaptation, and optionally the same TTA method on a private model that never syncs),
contributes, and after the server's round syncs (outbox upload, signed update verified, applied, health
checked and possibly rolled back).

Workers are plain Python objects with picklable inputs and outputs, so the in-process engine runs them on a
thread pool and the Ray engine runs each as an actor.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.client import DeviceClient
from device_agents.fleet.byzantine import attack_params
from device_agents.fleet.contribution import (
    AgentContributor,
    Contribution,
    Contributor,
    default_contributor,
)
from device_agents.fleet.scenarios import DeviceSpec
from device_agents.fleet.streams import DeviceStream

logger = logging.getLogger(__name__)
MAX_ERRORS_KEPT = 20


@dataclass(frozen=True)
class FleetConfig:
    """What every worker needs to know (plain data, picklable).

    ``upload_bytes_per_window``: each device's entropy-band selector budget per minute (0: no uploads).
    ``health_samples``: recent samples the health monitor keeps for the rollback check (memory per device).
    ``local_baseline``: also run the TTA method on a private, never-synced model (TTA without the fleet).
    ``online``: ``(devices, rounds)`` participation draws, indexed by :attr:`DeviceSpec.index`.
    ``contribution_encoding``: how honest devices send contributions (``f32`` or a delta encoding of
    :mod:`runtime.update_codec`, with error feedback), when the agent sends them itself (``Agent.contribute``).
    """

    server: str
    dataset: str
    rounds: int
    batch_size: int
    work_dir: str
    online: np.ndarray = field(repr=False)
    data_dir: str | None = None
    tta: str = "alpha_bn"
    tta_settings: dict[str, str] = field(default_factory=dict)  # KEY=VALUE settings (device_agents.tta.options)
    detector: str = "page_hinkley"
    drift_threshold: float = 5.0
    upload_bytes_per_window: int = 4096
    health_samples: int = 64
    local_baseline: bool = True
    trusted_keys: tuple[bytes, ...] | None = None
    rpc_timeout: float = 30.0
    sync_wait_seconds: float = 0.001
    contribution_encoding: str = "int8_delta"


@dataclass
class DeviceRound:
    """One device's round: samples, correct predictions (live and baselines), what it sent and received."""

    index: int
    round: int
    online: bool
    samples: int = 0
    correct: int = 0
    source_correct: int = 0
    local_correct: int = 0
    contributed: bool = False
    learned: int = 0
    applied: tuple[int, ...] = ()
    bytes_up: int = 0
    bytes_down: int = 0
    drift_detected: tuple[int, ...] = ()
    errors: tuple[str, ...] = ()


class _SimDevice:
    """One device: its spec, stream, agent and the private baseline model/method."""

    def __init__(self, spec: DeviceSpec, stream: DeviceStream, agent: Any, local: tuple[Any, Any] | None) -> None:
        self.spec = spec
        self.stream = stream
        self.agent = agent
        self.local = local
        self.contributor: Contributor = default_contributor(agent)
        self.samples_since_contribution = 0
        self.rng = np.random.default_rng([spec.seed, 3])
        self.errors: list[str] = []
        self.error_count = 0
        self.contributions = 0
        self.pending: Contribution | None = None  # a late device's contribution, sent next round

    def error(self, where: str, exc: BaseException | str) -> str:
        text = f"{self.spec.device_id} {where}: {exc if isinstance(exc, str) else type(exc).__name__ + ': ' + str(exc)}"
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(text)
        logger.warning("%s", text)
        if isinstance(exc, BaseException) and logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s", "".join(traceback.format_exception(exc)))
        return text


class FleetWorker:
    """Runs the devices of ``specs`` against the server in ``config`` (see the module docstring)."""

    def __init__(self, specs: Sequence[DeviceSpec], config: FleetConfig) -> None:
        self.specs = list(specs)
        self.config = config
        self.devices: list[_SimDevice] = []
        self._channel: Any = None
        self._source: tuple[Any, Any] | None = None
        self.bundle_id = ""
        self.bundle_bytes = 0
        self.setup_errors: list[str] = []

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self) -> dict[str, Any]:
        """Register every device, fetch and verify the bundle once, build the agents; return a summary."""
        from device_agents.channel import open_channel
        from edgeloop.data import load_dataset
        from edgeloop.pipeline import needs_class_statistics
        from runtime import AdaptableModel, load_bundle

        cfg = self.config
        started = time.perf_counter()
        test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir)
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self._channel = open_channel(cfg.server, options)
        clients, infos = [], []
        for spec in self.specs:
            client = DeviceClient(cfg.server, spec.device_id, timeout=cfg.rpc_timeout,
                                  trusted_keys=cfg.trusted_keys, channel=self._channel)
            infos.append(client.register({"simulated": "true", "drift": spec.drift_kind,
                                          "byzantine": spec.byzantine or "no"}))
            clients.append(client)
        bundle_ids = {info.bundle_id for info in infos}
        if len(bundle_ids) != 1 or not next(iter(bundle_ids)):
            raise RuntimeError(f"the server assigned bundles {sorted(bundle_ids)} to the fleet; expected one")
        self.bundle_id = next(iter(bundle_ids))
        before = clients[0].bytes_down
        # each worker installs its own copy (workers may run at once, in threads or on other machines)
        path = clients[0].fetch_bundle(self.bundle_id, Path(cfg.work_dir) / f"worker-{self.specs[0].device_id}",
                                       class_statistics=needs_class_statistics(cfg.tta, cfg.detector))
        self.bundle_bytes = clients[0].bytes_down - before
        bundle = load_bundle(path, threads=1, trusted_keys=cfg.trusted_keys)
        source_model = AdaptableModel(bundle)
        self._source = (source_model, _tta("source"))
        for spec, client, info in zip(self.specs, clients, infos, strict=True):
            stream = DeviceStream(spec, test.x, test.y, cfg.rounds, cfg.batch_size)
            agent = self._agent(bundle, client, info)
            local = (AdaptableModel(bundle), _tta(cfg.tta, cfg.tta_settings)) if cfg.local_baseline else None
            self.devices.append(_SimDevice(spec, stream, agent, local))
        return {"devices": len(self.devices), "bundle_id": self.bundle_id, "bundle_bytes": self.bundle_bytes,
                "seconds": time.perf_counter() - started}

    def _agent(self, bundle: Any, client: Any, info: Any) -> Any:
        from device_agents.agent import Agent, AgentConfig
        from device_agents.health import HealthPolicy
        from device_agents.outbox import SqliteOutbox
        from device_agents.selection import EntropyBandSelector, SelectorConfig
        from edgeloop.pipeline import make_detector
        from runtime import AdaptableModel

        cfg = self.config
        model = AdaptableModel(bundle)
        upload = cfg.upload_bytes_per_window > 0
        selector = EntropyBandSelector(SelectorConfig(bytes_per_window=cfg.upload_bytes_per_window)) if upload else None
        # the outbox is a real SqliteOutbox, in memory: durability across crashes is not what a fleet run tests
        outbox = SqliteOutbox(":memory:", max_bytes=max(1 << 16, 16 * cfg.upload_bytes_per_window)) if upload else None
        keys = (info.update_public_key,) if info.update_public_key else None
        extra = ({"contribution_encoding": cfg.contribution_encoding}
                 if "contribution_encoding" in {f.name for f in fields(AgentConfig)} else {})
        config = AgentConfig(device_id=client.device_id, bundle_id=info.bundle_id, cohort=info.cohort,
                             update_keys=keys, health=HealthPolicy(recent_samples=cfg.health_samples),
                             sync_wait_seconds=cfg.sync_wait_seconds, **extra)
        detector = make_detector(cfg.detector, model, cfg.drift_threshold)
        return Agent(model, _tta(cfg.tta, cfg.tta_settings), detector, selector, outbox, client, config)

    # -- rounds ---------------------------------------------------------------------------------------------
    def run_round(self, round_index: int, on_device: Callable[[int], None] | None = None) -> list[DeviceRound]:
        """Stream round ``round_index``'s batches through every device and the baselines; online devices
        contribute. ``on_device(1)`` is called after each device."""
        out, images, labels, owners = [], [], [], []
        for dev in self.devices:
            rec = DeviceRound(dev.spec.index, round_index, bool(self.config.online[dev.spec.index, round_index]))
            up0, down0 = dev.agent.client.bytes_up, dev.agent.client.bytes_down
            try:
                batches = dev.stream.round_batches(round_index)
            except Exception as exc:
                rec.errors = (dev.error("stream", exc),)
                out.append(rec)
                continue
            detected: list[int] = []
            errors: list[str] = []
            for position, x, y in batches:
                try:
                    result = dev.agent.process_batch(x, y, position=position)
                except Exception as exc:
                    errors.append(dev.error(f"batch at {position}", exc))
                    continue
                rec.samples += len(y)
                rec.correct += int((result.pred == y).sum())
                if dev.spec.labelled and hasattr(dev.agent, "learn"):
                    try:  # the labels arrive after the prediction: a zeroth-order step on them
                        dev.agent.learn(x, y)
                        rec.learned += len(y)
                    except Exception as exc:
                        errors.append(dev.error(f"learn at {position}", exc))
                detected.extend(result.drift_positions)
                if dev.local is not None:
                    model, method = dev.local
                    rec.local_correct += int((method.adapt_and_predict(model, x).probs.argmax(axis=1) == y).sum())
                images.append(x)
                labels.append(y)
                owners.append(len(out))
            dev.samples_since_contribution += rec.samples
            if rec.online:
                rec.contributed = self._contribute(dev, errors)
            rec.drift_detected = tuple(detected)
            rec.errors = tuple(errors)
            rec.bytes_up = dev.agent.client.bytes_up - up0
            rec.bytes_down = dev.agent.client.bytes_down - down0
            out.append(rec)
            if on_device is not None:
                on_device(1)
        self._source_baseline(out, images, labels, owners)
        return out

    def _contribute(self, dev: _SimDevice, errors: list[str]) -> bool:
        """Make and send the device's contribution; a late device sends the one it made last round instead
        (its uplink straggles: the server sees it a round later, on an older base version). True when a
        contribution went out."""
        agent = dev.agent
        try:
            if dev.spec.byzantine is None and not dev.spec.late and isinstance(dev.contributor, AgentContributor):
                # the agent sends it itself, through its contribution codec (error-feedback deltas)
                if agent.contribute() is None:
                    return False
                dev.samples_since_contribution = 0
                dev.contributions += 1
                return True
            contribution = dev.contributor.contribution(agent, dev.samples_since_contribution)
            if contribution is not None:
                dev.samples_since_contribution = 0
                params = contribution.params
                if dev.spec.byzantine is not None:
                    params = attack_params(params, agent.model.params, dev.spec.byzantine, dev.rng,
                                              dev.spec.attack_scale)
                base = agent.active_version if contribution.base_version is None else contribution.base_version
                contribution = Contribution(params, contribution.num_samples, base)
            if dev.spec.late:
                contribution, dev.pending = dev.pending, contribution
            if contribution is None:
                return False
            agent.client.submit_update(agent.config.bundle_id, contribution.base_version, contribution.num_samples,
                                       contribution.params)
        except Exception as exc:
            errors.append(dev.error("contribute", exc))
            return False
        dev.contributions += 1
        return True

    def _source_baseline(self, out: list[DeviceRound], images: list[np.ndarray], labels: list[np.ndarray],
                         owners: list[int]) -> None:
        """No adaptation on the same batches: the source model, all of the worker's batches in large passes."""
        if not images or self._source is None:
            return
        model, method = self._source
        x, y = np.concatenate(images), np.concatenate(labels)
        owner = np.repeat(np.asarray(owners), [len(b) for b in labels])
        correct = np.zeros(len(y), dtype=bool)
        for s in range(0, len(y), 1024):
            pred = method.adapt_and_predict(model, x[s : s + 1024]).probs.argmax(axis=1)
            correct[s : s + 1024] = pred == y[s : s + 1024]
        counts = np.bincount(owner, weights=correct, minlength=len(out))
        for i, rec in enumerate(out):
            rec.source_correct = int(counts[i])

    def sync(self, round_index: int, on_device: Callable[[int], None] | None = None) -> list[DeviceRound]:
        """Online devices sync after the server's round: upload their outbox, fetch, verify and apply updates."""
        out = []
        for dev in self.devices:
            rec = DeviceRound(dev.spec.index, round_index, bool(self.config.online[dev.spec.index, round_index]))
            if rec.online:
                client = dev.agent.client
                up0, down0 = client.bytes_up, client.bytes_down
                try:
                    result = dev.agent.sync(wait_seconds=self.config.sync_wait_seconds)
                    rec.applied = tuple(result.applied_versions)
                    rec.errors = tuple(dev.error("sync", e) for e in result.errors)
                except Exception as exc:
                    rec.errors = (dev.error("sync", exc),)
                rec.bytes_up = client.bytes_up - up0
                rec.bytes_down = client.bytes_down - down0
            out.append(rec)
            if on_device is not None:
                on_device(1)
        return out

    # -- end ------------------------------------------------------------------------------------------------
    def finish(self) -> list[dict[str, Any]]:
        """Per-device summaries (drift detections, updates, rollbacks, bytes, errors); closes the devices."""
        out = []
        for dev in self.devices:
            stats = dev.agent.stats
            out.append({
                "index": dev.spec.index,
                "drift_detected": list(stats.drift_positions),
                "update_versions": list(stats.update_versions),
                "version": dev.agent.version, "active_version": dev.agent.active_version,
                "rollbacks": len(dev.agent.rollbacks),
                "rollback_reasons": [r.reason for r in dev.agent.rollbacks][:5],
                "rejected_updates": stats.rejected_updates, "sync_failures": stats.sync_failures,
                "uploaded_samples": stats.uploaded_samples, "selected": stats.selected,
                "bytes_up": dev.agent.client.bytes_up, "bytes_down": dev.agent.client.bytes_down,
                "contributions": dev.contributions, "contributor": dev.contributor.name,
                "errors": dev.error_count, "error_messages": list(dev.errors),
            })
        self.close()
        return out

    def close(self) -> None:
        """Close outboxes and the shared channel (idempotent)."""
        for dev in self.devices:
            try:
                dev.agent.close()
                if dev.agent.outbox is not None:
                    dev.agent.outbox.close()
            except Exception as exc:  # closing must go on for the other devices
                logger.warning("closing %s: %s", dev.spec.device_id, exc)
        self.devices = []
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def _tta(name: str, settings: dict[str, str] | None = None) -> Any:
    from edgeloop.pipeline import agent_tta

    return agent_tta(name, settings)
