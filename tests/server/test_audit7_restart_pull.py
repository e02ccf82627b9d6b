"""A device's encoded submission names the digest of what it trained from (``base_sha256``); after a lossy
``PullUpdate`` reply that is what this server sent it, which the server used to keep in memory only. After a
restart (or the in-memory cache's eviction) the honest device's next submission was refused with
INVALID_ARGUMENT ("base_sha256 … matches neither version 1's parameters nor what this device was last sent").
The digest is now recorded in the registry before the reply goes out; a digest the server never sent is still
refused.

A real server on 127.0.0.1:0 (int8 top-k updates) with a real SQLite registry, restarted on the same data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agents.client import DeviceClient
from device_agents.errors import TransportError
from device_agents.updates import SubmissionEncoder, decode_params
from edgeloop.admin import AdminClient
from runtime.params import params_digest
from server.app import EdgeloopServer, ServerConfig
from server.updates import current_params
from tests.server.test_trainable_federated import full_initial, trainable_bundle_files, trainable_values, write_bundle


def _server(data_dir: Path) -> EdgeloopServer:
    srv = EdgeloopServer(ServerConfig(data_dir=data_dir, port=0, max_workers=8, update_encoding="int8_topk_delta",
                                      update_topk_fraction=0.1))
    srv.start()
    return srv


def test_a_submission_from_a_lossy_pull_is_accepted_after_a_server_restart(tmp_path: Path) -> None:
    srv = _server(tmp_path / "data")
    with AdminClient(f"127.0.0.1:{srv.port}") as admin:
        admin.publish_bundle(write_bundle(trainable_bundle_files(), tmp_path / "bundle"))
    client = DeviceClient(f"127.0.0.1:{srv.port}", "dev-1")
    bundle_id = client.register().bundle_id
    held, version, sha = full_initial(), 0, params_digest(full_initial())
    trained = {k: v + np.float32(0.05) for k, v in trainable_values().items()}
    client.submit_update(bundle_id, 0, 5, encoding="int8_delta",
                         payload=SubmissionEncoder("int8_delta").encode(trained, held), base_sha256=sha)
    assert srv.runner.wait(srv.runner.start("fedavg").round_id, timeout=30).state == "done"
    update = client.pull_update(bundle_id, version, sha)
    assert update is not None and update.encoding == "int8_topk_delta"
    held, version, sha = decode_params(update, held, version), update.version, update.sha256
    exact, _ = current_params(srv.state, bundle_id)
    assert sha != params_digest(exact)  # a lossy copy: only the reply's digest names it
    client.close()
    srv.stop(grace=1.0)

    srv = _server(tmp_path / "data")
    try:
        client = DeviceClient(f"127.0.0.1:{srv.port}", "dev-1")
        client.register()
        trained = {k: held[k] + np.float32(0.05) for k in trainable_values()}
        payload = SubmissionEncoder("int8_delta").encode(trained, held)
        with pytest.raises(TransportError, match="base_sha256"):  # a digest this server never sent
            client.submit_update(bundle_id, version, 5, encoding="int8_delta", payload=payload,
                                 base_sha256="ab" * 32)
        submission_id = client.submit_update(bundle_id, version, 5, encoding="int8_delta", payload=payload,
                                             base_sha256=sha)
        assert [s.id for s in srv.registry.unused_submissions(bundle_id)] == [submission_id]
        client.close()
    finally:
        srv.stop(grace=1.0)
