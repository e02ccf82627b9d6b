"""Flower's side of the federated benchmark, run in Flower's own virtual environment (flwr needs protobuf < 7,
so it is never a project dependency): ``python benchmarks/flower_side.py SPEC.json OUT.json``.

The spec names the MNIST files, the clients' index partition and the initial weights (both written by
``bench_federated``, so both frameworks see the same split and the same start), and the protocol. Clients
train with the same :class:`edgeloop.federated.trainer.LocalSGDTrainer` as edgeloop's devices; aggregation is
Flower's FedAvg in Flower's simulation engine (Ray), with central evaluation after each round. Bytes are the
serialized parameter tensors of each fit instruction and fit result.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(spec_path: str, out_path: str) -> None:
    """Run the protocol of ``spec_path`` with Flower; write accuracy per round, wall time and bytes."""
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from edgeloop.federated.trainer import LocalSGDTrainer, TrainerConfig, evaluate
    from exporter.models import ModelSpec

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    clients_file = spec["clients_data"]  # x<cid> uint8 (N, C, H, W), y<cid>: read per client, in the Ray workers
    test = np.load(spec["test_data"])
    x_test, y_test = test["x"].astype(np.float32) / 255.0, test["y"].astype(np.int64)
    init = np.load(spec["initial"])
    names = list(spec["names"])
    model_spec = ModelSpec(**{**spec["model_spec"], "mean": tuple(spec["model_spec"]["mean"]),
                              "std": tuple(spec["model_spec"]["std"])})
    cfg = TrainerConfig(**spec["trainer"])
    arch = spec["arch"]
    history: list[dict] = []
    traffic = {"bytes_down": 0, "bytes_up": 0, "messages_down": 0, "messages_up": 0}

    class Client(NumPyClient):
        def __init__(self, cid: int) -> None:
            with np.load(clients_file) as data:
                x, y = data[f"x{cid}"].astype(np.float32) / 255.0, data[f"y{cid}"].astype(np.int64)
            self.trainer = LocalSGDTrainer(arch, x, y, cfg, spec=model_spec, client_id=cid)

        def fit(self, parameters: list, config: dict) -> tuple[list, int, dict]:
            params, n = self.trainer.train_round(dict(zip(names, parameters, strict=True)))
            return [params[k] for k in names], n, {}

    def client_fn(context: Context):
        torch.set_num_threads(1)
        return Client(int(context.node_config["partition-id"])).to_client()

    t_start = [0.0]

    def evaluate_fn(server_round: int, parameters: list, config: dict):
        if server_round == 0:
            t_start[0] = time.perf_counter()
            return None
        acc = evaluate(arch, model_spec, dict(zip(names, parameters, strict=True)), x_test, y_test,
                       threads=int(spec.get("eval_threads", 2)))
        history.append({"round": server_round, "accuracy": acc, "elapsed_s": time.perf_counter() - t_start[0]})
        return 0.0, {"accuracy": acc}

    class CountingFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            out = super().configure_fit(server_round, parameters, client_manager)
            size = sum(len(t) for t in parameters.tensors)
            traffic["bytes_down"] += size * len(out)
            traffic["messages_down"] += len(out)
            return out

        def aggregate_fit(self, server_round, results, failures):
            for _, res in results:
                traffic["bytes_up"] += sum(len(t) for t in res.parameters.tensors)
                traffic["messages_up"] += 1
            return super().aggregate_fit(server_round, results, failures)

    n_clients, per_round = int(spec["clients"]), int(spec["per_round"])
    initial = ndarrays_to_parameters([init[k] for k in names])

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = CountingFedAvg(fraction_fit=per_round / n_clients, fraction_evaluate=0.0, min_fit_clients=per_round,
                                  min_evaluate_clients=0, min_available_clients=n_clients, evaluate_fn=evaluate_fn,
                                  initial_parameters=initial)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=int(spec["rounds"])))

    t0 = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=n_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": int(spec.get("cpus", 2))}})
    wall = time.perf_counter() - t0
    import flwr

    total = traffic["bytes_up"] + traffic["bytes_down"]
    messages = traffic["messages_up"] + traffic["messages_down"]
    Path(out_path).write_text(json.dumps({
        "flwr_version": flwr.__version__, "torch_version": torch.__version__,
        "accuracy": [h["accuracy"] for h in history], "rounds": history, "wall_s": wall, **traffic,
        "bytes_total": total, "bytes_per_message": total / max(1, messages)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
