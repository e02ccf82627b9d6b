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

With ``FleetConfig.restarts``, devices keep their outbox and agent state in files (``work_dir/<device id>/``)
and a device drawn to restart after a round loses power before its sync: its agent, client and model are
dropped without a goodbye (the TTA state adapted since its last sync is lost, like on a real device), and a new
agent is built from the files, registers again and syncs. What it took over is recorded per restart and
compared with what it held before (``finish()['restarts']``).

Workers are plain Python objects with picklable inputs and outputs, so the in-process engine runs them on a
thread pool and the Ray engine runs each as an actor.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
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
    restarts: np.ndarray | None = field(default=None, repr=False)  # (devices, rounds) power losses; None: no files


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
    restarted: bool = False


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
        self.restarts: list[dict[str, Any]] = []  # one record per power loss (see FleetWorker._restart)
        self.lives: list[dict[str, Any]] = []  # what the agents of earlier boots counted (see _life)
        self.failed_boot: dict[str, Any] | None = None  # what it held before a power loss whose boot failed

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
        self._bundle: Any = None
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
            infos.append(client.register(_labels(spec)))
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
        bundle = self._bundle = load_bundle(path, threads=1, trusted_keys=cfg.trusted_keys)
        source_model = AdaptableModel(bundle)
        self._source = (source_model, _tta("source"))
        for spec, client, info in zip(self.specs, clients, infos, strict=True):
            stream = DeviceStream(spec, test.x, test.y, cfg.rounds, cfg.batch_size)
            agent = self._agent(bundle, client, info, spec)
            local = (AdaptableModel(bundle), _tta(cfg.tta, cfg.tta_settings)) if cfg.local_baseline else None
            self.devices.append(_SimDevice(spec, stream, agent, local))
        return {"devices": len(self.devices), "bundle_id": self.bundle_id, "bundle_bytes": self.bundle_bytes,
                "seconds": time.perf_counter() - started}

    def _agent(self, bundle: Any, client: Any, info: Any, spec: DeviceSpec) -> Any:
        """A device's agent; with restarts on, its outbox and state live in ``work_dir/<device id>/`` and the
        agent restores what they hold."""
        from device_agents.agent import Agent, AgentConfig
        from device_agents.health import HealthPolicy
        from device_agents.outbox import SqliteOutbox
        from device_agents.selection import EntropyBandSelector, SelectorConfig
        from device_agents.state import AgentStateStore
        from edgeloop.pipeline import make_detector
        from runtime import AdaptableModel

        cfg = self.config
        model = AdaptableModel(bundle)
        upload = cfg.upload_bytes_per_window > 0
        durable = cfg.restarts is not None
        files = Path(cfg.work_dir) / spec.device_id
        if durable:
            files.mkdir(parents=True, exist_ok=True)
        selector = EntropyBandSelector(SelectorConfig(bytes_per_window=cfg.upload_bytes_per_window)) if upload else None
        keys = (info.update_public_key,) if info.update_public_key else None
        extra = ({"contribution_encoding": cfg.contribution_encoding}
                 if "contribution_encoding" in {f.name for f in fields(AgentConfig)} else {})
        config = AgentConfig(device_id=client.device_id, bundle_id=info.bundle_id, cohort=info.cohort,
                             update_keys=keys, health=HealthPolicy(recent_samples=cfg.health_samples),
                             sync_wait_seconds=cfg.sync_wait_seconds, **extra)
        detector = make_detector(cfg.detector, model, cfg.drift_threshold)
        with ExitStack() as opened:  # a failed boot (a corrupt state file) closes what it had opened
            # a real SqliteOutbox: in a file when devices restart, else in memory (no crash to survive)
            outbox = (opened.enter_context(SqliteOutbox(files / "outbox.sqlite3" if durable else ":memory:",
                                                        max_bytes=max(1 << 16, 16 * cfg.upload_bytes_per_window)))
                      if upload else None)
            state = opened.enter_context(AgentStateStore(files / "agent_state.sqlite3")) if durable else None
            agent = Agent(model, _tta(cfg.tta, cfg.tta_settings), detector, selector, outbox, client, config,
                          state=state, server_version=info.latest_update_version)
            opened.pop_all()  # the agent holds them now
        return agent

    def _restart(self, dev: _SimDevice, round_index: int) -> str | None:
        """``dev`` loses power and boots again from its files: a new client registers, a new model and agent
        restore what the state store and outbox hold. Records what it held before and what it took over;
        returns an error text when the boot failed (the device then stays down until a later boot succeeds)."""
        from device_agents.client import DeviceClient

        cfg = self.config
        old = dev.agent
        # a boot that failed before: this is a retry of the same power loss, compared with what was held then
        before: dict[str, Any] = ({**dev.failed_boot, "round": round_index, "retry": True}
                                  if dev.failed_boot is not None else {"round": round_index})
        if old is not None:
            before.update(version=old.version, active_version=old.active_version,
                          outbox_pending=old.outbox.pending_count if old.outbox is not None else 0,
                          drift_reports=old.stats.drift_reports_pending,
                          rollback_reports=old.stats.rollback_reports_pending)
            old.stop_watcher()  # power loss: no TTA save, nothing flushed; committed SQLite transactions stay
            for store in (old.outbox, old.state):
                if store is not None:
                    store.close()
            old.client.close()  # the shared channel stays open (the client does not own it)
            dev.lives.append(_life(old))
            dev.agent = None
        try:
            client = DeviceClient(cfg.server, dev.spec.device_id, timeout=cfg.rpc_timeout,
                                  trusted_keys=cfg.trusted_keys, channel=self._channel)
            agent = self._agent(self._bundle, client, client.register(_labels(dev.spec)), dev.spec)
        except Exception as exc:
            dev.restarts.append({**before, "booted": False})
            dev.failed_boot = before
            return dev.error("restart", exc)
        dev.agent, dev.failed_boot = agent, None
        got = agent.restored
        dev.restarts.append({
            **before, "booted": True,
            "restored_version": got.version, "restored_active_version": got.active_version,
            "restored_tta": got.tta, "restored_detector": got.detector, "restored_selector": got.selector,
            "restored_outbox_pending": agent.outbox.pending_count if agent.outbox else 0,
            "restored_drift_reports": got.drift_reports, "restored_rollback_reports": got.rollback_reports,
        })
        return None

    # -- rounds ---------------------------------------------------------------------------------------------
    def run_round(self, round_index: int, on_device: Callable[[int], None] | None = None) -> list[DeviceRound]:
        """Stream round ``round_index``'s batches through every device and the baselines; online devices
        contribute. ``on_device(1)`` is called after each device."""
        out, images, labels, owners = [], [], [], []
        for dev in self.devices:
            rec = DeviceRound(dev.spec.index, round_index, bool(self.config.online[dev.spec.index, round_index]))
            if dev.agent is None:  # its last boot failed: down for this round, booted again at the next sync
                rec.online = False
                rec.errors = (dev.error(f"round {round_index}", "the device is down (its last boot failed)"),)
                out.append(rec)
                if on_device is not None:
                    on_device(1)
                continue
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
        """Online devices sync after the server's round: upload their outbox, fetch, verify and apply updates.
        A device drawn to restart (``FleetConfig.restarts``), or down since a failed boot, boots first; its new
        client's bytes (the registration too) count in the sync's."""
        out = []
        restarts = self.config.restarts
        for dev in self.devices:
            rec = DeviceRound(dev.spec.index, round_index, bool(self.config.online[dev.spec.index, round_index]))
            errors: list[str] = []
            up0 = down0 = 0
            if dev.agent is None or (restarts is not None and restarts[dev.spec.index, round_index]):
                rec.restarted = True
                failed = self._restart(dev, round_index)
                if failed is not None:
                    errors.append(failed)
            elif rec.online:
                up0, down0 = dev.agent.client.bytes_up, dev.agent.client.bytes_down
            if rec.online and dev.agent is not None:
                try:
                    result = dev.agent.sync(wait_seconds=self.config.sync_wait_seconds)
                    rec.applied = tuple(result.applied_versions)
                    errors.extend(dev.error("sync", e) for e in result.errors)
                except Exception as exc:
                    errors.append(dev.error("sync", exc))
            if dev.agent is not None and (rec.online or rec.restarted):
                rec.bytes_up = dev.agent.client.bytes_up - up0
                rec.bytes_down = dev.agent.client.bytes_down - down0
            rec.errors = tuple(errors)
            out.append(rec)
            if on_device is not None:
                on_device(1)
        return out

    # -- end ------------------------------------------------------------------------------------------------
    def finish(self) -> list[dict[str, Any]]:
        """Per-device summaries (drift detections, updates, rollbacks, bytes, errors); closes the devices."""
        out = []
        for dev in self.devices:
            lives = dev.lives + ([_life(dev.agent)] if dev.agent is not None else [])
            summary: dict[str, Any] = {key: [] if isinstance(value, list) else 0 for key, value in _LIFE_KEYS.items()}
            for life in lives:  # each boot's agent counted from zero: the device's totals are their sums
                for key, value in life.items():
                    summary[key] = summary[key] + value
            out.append({
                "index": dev.spec.index, **summary, "rollback_reasons": summary["rollback_reasons"][:5],
                "version": dev.agent.version if dev.agent is not None else None,
                "active_version": dev.agent.active_version if dev.agent is not None else None,
                "contributions": dev.contributions, "contributor": dev.contributor.name,
                "errors": dev.error_count, "error_messages": list(dev.errors), "restarts": dev.restarts,
            })
        self.close()
        return out

    def close(self) -> None:
        """Close outboxes and the shared channel (idempotent)."""
        for dev in self.devices:
            if dev.agent is None:
                continue
            try:
                dev.agent.close()
            except Exception as exc:  # closing must go on, for its stores and for the other devices
                logger.warning("closing %s: %s", dev.spec.device_id, exc)
            finally:
                for store in (dev.agent.outbox, dev.agent.state):
                    if store is not None:
                        store.close()
        self.devices = []
        if self._channel is not None:
            self._channel.close()
            self._channel = None


_LIFE_KEYS: dict[str, Any] = {
    "drift_detected": [], "update_versions": [], "rollbacks": 0, "rollback_reasons": [], "rejected_updates": 0,
    "sync_failures": 0, "uploaded_samples": 0, "selected": 0, "bytes_up": 0, "bytes_down": 0,
}


def _life(agent: Any) -> dict[str, Any]:
    """What one boot's agent counted (the keys of :data:`_LIFE_KEYS`): lists are concatenated and numbers
    summed over a device's boots."""
    stats = agent.stats
    return {
        "drift_detected": list(stats.drift_positions), "update_versions": list(stats.update_versions),
        "rollbacks": len(agent.rollbacks), "rollback_reasons": [r.reason for r in agent.rollbacks],
        "rejected_updates": stats.rejected_updates, "sync_failures": stats.sync_failures,
        "uploaded_samples": stats.uploaded_samples, "selected": stats.selected,
        "bytes_up": agent.client.bytes_up, "bytes_down": agent.client.bytes_down,
    }


def _labels(spec: DeviceSpec) -> dict[str, str]:
    """What a simulated device tells the server about itself when it registers."""
    return {"simulated": "true", "drift": spec.drift_kind, "byzantine": spec.byzantine or "no"}


def _tta(name: str, settings: dict[str, str] | None = None) -> Any:
    from edgeloop.pipeline import agent_tta

    return agent_tta(name, settings)
