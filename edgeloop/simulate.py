"""``edgeloop simulate``: a simulated fleet of real device agents against a real server, with a report.

1. **Model**: a small model for the dataset is trained and exported to a signed bundle the way ``edgeloop
   demo`` does (:mod:`edgeloop.pipeline`), cached under ``--cache-dir`` (default ``$EDGELOOP_CACHE`` or
   ``~/.cache/edgeloop/simulate``); ``--bundle`` uses an existing adaptable bundle instead.
2. **Server**: by default an edgeloop server starts in this process on a free port of 127.0.0.1 (SQLite
   registry and blob store in ``OUT/server``) with the chosen ``--aggregator``, and the bundle is published;
   ``--server HOST:PORT`` uses a running server instead (the bundle is published there through the admin
   service).
3. **Fleet**: :func:`device_agents.fleet.scenarios.generate_fleet` draws every device (label skew, drift
   schedule, speed, dropout, byzantine attack) from ``--scenario`` and ``--seed``; the engine
   (``inprocess`` or ``ray``) runs them in groups that share one inference session and one gRPC channel.
4. **Rounds**: devices stream their batches through the agent (TTA, drift detector, selective upload) and the
   baselines; online devices contribute; a federated round runs on the server (admin ``StartRound``); online
   devices sync (outbox upload, signed update verified, applied, health-checked, rolled back if worse).
5. **Report**: ``OUT/report.json``, ``OUT/fleet_accuracy.png``, ``OUT/device_accuracy.png``, ``OUT/bytes.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device_agents.fleet.engine import ENGINES
from device_agents.fleet.scenarios import DEFAULT_SCENARIO, SCENARIOS, get_scenario, scenario_help
from server.aggregation import parse_option

logger = logging.getLogger(__name__)

DATASETS = ("digits", "mnist", "cifar10")
AGGREGATORS = ("fedavg", "fedau", "fedbuff", "trimmed_mean", "median", "krum", "dp_fedavg")
ATTACK_CHOICES = ("sign_flip", "scaled", "random", "mixed")


@dataclass(frozen=True)
class Recipe:
    """How the simulator trains a student for a dataset when no bundle is given."""

    arch: str
    epochs: int
    limit: int | None = None


RECIPES: dict[str, Recipe] = {
    "digits": Recipe("small_cnn", 20),
    "mnist": Recipe("smallcnn", 2),
    "cifar10": Recipe("resnet8", 4, limit=10_000),
}


@dataclass(frozen=True)
class SimulationConfig:
    """Everything ``edgeloop simulate`` takes; validated at construction (``ValueError`` naming the field)."""

    out: Path
    devices: int = 100
    dataset: str = "digits"
    scenario: str = DEFAULT_SCENARIO
    rounds: int = 10
    engine: str = "inprocess"
    workers: int = 4
    address: str | None = None
    server: str | None = None
    admin_token: str | None = field(default=None, repr=False)
    seed: int = 0
    aggregator: str = "fedavg"
    aggregator_options: dict[str, Any] = field(default_factory=dict)
    tta: str = "alpha_bn"
    tta_settings: dict[str, str] = field(default_factory=dict)
    detector: str = "page_hinkley"
    batch_size: int = 16
    dirichlet_alpha: float | None = None
    dropout: float | None = None
    byzantine: float | None = None
    attack: str | None = None
    attack_scale: float | None = None
    labelled: float | None = None
    late: float | None = None
    restarts: float | None = None
    upload_bytes_per_window: int = 4096
    health_samples: int = 64
    local_baseline: bool = True
    bundle: Path | None = None
    cache_dir: Path | None = None
    data_dir: Path | None = None
    update_encoding: str = "int8_delta"
    contribution_encoding: str = "int8_delta"
    round_timeout: float = 300.0
    plots: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))

        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

        for name in ("devices", "rounds", "workers", "batch_size"):
            positive(name)
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        get_scenario(self.scenario)
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; known: {', '.join(ENGINES)}")
        if self.address is not None and self.engine != "ray":
            raise ValueError("--address joins a Ray cluster; it needs --engine ray")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; known: {', '.join(AGGREGATORS)}")
        if self.server is None:  # the in-process server builds it; a bad option fails here, before any training
            from server.aggregation import check_aggregator

            check_aggregator(self.aggregator, self.aggregator_options)
        for name in ("dropout", "byzantine", "labelled", "late", "restarts"):
            value = getattr(self, name)
            if value is not None and not (0.0 <= value <= 1.0):
                raise ValueError(f"--{name} must be a fraction in [0, 1], got {value}")
        if self.dropout is not None and self.dropout >= 1.0:
            raise ValueError("--dropout must be below 1 (a device that is always offline never takes part)")
        if self.dirichlet_alpha is not None and not self.dirichlet_alpha > 0:
            raise ValueError(f"--dirichlet-alpha must be positive, got {self.dirichlet_alpha}")
        if self.attack is not None and self.attack not in ATTACK_CHOICES:
            raise ValueError(f"unknown attack {self.attack!r}; known: {', '.join(ATTACK_CHOICES)}")
        if self.upload_bytes_per_window < 0:
            raise ValueError(f"--upload-bytes must be >= 0, got {self.upload_bytes_per_window}")
        if self.health_samples < 0:
            raise ValueError(f"--health-samples must be >= 0, got {self.health_samples}")
        from runtime.update_codec import ENCODINGS

        for name in ("update_encoding", "contribution_encoding"):
            if getattr(self, name) not in ENCODINGS:
                raise ValueError(f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; known: "
                                 f"{', '.join(ENCODINGS)}")
        if self.round_timeout <= 0:
            raise ValueError(f"--round-timeout must be positive, got {self.round_timeout}")
        from device_agents.drift import DETECTORS
        from device_agents.tta import TTA_METHODS

        if self.tta not in TTA_METHODS:
            raise ValueError(f"unknown TTA method {self.tta!r}; known: {', '.join(sorted(TTA_METHODS))}")
        from edgeloop.pipeline import agent_tta

        agent_tta(self.tta, self.tta_settings)  # a bad --tta-set is named here, before any device starts
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown drift detector {self.detector!r}; known: {', '.join(DETECTORS)}")
        if self.bundle is not None and not (Path(self.bundle) / "manifest.json").is_file():
            raise ValueError(f"--bundle {self.bundle} is not a bundle directory (no manifest.json)")
        if self.bundle is not None:
            _check_adaptable(Path(self.bundle))
        self.scenario_obj()  # the overrides must make a valid scenario

    def scenario_obj(self) -> Any:
        """The scenario with the command line's overrides."""
        return get_scenario(self.scenario).with_overrides(
            dirichlet_alpha=self.dirichlet_alpha, dropout_max=self.dropout, byzantine=self.byzantine,
            attack=self.attack, attack_scale=self.attack_scale, labelled=self.labelled, late=self.late,
            restarts=self.restarts)

    def summary(self) -> dict[str, Any]:
        """JSON-ready config for the report (no secrets)."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "admin_token"}
        out["scenario_parameters"] = {k: v for k, v in asdict(self.scenario_obj()).items()}
        if self.server is not None:  # an external server aggregates with its own configured rule
            out["aggregator"] = out["aggregator_options"] = None
        return out


def check_data(dataset: str, data_dir: Path | None) -> None:
    """Fail early, naming the missing file, when ``dataset``'s test split cannot be loaded."""
    from edgeloop.data import load_dataset

    try:
        load_dataset(dataset, "test", data_dir=data_dir)
    except FileNotFoundError as exc:
        raise ValueError(f"dataset {dataset!r} is not available: {exc}") from exc


def default_cache_dir() -> Path:
    """``$EDGELOOP_CACHE/simulate`` or ``~/.cache/edgeloop/simulate``."""
    root = os.environ.get("EDGELOOP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "edgeloop") / "simulate"


def _check_adaptable(bundle: Path) -> None:
    """Refuse a bundle without adaptable parameters (a wrapped foreign model): the fleet's rounds aggregate them."""
    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--bundle {bundle}: manifest.json is unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or not manifest.get("adaptable"):
        name = manifest.get("name", bundle.name) if isinstance(manifest, dict) else bundle.name
        raise ValueError(f"--bundle {bundle}: bundle {name!r} has no adaptable parameters (a wrapped foreign model?); "
                         "edgeloop simulate runs federated rounds over them — export one with `edgeloop export`, or "
                         "run a foreign model on devices with `edgeloop serve --bundle` + `edgeloop agent --tta lame`")


def prepare_bundle(dataset: str, seed: int, cache_dir: Path | None = None,
                   log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """``(bundle directory, signing key)`` of a student for ``dataset``: trained and exported once, cached.

    The bundle holds the fp32 adaptable model (no int8: the simulator runs the adaptable graph) and is signed
    with a key kept beside it; a cached bundle is verified before it is reused.
    """
    from edgeloop import pipeline
    from runtime import load_bundle
    from runtime.errors import BundleError

    recipe = RECIPES[dataset]
    root = (cache_dir or default_cache_dir()) / f"{dataset}-{recipe.arch}-e{recipe.epochs}-seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    ckpt, bundle, key = root / "student.pt", root / "bundle", root / "signing_key.pem"
    if (bundle / "manifest.json").is_file():
        try:
            load_bundle(bundle, threads=1)
            return bundle, key
        except BundleError as exc:
            log(f"cached bundle {bundle} fails verification ({exc}); exporting again")
    if not ckpt.is_file():
        log(f"training {recipe.arch} on {dataset} ({recipe.epochs} epochs, cached in {root})")
        pipeline.train_checkpoint(arch=recipe.arch, dataset=dataset, out=ckpt, epochs=recipe.epochs, seed=seed,
                                  limit=recipe.limit)
    log(f"exporting the bundle ({bundle})")
    pipeline.export_checkpoint(ckpt, out=bundle, int8=False, overwrite=True, seed=seed, key_path=key)
    return bundle, key


@contextmanager
def _server(cfg: SimulationConfig, trusted: tuple[Path, ...]) -> Iterator[str]:
    """The server address: the given ``--server``, or an in-process server for the run's lifetime."""
    if cfg.server is not None:
        yield cfg.server
        return
    from server.app import create_server
    from server.config import ServerConfig

    workers = max(32, 8 * cfg.workers)
    config = ServerConfig(data_dir=cfg.out / "server", host="127.0.0.1", port=0, max_workers=workers,
                          trusted_publisher_keys=trusted, update_encoding=cfg.update_encoding,
                          aggregator=cfg.aggregator, aggregator_options=dict(cfg.aggregator_options),
                          max_samples_per_upload=4096)
    with create_server(config) as srv:
        yield f"127.0.0.1:{srv.port}"


class _Reporter:
    """Progress: a rich display on a terminal, plain log lines otherwise, nothing with ``quiet``."""

    def __init__(self, quiet: bool, console: Any = None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        if not self.console.is_terminal:  # a log file: room for the summary table
            self.console.width = max(self.console.width, 120)
        self.quiet = quiet
        self.live = not quiet and self.console.is_terminal
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> _Reporter:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=False)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def log(self, text: str) -> None:
        """A line of progress (stderr)."""
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(f"[simulate] {text}", file=sys.stderr, flush=True)

    def phase(self, description: str, total: int) -> Callable[[int], None]:
        """Start a bar of ``total`` steps; returns the (thread-safe) advance function."""
        if self.progress is None:
            return lambda n: None
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)
        task = self.task
        return lambda n: self.progress.advance(task, n)


def _round_line(k: int, rounds: int, run: list[Any], info: dict[str, Any]) -> str:
    samples = sum(r.samples for r in run)
    acc = sum(r.correct for r in run) / max(samples, 1)
    base = sum(r.source_correct for r in run) / max(samples, 1)
    state = (f"update v{info['update_version']} ({info['seconds']:.2f} s)" if info.get("update_version")
             else f"no update ({info.get('skipped', '')})")
    restarted = f", {info['restarted']} restarted" if info.get("restarted") else ""
    return (f"round {k + 1}/{rounds}: {sum(r.online for r in run)} online, {info['submissions']} contributed, "
            f"{state}; accuracy {acc:.3f} (no adaptation {base:.3f}), errors {sum(len(r.errors) for r in run)}"
            f"{restarted}")


def _server_round(admin: Any, cfg: SimulationConfig, submissions: int) -> tuple[dict[str, Any], str | None]:
    """Run one federated round on the server; ``(info, error)`` — an aggregation failure is an error."""
    import grpc

    from edgeloop.admin import RoundFailedError

    info: dict[str, Any] = {"submissions": submissions, "update_version": 0, "seconds": 0.0}
    if submissions == 0:
        info["skipped"] = "no contributions"
        return info, None
    try:
        rid = admin.start_round("fedavg")
        done = admin.wait_round(rid, timeout=cfg.round_timeout)
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "?"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == "FAILED_PRECONDITION" and "no unused" in (details or ""):
            info["skipped"] = "the server had already aggregated every submission"
            return info, None
        return {**info, "skipped": f"StartRound failed: {code}"}, f"StartRound: {code}: {details}"
    except RoundFailedError as exc:
        if "NothingToAggregateError" in str(exc):  # an asynchronous (FedBuff) flush took them first
            info["skipped"] = "the server had already aggregated every submission"
            return info, None
        return {**info, "skipped": str(exc)}, str(exc)
    except TimeoutError as exc:
        return {**info, "skipped": str(exc)}, str(exc)
    info.update(round_id=done.round_id, update_version=done.update_version, seconds=round(done.seconds, 3),
                metrics={k: round(float(v), 5) for k, v in done.metrics.items()})
    return info, None


def run_simulation(cfg: SimulationConfig, *, quiet: bool = False, console: Any = None) -> dict[str, Any]:
    """Run the simulation of ``cfg``; write the report (and plots) into ``cfg.out``; return the report."""
    started = time.perf_counter()
    cfg.scenario_obj()
    check_data(cfg.dataset, cfg.data_dir)
    from edgeloop.pipeline import fresh_run_state

    fresh_run_state(cfg.out)
    from edgeloop.data import DATA_DIR_ENV

    previous = os.environ.get(DATA_DIR_ENV)
    if cfg.data_dir is not None:  # training and export (edgeloop.pipeline) read the data from the default place
        os.environ[DATA_DIR_ENV] = str(Path(cfg.data_dir).resolve())
    ray_started = False
    try:
        if cfg.engine == "ray":  # before any gRPC thread of this process exists (Ray forks its helpers)
            from device_agents.fleet.engine import start_ray

            ray_started = start_ray(cfg.address)
        return _run(cfg, started, quiet, console)
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        if cfg.data_dir is not None:
            if previous is None:
                os.environ.pop(DATA_DIR_ENV, None)
            else:
                os.environ[DATA_DIR_ENV] = previous


@dataclass
class _Rounds:
    """What the round loop collected."""

    runs: list[list[Any]] = field(default_factory=list)
    syncs: list[list[Any]] = field(default_factory=list)
    info: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _round_loop(cfg: SimulationConfig, engine: Any, admin: Any, rep: _Reporter) -> _Rounds:
    """Per round: devices stream and contribute, the server aggregates, online devices sync."""
    out = _Rounds()
    latest = 0
    for k in range(cfg.rounds):
        advance = rep.phase(f"round {k + 1}/{cfg.rounds}: devices (batches, then sync)", 2 * cfg.devices)
        run = engine.run_round(k, advance)
        info, error = _server_round(admin, cfg, sum(r.contributed for r in run))
        if error:
            out.errors.append(f"round {k + 1}: {error}")
        sync = engine.sync(k, advance)
        info.update(round=k + 1, online=int(sum(r.online for r in run)),
                    updates_applied=int(sum(len(r.applied) for r in sync)),
                    restarted=int(sum(getattr(r, "restarted", False) for r in sync)))
        if info.get("update_version"):  # a FedBuff server also publishes between StartRounds
            info["versions_published"] = int(info["update_version"]) - latest
            latest = int(info["update_version"])
        out.runs.append(run)
        out.syncs.append(sync)
        out.info.append(info)
        rep.log(_round_line(k, cfg.rounds, run, info))
    return out


def _model(cfg: SimulationConfig, rep: _Reporter) -> tuple[Path, tuple[Path, ...]]:
    """The bundle to publish and the public keys devices trust for it (none: any valid signature)."""
    if cfg.bundle is not None:
        return Path(cfg.bundle), ()
    from exporter.signing import public_path

    bundle, key = prepare_bundle(cfg.dataset, cfg.seed, cfg.cache_dir, rep.log)
    return bundle, (public_path(key),)


def _run(cfg: SimulationConfig, started: float, quiet: bool, console: Any) -> dict[str, Any]:
    from device_agents.fleet.engine import create_engine
    from device_agents.fleet.report import build_report, plot_report, write_report
    from device_agents.fleet.scenarios import generate_fleet, participation, restart_draws
    from device_agents.fleet.worker import FleetConfig
    from edgeloop.admin import AdminClient
    from edgeloop.data import default_data_dir, load_dataset
    from runtime.signing import load_public_key

    timings: dict[str, float] = {}
    with _Reporter(quiet, console) as rep:
        bundle, trusted_pub = _model(cfg, rep)
        timings["model"] = time.perf_counter() - started
        test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir)
        scenario = cfg.scenario_obj()
        specs = generate_fleet(scenario, cfg.devices, test.y, rounds=cfg.rounds, batch_size=cfg.batch_size,
                               seed=cfg.seed)
        with _server(cfg, trusted_pub) as address, \
                AdminClient(address, timeout=60.0, admin_token=cfg.admin_token) as admin:
            bundle_id = admin.publish_bundle(bundle)
            rule = cfg.aggregator if cfg.server is None else "the server's own"
            rep.log(f"server {address}: bundle {bundle_id[:12]} published; aggregator {rule}; "
                    f"{cfg.devices} devices ({cfg.scenario}) on the {cfg.engine} engine, {cfg.workers} workers")
            fleet_config = FleetConfig(
                server=address, dataset=cfg.dataset, rounds=cfg.rounds, batch_size=cfg.batch_size,
                work_dir=str((cfg.out / "devices").resolve()), online=participation(specs, cfg.rounds, cfg.seed),
                data_dir=str(Path(cfg.data_dir or default_data_dir()).resolve()),  # absolute: actors run elsewhere
                tta=cfg.tta, tta_settings=dict(cfg.tta_settings), detector=cfg.detector,
                upload_bytes_per_window=cfg.upload_bytes_per_window, health_samples=cfg.health_samples,
                local_baseline=cfg.local_baseline, trusted_keys=tuple(map(load_public_key, trusted_pub)) or None,
                contribution_encoding=cfg.contribution_encoding,
                restarts=(restart_draws(specs, cfg.rounds, scenario.restarts, cfg.seed) if scenario.restarts > 0
                          else None))
            t0 = time.perf_counter()
            engine = create_engine(cfg.engine, specs, fleet_config, workers=cfg.workers, address=cfg.address)
            try:
                setup = engine.setup()
                timings["setup"] = time.perf_counter() - t0
                rep.log(f"{cfg.devices} devices registered in {timings['setup']:.1f} s")
                t0 = time.perf_counter()
                rounds = _round_loop(cfg, engine, admin, rep)
                timings["rounds"] = time.perf_counter() - t0
                finals = engine.finish()
            finally:
                engine.close()
        timings["total"] = time.perf_counter() - started
        report = build_report(specs, rounds.runs, rounds.syncs, finals, rounds_info=rounds.info,
                              config={**cfg.summary(), "bundle_id": bundle_id, "address": address},
                              timings=timings, setup=setup, batch_size=cfg.batch_size, round_errors=rounds.errors)
        report["engine"] = {"name": engine.name, "workers": engine.workers,
                            "address": getattr(engine, "address", None)}
        path = write_report(report, cfg.out)
        if cfg.plots:
            plot_report(report, cfg.out)
        if not quiet:
            rep.console.print(summary_table(report))
        acc = report["overall_accuracy"]
        restarts = report["restarts"]
        if restarts["count"]:
            rep.log(f"{restarts['count']} power losses: {restarts['resumed']} devices booted holding the update "
                    f"they had, {restarts['tta_restored']} with their TTA state (one saved for parameters an update "
                    f"has since replaced is dropped); outbox samples kept "
                    f"{restarts['outbox_samples']['after']}/{restarts['outbox_samples']['before']}, undelivered "
                    f"reports {restarts['undelivered_reports']['after']}/{restarts['undelivered_reports']['before']}"
                    + (f", {restarts['failed_boots']} boots failed" if restarts["failed_boots"] else ""))
        rep.log(f"done in {report['wall_seconds']:.1f} s: accuracy {acc['federated']} (no adaptation "
                f"{acc['no_adaptation']}), {report['bytes']['up']:,} bytes up, {report['bytes']['down']:,} down, "
                f"{report['errors']['count']} errors, {report['rollbacks']} rollbacks; report {path}")
    return report


def summary_table(report: dict[str, Any]) -> Any:
    """A rich table of the run, one row per round: accuracy (fleet, TTA alone, no adaptation), participation,
    the update version, bytes."""
    from rich.table import Table

    fleet = report["fleet_accuracy"]
    table = Table(title=f"{report['devices']} devices, scenario {report['config']['scenario']} on "
                        f"{report['config']['dataset']} ({report['engine']['name']} engine)")
    for col in ("round", "fleet", "TTA only", "no adaptation", "online", "contributed", "version", "kB up",
                "kB down"):
        table.add_column(col, justify="right")

    def pct(values: list[Any], k: int) -> str:
        return "—" if not values or values[k] is None else f"{100 * values[k]:.1f} %"

    for k, info in enumerate(report["rounds_detail"]):
        table.add_row(str(k + 1), pct(fleet["federated"], k), pct(fleet.get("local_tta", []), k),
                      pct(fleet["no_adaptation"], k), str(report["participation"]["online"][k]),
                      str(report["participation"]["contributed"][k]), str(info.get("update_version") or "—"),
                      f"{report['bytes']['up_per_round'][k] / 1e3:,.0f}",
                      f"{report['bytes']['down_per_round'][k] / 1e3:,.0f}")
    return table


# -- command line -------------------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``simulate`` subcommand's parser (scenarios listed in its help)."""
    p = sub.add_parser(
        "simulate", help="simulate a fleet of device agents against a real server; report accuracy, bytes, drift",
        description="Simulate a fleet: real device agents (onnxruntime, TTA, drift detection, selective upload) "
        "with their own drifting, label-skewed streams, against a real edgeloop server over loopback gRPC, "
        "with federated rounds. Writes OUT/report.json and PNG plots.",
        epilog="scenarios (--scenario):\n" + scenario_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=100, help="number of simulated devices; default 100")
    p.add_argument("--dataset", default="digits", help="digits (embedded), mnist or cifar10 (../shared/data or "
                   "$EDGELOOP_DATA_DIR); default digits")
    p.add_argument("--scenario", default=DEFAULT_SCENARIO, help=f"fleet scenario (listed below); default "
                   f"{DEFAULT_SCENARIO}; one of {', '.join(SCENARIOS)}")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds; default 10")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory: report.json, plots, and the run's server/ and devices/ state "
                   "(replaced by each run)")
    p.add_argument("--engine", default="inprocess", help="inprocess (thread pool) or ray (actors); default "
                   "inprocess")
    p.add_argument("--workers", type=int, default=None, help="device groups (threads or Ray actors), each with "
                   "one shared inference session; default 4 (inprocess) or 2 (ray)")
    p.add_argument("--address", default=None, help="Ray cluster to join (auto, host:port, ray://host:port); "
                   "default: a local Ray instance")
    p.add_argument("--server", default=None, metavar="HOST:PORT", help="use a running edgeloop server (default: "
                   "start one in-process on 127.0.0.1:0)")
    p.add_argument("--admin-token-file", type=Path, default=None, help="admin token for --server")
    p.add_argument("--seed", type=int, default=0, help="seed of the fleet, streams and model; default 0")
    p.add_argument("--aggregator", default="fedavg", help=f"server aggregation rule: {', '.join(AGGREGATORS)}; "
                   "default fedavg (ignored with --server: the server's own)")
    p.add_argument("--aggregator-option", action="append", default=[], metavar="KEY=VALUE",
                   help="aggregator setting (e.g. byzantine=2 for krum, beta=0.2 for trimmed_mean); repeatable")
    p.add_argument("--tta", default="alpha_bn", help="device TTA method; default alpha_bn")
    p.add_argument("--tta-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the device TTA method's config (as for `edgeloop agent`); repeatable")
    p.add_argument("--detector", default="page_hinkley", help="device drift detector; default page_hinkley")
    p.add_argument("--batch-size", type=int, default=16, help="images per device batch; default 16")
    p.add_argument("--dirichlet-alpha", type=float, default=None, help="label-skew concentration (overrides the "
                   "scenario's)")
    p.add_argument("--dropout", type=float, default=None, help="maximum per-round dropout probability in [0, 1) "
                   "(overrides the scenario's)")
    p.add_argument("--byzantine", type=float, default=None, help="fraction of byzantine devices in [0, 1] "
                   "(overrides the scenario's)")
    p.add_argument("--attack", default=None, help=f"byzantine attack: {', '.join(ATTACK_CHOICES)}")
    p.add_argument("--attack-scale", type=float, default=None, help="attack strength (default per attack)")
    p.add_argument("--labelled", type=float, default=None, help="fraction of devices that receive labels and take "
                   "zeroth-order (SPSA) steps (overrides the scenario's)")
    p.add_argument("--late", type=float, default=None, help="fraction of devices whose contributions reach the "
                   "server a round late (overrides the scenario's)")
    p.add_argument("--restarts", type=float, default=None, help="probability in [0, 1] that a device loses power "
                   "after a round and boots from its state files (overrides the scenario's)")
    p.add_argument("--upload-bytes", type=int, default=4096, help="each device's selective-upload budget per "
                   "minute in bytes (0: no uploads); default 4096")
    p.add_argument("--health-samples", type=int, default=64, help="recent samples each device keeps for its "
                   "rollback check; default 64")
    p.add_argument("--no-local-baseline", action="store_true", help="skip the TTA-without-fleet baseline")
    p.add_argument("--bundle", type=Path, default=None, help="use this adaptable bundle instead of training one")
    p.add_argument("--cache-dir", type=Path, default=None, help="where trained bundles are cached; default "
                   "$EDGELOOP_CACHE/simulate or ~/.cache/edgeloop/simulate")
    p.add_argument("--data-dir", type=Path, default=None, help="directory holding mnist/ and cifar10_jpeg/")
    p.add_argument("--update-encoding", default="int8_delta", help="server update encoding: f32, int8_delta, "
                   "int8_topk_delta; default int8_delta")
    p.add_argument("--contribution-encoding", default="int8_delta", help="how devices send contributions: f32, "
                   "int8_delta, int8_topk_delta (error feedback); default int8_delta")
    p.add_argument("--no-plots", action="store_true", help="write report.json only")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """A validated :class:`SimulationConfig` from the parsed command line."""
    from device_agents.tta.options import parse_options

    workers = args.workers if args.workers is not None else (2 if args.engine == "ray" else 4)
    token = args.admin_token_file.read_text().strip() if args.admin_token_file else None
    return SimulationConfig(
        out=args.out, devices=args.devices, dataset=args.dataset, scenario=args.scenario, rounds=args.rounds,
        engine=args.engine, workers=workers, address=args.address, server=args.server, admin_token=token,
        seed=args.seed, aggregator=args.aggregator, aggregator_options=dict(map(parse_option, args.aggregator_option)),
        tta=args.tta, tta_settings=parse_options(args.tta_set), detector=args.detector, batch_size=args.batch_size,
        dirichlet_alpha=args.dirichlet_alpha,
        dropout=args.dropout, byzantine=args.byzantine, attack=args.attack, attack_scale=args.attack_scale,
        labelled=args.labelled, late=args.late, restarts=args.restarts,
        upload_bytes_per_window=args.upload_bytes, health_samples=args.health_samples,
        local_baseline=not args.no_local_baseline, bundle=args.bundle, cache_dir=args.cache_dir,
        data_dir=args.data_dir, update_encoding=args.update_encoding,
        contribution_encoding=args.contribution_encoding, plots=not args.no_plots,
    )


def command(args: argparse.Namespace) -> int:
    """``edgeloop simulate``: run and print where the report is."""
    cfg = config_from_args(args)
    report = run_simulation(cfg, quiet=args.quiet)
    print(f"report: {cfg.out / 'report.json'}  (accuracy {report['overall_accuracy']['federated']}, "
          f"no adaptation {report['overall_accuracy']['no_adaptation']}, {report['errors']['count']} errors, "
          f"{report['wall_seconds']:.1f} s)")
    return 0 if report["errors"]["count"] == 0 else 1

