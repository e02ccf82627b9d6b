"""The device transport: a gRPC client of ``edgeloop.v1.DeviceService``.

This is the only agent module that imports generated protobuf code; everything it returns is a numpy or
domain object from :mod:`device_agents.messages`. Byte counters add up ``ByteSize()`` of every message sent
(``bytes_up``) and received (``bytes_down``), in total and per RPC method (:meth:`DeviceClient.traffic`, with
message counts, so bytes per message of each kind are known).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, TypeVar

import grpc
import numpy as np

from device_agents.channel import TlsOptions, open_channel
from device_agents.errors import BundleDownloadError, TransportError, UpdateIntegrityError
from device_agents.messages import ParameterUpdate, RegisterInfo, RollbackInfo, UploadResult
from device_agents.outbox import OutboxSample, OutboxStats, SqliteOutbox
from proto.convert import tensor_to_proto, tensors_to_proto
from proto.edgeloop.v1 import common_pb2, device_pb2, device_pb2_grpc
from runtime.bundle import load_bundle
from runtime.errors import BundleError, ManifestError
from runtime.files import STALE_TEMPORARY_SECONDS
from runtime.manifest import MANIFEST_NAME, decode_manifest
from runtime.signing import SIGNATURE_NAME, verify_bundle_signature

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_END_CODES = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
# What the server answers when something a sample holds is refused (its shape, dtype or bundle): the whole
# UploadSamples stream fails, so one such sample would fail every batch it is in.
_SAMPLE_REFUSED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def _manifest_of(bundle_id: str, root: Path) -> bytes:
    """The bytes of the manifest downloaded into ``root``, which must hash to ``bundle_id`` (the bundle's id)."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleDownloadError(f"bundle {bundle_id[:12]}: the server sent no {MANIFEST_NAME}")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != bundle_id:
        raise BundleDownloadError(f"bundle {bundle_id[:12]}: {MANIFEST_NAME} hashes to {actual[:12]}")
    return data


_DOWNLOAD_DIR = re.compile(r"\.[0-9a-f]{12}-[a-z0-9_]+")
"""The name :meth:`DeviceClient.fetch_bundle` gives its temporary directories: ``.<bundle_id[:12]>-<random>``."""


def remove_stale_downloads(dest: Path, max_age: float = STALE_TEMPORARY_SECONDS) -> list[Path]:
    """Remove the temporary download directories in ``dest`` (named as :meth:`DeviceClient.fetch_bundle` names
    them) in which nothing changed for ``max_age`` seconds (the newest mtime of the directory and of what it
    holds), logging each at INFO; return those removed. One that cannot be read or removed is logged and left."""
    cutoff = time.time() - max_age
    removed: list[Path] = []
    with os.scandir(dest) as entries:
        candidates = [Path(e.path) for e in entries
                      if _DOWNLOAD_DIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    for path in candidates:
        try:
            newest = max([path.lstat().st_mtime, *(p.lstat().st_mtime for p in path.rglob("*"))])
            if newest >= cutoff:
                continue
            shutil.rmtree(path)
        except FileNotFoundError:  # finished or removed meanwhile (by another process)
            continue
        except OSError as exc:
            logger.warning("could not remove the interrupted download %s: %s", path, exc)
            continue
        logger.info("removed the interrupted download %s (unchanged for %.0f s)", path, time.time() - newest)
        removed.append(path)
    return removed


def _now_ms() -> int:
    return int(time.time() * 1000)


def _safe_relative(path: str) -> str:
    """Reject absolute paths and ``..`` so a server cannot write outside the bundle directory."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or any(part in ("..", "") for part in path.split("/")):
        raise BundleDownloadError(f"bundle chunk has an unsafe path {path!r}")
    return str(p)


class _FileSink:
    """One file being written from contiguous chunks, hashed as it goes."""

    def __init__(self, path: Path, size: int, sha256: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.hasher = hashlib.sha256()
        self.written = 0
        self.size = size
        self.sha256 = sha256

    def write(self, offset: int, data: bytes, rel: str) -> None:
        """Append ``data``, which must start where the file currently ends."""
        if offset != self.written:
            self.fh.close()
            raise BundleDownloadError(f"bundle file {rel!r}: chunk at offset {offset}, expected {self.written}")
        self.fh.write(data)
        self.hasher.update(data)
        self.written += len(data)

    def finish(self) -> bool:
        """Close the file; True when its size and sha256 match the chunk headers."""
        self.fh.close()
        return self.written == self.size and self.hasher.hexdigest() == self.sha256


class UpdateStream:
    """An iterator of verified :class:`ParameterUpdate` objects from one ``WatchUpdates`` call.

    Ends when the server closes the stream, ``max_wait`` passes, or :meth:`cancel` is called (from any
    thread). A server error raises :class:`TransportError`; a bad update raises :class:`UpdateIntegrityError`.
    """

    def __init__(self, call: grpc.Call, bundle_id: str, on_bytes: Callable[[int], None]) -> None:
        self._call = call
        self._bundle_id = bundle_id
        self._on_bytes = on_bytes
        self._updates = self._generate()

    def cancel(self) -> None:
        """Cancel the underlying RPC; iteration then ends quietly."""
        self._call.cancel()

    def __iter__(self) -> UpdateStream:
        return self

    def __next__(self) -> ParameterUpdate:
        return next(self._updates)

    def _generate(self) -> Iterator[ParameterUpdate]:
        try:
            for msg in self._call:  # type: ignore[attr-defined]
                self._on_bytes(msg.ByteSize())
                yield decode_update(msg, self._bundle_id)
        except grpc.RpcError as exc:
            if exc.code() in _END_CODES:  # type: ignore[attr-defined]
                return
            raise TransportError("WatchUpdates", exc.code().name, exc.details() or "") from exc  # type: ignore[attr-defined]
        finally:
            self._call.cancel()


def decode_update(msg: common_pb2.ParameterUpdate, bundle_id: str) -> ParameterUpdate:
    """Convert a ``ParameterUpdate`` message, checking its bundle and that its payload is present.

    The signature, version order and parameters are checked by the agent, which holds the keys and the base
    a delta applies to (:mod:`device_agents.updates`).
    """
    if bundle_id and msg.bundle_id != bundle_id:
        raise UpdateIntegrityError(
            f"update v{msg.version} is for bundle {msg.bundle_id[:12]!r}, expected {bundle_id[:12]!r}"
        )
    if not msg.payload:
        raise UpdateIntegrityError(f"update v{msg.version} carries no payload")
    return ParameterUpdate(
        version=int(msg.version), bundle_id=msg.bundle_id, kind=msg.kind, params=None, sha256=msg.sha256,
        created_ms=int(msg.created_unix_ms), round_id=int(msg.round_id), cohort=msg.cohort,
        base_version=int(msg.base_version), encoding=msg.encoding, payload=bytes(msg.payload),
        base_sha256=msg.base_sha256, signature=bytes(msg.signature),
    )


class DeviceClient:
    """Blocking client of the device service, over plaintext or TLS (``tls``; mutual TLS with a client
    certificate), sending ``token`` (or the one :meth:`enroll` obtains) as a bearer token on every call.

    ``timeout`` bounds unary calls; ``transfer_timeout`` bounds bundle downloads and sample uploads.
    ``reconnect_backoff_ms`` = (initial, max) bounds how long the channel waits between reconnection attempts
    after the server went away (gRPC's own exponential backoff; its default maximum is two minutes, so a
    device would notice a returned server late). Per-sample retry timing is the outbox's
    :class:`~device_agents.outbox.BackoffPolicy`.

    ``channel``: an open channel to use instead of opening one (e.g. one a simulator's devices share); the
    client then does not own it, so :meth:`close` leaves it open, and ``max_message_bytes``,
    ``reconnect_backoff_ms`` and ``tls`` are the channel's own.
    """

    def __init__(
        self,
        target: str,
        device_id: str,
        timeout: float = 10.0,
        *,
        transfer_timeout: float = 300.0,
        max_message_bytes: int = 64 << 20,
        trusted_keys: Sequence[bytes] | None = None,
        reconnect_backoff_ms: tuple[int, int] = (1_000, 30_000),
        token: str | None = None,
        tls: TlsOptions | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        if not device_id:
            raise ValueError("device_id must be a non-empty string")
        if timeout <= 0 or transfer_timeout <= 0:
            raise ValueError(f"timeouts must be > 0, got {timeout}, {transfer_timeout}")
        initial_ms, max_ms = (int(v) for v in reconnect_backoff_ms)
        if not 0 < initial_ms <= max_ms:
            raise ValueError(f"reconnect_backoff_ms must be (initial, max) with 0 < initial <= max, "
                             f"got {reconnect_backoff_ms}")
        self.target = target
        self.device_id = device_id
        self.trusted_keys = None if trusted_keys is None else tuple(trusted_keys)
        self.timeout = float(timeout)
        self.transfer_timeout = float(transfer_timeout)
        options = [
            ("grpc.max_send_message_length", int(max_message_bytes)),
            ("grpc.max_receive_message_length", int(max_message_bytes)),
            ("grpc.initial_reconnect_backoff_ms", initial_ms),
            ("grpc.min_reconnect_backoff_ms", initial_ms),
            ("grpc.max_reconnect_backoff_ms", max_ms),
        ]
        self.token = token
        self._owns_channel = channel is None
        self._channel = open_channel(target, options, tls, lambda: self.token) if channel is None else channel
        self._stub = device_pb2_grpc.DeviceServiceStub(self._channel)
        self._lock = threading.Lock()
        self._bytes_up = 0
        self._bytes_down = 0
        self._traffic: dict[str, list[int]] = {}

    def close(self) -> None:
        """Close the channel (unless it was given: see ``channel``); in-flight calls are cancelled."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bytes_up(self) -> int:
        """Serialized bytes of every message sent."""
        with self._lock:
            return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Serialized bytes of every message received."""
        with self._lock:
            return self._bytes_down

    def traffic(self) -> dict[str, dict[str, int]]:
        """Per RPC method: ``messages_up``, ``bytes_up``, ``messages_down``, ``bytes_down`` (serialized sizes)."""
        keys = ("messages_up", "bytes_up", "messages_down", "bytes_down")
        with self._lock:
            return {m: dict(zip(keys, v, strict=True)) for m, v in self._traffic.items()}

    def _count(self, up: int = 0, down: int = 0, method: str = "other") -> None:
        with self._lock:
            self._bytes_up += up
            self._bytes_down += down
            row = self._traffic.setdefault(method, [0, 0, 0, 0])
            if up:
                row[0] += 1
                row[1] += up
            if down:
                row[2] += 1
                row[3] += down

    def _count_down(self, n: int) -> None:
        self._count(down=n, method="WatchUpdates")

    def _unary(self, method: str, request: object, rpc: Callable[..., _T]) -> _T:
        self._count(up=request.ByteSize(), method=method)  # type: ignore[attr-defined]
        try:
            response = rpc(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise TransportError(method, exc.code().name, exc.details() or "") from exc  # type: ignore[attr-defined]
        self._count(down=response.ByteSize(), method=method)  # type: ignore[attr-defined]
        return response

    def enroll(self, enrollment_secret: str) -> str:
        """Exchange the fleet's enrollment secret for this device's token; later calls send it. Returns the
        token (keep it to skip enrolling next time; enrolling again revokes the previous one)."""
        request = device_pb2.EnrollRequest(device_id=self.device_id, enrollment_secret=enrollment_secret)
        resp = self._unary("Enroll", request, self._stub.Enroll)
        self.token = resp.device_token
        return str(resp.device_token)

    def register(self, labels: Mapping[str, str] | None = None, runtime_backend: str = "onnx") -> RegisterInfo:
        """Announce this device; returns the bundle it should run and the newest update version."""
        request = device_pb2.RegisterRequest(
            device_id=self.device_id, labels=dict(labels or {}), runtime_backend=runtime_backend
        )
        resp = self._unary("Register", request, self._stub.Register)
        return RegisterInfo(
            device_id=resp.device_id, bundle_id=resp.bundle_id,
            latest_update_version=int(resp.latest_update_version), bundle_files=tuple(resp.bundle_files),
            cohort=resp.cohort or "default", update_public_key=bytes(resp.update_public_key),
        )

    def fetch_bundle(self, bundle_id: str, dest_dir: str | Path, model: str | None = None,
                     class_statistics: bool = False) -> Path:
        """Download bundle ``bundle_id`` into ``dest_dir/<bundle_id>`` and return that directory.

        Only what ``model`` (default: the manifest's default model) needs is fetched: the signed manifest
        first, then :meth:`runtime.manifest.Manifest.files_for` — that model's file, its golden vectors, the
        source feature statistics (the adaptable parameters with an adaptable model) and, with
        ``class_statistics``, the class-conditional Gaussians (Mahalanobis drift, T3A prototypes).

        Files are streamed into a temporary directory beside the destination; each file's size and sha256
        are checked against its chunk headers and a failing file is fetched once more. The whole bundle is
        then verified with :func:`runtime.load_bundle` (every manifest sha256 and the golden outputs) and its
        manifest must hash to ``bundle_id`` before it is renamed into place. An existing directory that
        verifies is reused without a download. Temporary directories that a process killed mid-download left
        in ``dest_dir`` are removed first (:func:`remove_stale_downloads`).
        """
        if len(bundle_id) != 64 or not all(c in "0123456789abcdef" for c in bundle_id):
            raise ValueError(f"bundle_id must be a sha256 hex string, got {bundle_id!r}")
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        remove_stale_downloads(dest)
        final = dest / bundle_id
        if final.is_dir() and self._installed(final, bundle_id, model, class_statistics):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_id[:12]}-", dir=dest))
        try:
            self._download_verified(bundle_id, tmp, model, class_statistics)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("bundle %s installed at %s", bundle_id[:12], final)
        return final

    def _installed(self, path: Path, bundle_id: str, model: str | None, class_statistics: bool = False) -> bool:
        try:
            loaded = load_bundle(path, model=model, trusted_keys=self.trusted_keys)
            wanted = loaded.manifest.files_for(loaded.model.name, class_statistics)
            return loaded.bundle_id == bundle_id and all((path / f).is_file() for f in wanted)
        except BundleError as exc:
            logger.warning("installed bundle %s fails verification, downloading again: %s", path, exc)
            return False

    def _download_verified(self, bundle_id: str, root: Path, model: str | None, class_statistics: bool = False
                           ) -> None:
        bad = self._download(bundle_id, root, [MANIFEST_NAME, SIGNATURE_NAME])
        if not bad and (root / MANIFEST_NAME).is_file():
            data = self._authentic_manifest(bundle_id, root)
            try:
                manifest = decode_manifest(data, root)
                bad = self._download(bundle_id, root,
                                     manifest.files_for(manifest.model(model).name, class_statistics))
            except ManifestError as exc:
                raise BundleDownloadError(f"bundle {bundle_id[:12]}: {exc}") from exc
        if bad:
            logger.warning("bundle %s: refetching %s after a sha256 mismatch", bundle_id[:12], sorted(bad))
            still_bad = self._download(bundle_id, root, sorted(bad))
            if still_bad:
                raise BundleDownloadError(f"bundle {bundle_id[:12]}: {sorted(still_bad)} failed sha256 twice")
        _manifest_of(bundle_id, root)  # a refetch may have replaced it
        load_bundle(root, model=model, trusted_keys=self.trusted_keys)

    def _authentic_manifest(self, bundle_id: str, root: Path) -> bytes:
        """The downloaded manifest's bytes once they hash to ``bundle_id`` and carry a valid signature (by one of
        :attr:`trusted_keys` when given): nothing else is parsed."""
        data = _manifest_of(bundle_id, root)
        verify_bundle_signature(root, data, self.trusted_keys)
        return data

    def _download(self, bundle_id: str, root: Path, paths: Sequence[str]) -> set[str]:
        """Stream the requested files (all when empty) into ``root``; return the paths that failed."""
        request = device_pb2.FetchBundleRequest(device_id=self.device_id, bundle_id=bundle_id, paths=paths)
        self._count(up=request.ByteSize())
        sinks: dict[str, _FileSink] = {}
        bad: set[str] = set()
        try:
            for chunk in self._stub.FetchBundle(request, timeout=self.transfer_timeout):
                self._count(down=chunk.ByteSize())
                self._write_chunk(bundle_id, root, chunk, sinks, bad)
        except grpc.RpcError as exc:
            raise TransportError("FetchBundle", exc.code().name, exc.details() or "") from exc  # type: ignore[attr-defined]
        finally:
            for rel, sink in sinks.items():
                if not sink.finish():
                    bad.add(rel)
        if not sinks:
            raise BundleDownloadError(f"bundle {bundle_id[:12]}: the server sent no files for {list(paths)}")
        return bad

    @staticmethod
    def _write_chunk(
        bundle_id: str, root: Path, chunk: common_pb2.BundleChunk, sinks: dict[str, _FileSink], bad: set[str]
    ) -> None:
        if chunk.bundle_id != bundle_id:
            raise BundleDownloadError(f"chunk of bundle {chunk.bundle_id[:12]!r} in a fetch of {bundle_id[:12]!r}")
        rel = _safe_relative(chunk.path)
        sink = sinks.get(rel)
        if sink is None:
            sink = sinks[rel] = _FileSink(root / rel, int(chunk.file_size), chunk.file_sha256)
        elif (sink.size, sink.sha256) != (int(chunk.file_size), chunk.file_sha256):
            bad.add(rel)
        sink.write(int(chunk.offset), chunk.data, rel)

    def upload(self, outbox: SqliteOutbox, max_batch: int = 64, now_ms: int | None = None) -> UploadResult:
        """Drain the samples due in ``outbox``, ``max_batch`` per ``UploadSamples`` stream.

        Ids the server acknowledges (stored or duplicate) are acked in the outbox; ids it leaves out are
        nacked (retried later with backoff). On an RPC error the whole batch is nacked and
        :class:`TransportError` is raised. When the server refuses a batch for what a sample holds
        (``INVALID_ARGUMENT``, ``NOT_FOUND``), the batch's samples are sent again one per stream first, so the
        ones it takes are delivered and only the refused ones wait for their retry.
        """
        now = _now_ms() if now_ms is None else int(now_ms)
        totals = dict.fromkeys(("batches", "sent", "stored", "duplicates", "retried", "bytes_sent"), 0)
        while batch := outbox.peek_batch(max_batch, now):
            ids = [s.sample_id for s in batch]
            messages = [self._sample_message(s) for s in batch]
            size = sum(m.ByteSize() for m in messages)
            self._count(up=size)
            try:
                ack = self._stub.UploadSamples(iter(messages), timeout=self.transfer_timeout)
            except grpc.RpcError as exc:
                if len(batch) > 1 and exc.code() in _SAMPLE_REFUSED_CODES:  # type: ignore[attr-defined]
                    self._upload_singly(outbox, ids, messages, now)
                outbox.nack(ids, now)  # the ids delivered one by one are gone: nothing to nack for them
                raise TransportError("UploadSamples", exc.code().name, exc.details() or "") from exc  # type: ignore[attr-defined]
            self._count(down=ack.ByteSize())
            acked = (set(ack.stored_ids) | set(ack.duplicate_ids)) & set(ids)
            outbox.ack(sorted(acked))
            missing = [i for i in ids if i not in acked]
            if missing:
                outbox.nack(missing, now)
            totals["batches"] += 1
            totals["sent"] += len(ids)
            totals["stored"] += len(set(ack.stored_ids) & set(ids))
            totals["duplicates"] += len(set(ack.duplicate_ids) & set(ids))
            totals["retried"] += len(missing)
            totals["bytes_sent"] += size
        return UploadResult(**totals)

    def _upload_singly(self, outbox: SqliteOutbox, ids: Sequence[str], messages: Sequence[device_pb2.Sample],
                       now: int) -> None:
        """Send a refused batch one sample per stream, acking what the server takes; stop at a failure that is
        not a refusal of the sample (the server went away)."""
        for sample_id, message in zip(ids, messages, strict=True):
            self._count(up=message.ByteSize())
            try:
                ack = self._stub.UploadSamples(iter([message]), timeout=self.transfer_timeout)
            except grpc.RpcError as exc:
                if exc.code() in _SAMPLE_REFUSED_CODES:  # type: ignore[attr-defined]
                    logger.warning("server refuses sample %s: %s", sample_id, exc.details())  # type: ignore[attr-defined]
                    continue
                return
            self._count(down=ack.ByteSize())
            if sample_id in set(ack.stored_ids) | set(ack.duplicate_ids):
                outbox.ack([sample_id])

    def _sample_message(self, s: OutboxSample) -> device_pb2.Sample:
        msg = device_pb2.Sample(
            device_id=self.device_id, sample_id=s.sample_id, bundle_id=s.bundle_id, entropy=float(s.entropy),
            prediction=int(s.prediction), stream_position=int(s.stream_position),
            captured_unix_ms=int(s.captured_ms),
        )
        if s.input is not None:
            msg.input.CopyFrom(tensor_to_proto("input", s.input))
        if s.features is not None:
            msg.features.CopyFrom(tensor_to_proto("features", s.features))
        return msg

    def report_drift(
        self,
        detector: str,
        signal: str,
        statistic: float,
        threshold: float,
        stream_position: int,
        detected_ms: int | None = None,
    ) -> int:
        """Report a drift event; returns the server's event id."""
        request = device_pb2.DriftReport(
            device_id=self.device_id, detector=detector, signal=signal, statistic=float(statistic),
            threshold=float(threshold), stream_position=int(stream_position),
            detected_unix_ms=_now_ms() if detected_ms is None else int(detected_ms),
        )
        return int(self._unary("ReportDrift", request, self._stub.ReportDrift).event_id)

    def report_outbox(self, stats: OutboxStats, reported_ms: int | None = None) -> int:
        """Report the outbox's counts (see :class:`~device_agents.outbox.OutboxStats`); returns the dropped-sample
        count the server now holds for this device."""
        request = device_pb2.OutboxReport(
            device_id=self.device_id, dropped_samples=stats.dropped, dropped_bytes=stats.dropped_bytes,
            pending_samples=stats.pending_count, pending_bytes=stats.pending_bytes, max_bytes=stats.max_bytes,
            eviction_policy=stats.eviction, reported_unix_ms=_now_ms() if reported_ms is None else int(reported_ms),
        )
        return int(self._unary("ReportOutbox", request, self._stub.ReportOutbox).dropped_samples)

    def watch_updates(self, bundle_id: str, since_version: int, max_wait: float = 0.0,
                      held_version: int | None = None) -> UpdateStream:
        """Stream updates of ``bundle_id`` newer than ``since_version`` (the agent verifies and decodes them).

        ``held_version`` (None: ``since_version``) is the version whose parameters the device holds; an
        update whose delta base differs comes in full. ``max_wait`` seconds (0: until the server stops or
        :meth:`UpdateStream.cancel`) is passed to the server; the client's deadline is ``max_wait + timeout``.
        """
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        request = device_pb2.WatchRequest(
            device_id=self.device_id, bundle_id=bundle_id, since_version=int(since_version),
            max_wait_seconds=float(max_wait), held_version=None if held_version is None else int(held_version),
        )
        self._count(up=request.ByteSize(), method="WatchUpdates")
        deadline = max_wait + self.timeout if max_wait > 0 else None
        call = self._stub.WatchUpdates(request, timeout=deadline)
        return UpdateStream(call, bundle_id, self._count_down)

    def report_rollback(self, info: RollbackInfo, rolled_back_ms: int | None = None) -> int:
        """Tell the server that an update was rolled back (health check failed); returns the report's id."""
        request = device_pb2.RollbackReport(
            device_id=self.device_id, bundle_id=info.bundle_id, cohort=info.cohort, version=info.version,
            restored_version=info.restored_version, reason=info.reason, entropy_before=info.entropy_before,
            entropy_after=info.entropy_after, agreement_before=info.agreement_before,
            agreement_after=info.agreement_after,
            rolled_back_unix_ms=_now_ms() if rolled_back_ms is None else int(rolled_back_ms),
        )
        return int(self._unary("ReportRollback", request, self._stub.ReportRollback).rollback_id)

    def submit_update(
        self, bundle_id: str, base_version: int, num_samples: int, params: Mapping[str, np.ndarray] | None = None,
        *, encoding: str = "", payload: bytes = b"", base_sha256: str = "",
    ) -> int:
        """Contribute parameters to federated aggregation; returns the submission id.

        Either ``params`` (plain float32 tensors) or an encoded ``payload`` (``encoding`` from
        :mod:`runtime.update_codec`: the full set in ``"f32"``, or a delta the server adds to the exact parameters
        of ``base_version``; :class:`device_agents.updates.SubmissionEncoder` makes one with error feedback).
        ``base_sha256`` (optional) lets the server check the delta's base.
        """
        if (params is None) == (not payload):
            raise ValueError("give either params or an encoded payload")
        request = device_pb2.FederatedUpdate(
            device_id=self.device_id, bundle_id=bundle_id, base_version=int(base_version),
            num_samples=int(num_samples), tensors=tensors_to_proto(params) if params is not None else [],
            encoding=encoding, payload=bytes(payload), base_sha256=base_sha256,
        )
        return int(self._unary("SubmitUpdate", request, self._stub.SubmitUpdate).submission_id)

    def pull_update(self, bundle_id: str, held_version: int, held_sha256: str = "") -> ParameterUpdate | None:
        """The newest parameters for a device holding ``held_version`` (digest ``held_sha256``): a delta from
        exactly that when the server can compute one, else in full; None when the device is up to date.
        Verify and decode it with :func:`device_agents.updates.decode_params` (and ``check_signature``)."""
        request = device_pb2.PullRequest(device_id=self.device_id, bundle_id=bundle_id,
                                         held_version=int(held_version), held_sha256=held_sha256)
        msg = self._unary("PullUpdate", request, self._stub.PullUpdate)
        if not msg.payload:
            return None
        return decode_update(msg, bundle_id)
