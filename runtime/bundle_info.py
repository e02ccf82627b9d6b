"""What a bundle holds, and whether it proves itself: the report behind ``edgeloop inspect`` (device side, no torch).

:func:`inspect_bundle` reads a bundle directory without trusting it and runs every check a device runs on load,
for every model instead of one, recording each result instead of stopping at the first failure:

* the Ed25519 signature over ``manifest.json`` (against the trusted keys when given);
* the manifest's schema;
* every listed file's sha256 (a file a device would fetch only for another model may be absent: that is
  reported, not failed);
* each model's golden vectors, in the model's own runtime (onnxruntime or LiteRT) — skipped, and said so, when
  that runtime is not installed; failed when it is installed but cannot load the model file; and not run at all
  when the signature failed (with ``trusted_keys``, a bundle another key signed fails it, so nothing a stranger
  wrote is run; without them any valid signature passes) or the model's files did. A device refuses every model
  of a bundle in which a present file fails its sha256 (or cannot be read, or escapes the directory), so no
  golden check runs then either; a missing file fails only the models that need it.

Next to the checks it collects what the bundle says about itself: input, labels, normalisation layers, source
statistics, compression (N:M pattern and per-layer sparsity, low-rank ranks, int8 calibration), each model's
bytes as shipped and unpacked, and its parity against torch at export (from the export report, when its sha256
matches). :func:`render_inspection` prints it; :meth:`BundleInspection.to_dict` is the JSON form.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.bundle import file_problem, load_bundle
from runtime.errors import BackendUnavailableError, BundleError, ManifestError, ModelLoadError, SignatureError
from runtime.manifest import Manifest, decode_manifest, read_manifest_bytes
from runtime.signing import verify_bundle_signature

OK, FAILED, SKIPPED, ABSENT = "ok", "failed", "skipped", "absent"


@dataclass(frozen=True)
class Check:
    """One check: what was checked, its status (ok, failed, skipped; absent for a file a device fetches only
    for another model) and what it found."""

    what: str
    status: str
    detail: str = ""


@dataclass
class BundleInspection:
    """What :func:`inspect_bundle` found. ``manifest`` is the manifest as JSON with the export report's per-model
    details merged in (None when it is not valid JSON); ``models`` one summary per model entry."""

    path: str
    bundle_id: str
    manifest: dict[str, Any] | None
    checks: list[Check] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped and absent are not failures)."""
        return all(c.status != FAILED for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if c.status == FAILED]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the checks, the model summaries, the description and ``ok``."""
        return {"path": self.path, "bundle_id": self.bundle_id, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks], "models": self.models,
                "description": describe(self.manifest) if self.manifest is not None else None}


def merge_export_report(manifest: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """``manifest`` (as JSON) with the export report's per-model details (parity, quantization, the full packing
    record) merged into its model entries and the report's full ``compression`` reports, as a new dict."""
    out = json.loads(json.dumps(manifest))
    for entry in out.get("models", []):
        extra = report.get("models", {}).get(entry.get("name"), {})
        packed = {**extra.get("packed", {}), **entry.get("packed", {})}
        entry.update({k: v for k, v in extra.items() if k != "packed" and k not in entry})  # the manifest's stand
        if packed:
            entry["packed"] = packed
    if "compression" in report:
        out["compression"] = report["compression"]
    return out


def inspect_bundle(path: str | Path, trusted_keys: Sequence[bytes] | None = None, *, golden: bool = True,
                   threads: int | None = 1) -> BundleInspection:
    """Check and describe the bundle directory ``path`` (see the module docstring). Raises
    :class:`~runtime.errors.ManifestError` only when there is nothing to inspect (no directory, no
    ``manifest.json``); every other problem is a failed :class:`Check`."""
    root = Path(path)
    if not root.is_dir():
        raise ManifestError(f"bundle directory not found: {root}")
    raw = read_manifest_bytes(root)
    out = BundleInspection(str(root), hashlib.sha256(raw).hexdigest(), None)
    try:
        signer = verify_bundle_signature(root, raw, trusted_keys)
        who = "a trusted key" if signer.trusted else "a key not checked against any trusted key (no --trusted-key)"
        out.checks.append(Check("signature", OK, f"ed25519, key {signer.key_id}: {who}"))
        signed = True
    except SignatureError as exc:
        out.checks.append(Check("signature", FAILED, str(exc)))
        signed = False
    try:
        manifest: Manifest | None = decode_manifest(raw, root)
        out.manifest = json.loads(raw)
        out.checks.append(Check("manifest", OK, f"schema {manifest.schema_version}"))  # type: ignore[union-attr]
    except (BundleError, ValueError) as exc:
        out.checks.append(Check("manifest", FAILED, str(exc)))
        manifest = None
    if manifest is None:
        return out
    bad_files, missing = _check_files(root, manifest, out)
    _merge_report(root, manifest, out, bad_files | missing)
    for entry in manifest.models:
        summary = _model_summary(root, manifest, out.manifest, entry.name, bad_files | missing)
        needed = set(manifest.files_for(entry.name))
        what = f"golden vectors of model {entry.name!r}"
        if not golden:
            check = Check(what, SKIPPED, "not asked for (--no-golden)")
        elif not signed:
            check = Check(what, SKIPPED, "not run: the signature did not verify")
        elif bad_files or needed & missing:  # a device refuses every model of a bundle with a damaged file
            own = sorted(needed & (bad_files | missing))
            check = Check(what, FAILED, f"not run: its files failed ({', '.join(own)})" if own else
                          f"not run: a device refuses the bundle while {', '.join(sorted(bad_files))} fail")
        else:
            check = _run_golden(root, entry.name, trusted_keys, threads, what)
        out.checks.append(check)
        summary["golden"] = asdict(check)
        out.models.append(summary)
    return out


def _check_files(root: Path, manifest: Manifest, out: BundleInspection) -> tuple[set[str], set[str]]:
    """One check per file that is absent or wrong, one summary check for the rest; returns the files present but
    wrong (sha256, unreadable, escaping: a device refuses the whole bundle) and the missing ones some model
    needs (they fail only the models that need them)."""
    bad: set[str] = set()
    missing: set[str] = set()
    total = matched = 0
    needed = {f for entry in manifest.models for f in manifest.files_for(entry.name)}
    for rel, expected in sorted(manifest.files.items()):
        problem = file_problem(root, rel, expected)
        if problem is None:
            matched += 1
            total += (root / rel).stat().st_size
        elif problem[0] == "missing" and rel not in needed:
            out.checks.append(Check(f"file {rel}", ABSENT, "not present; no model in the bundle needs it"))
        else:
            out.checks.append(Check(f"file {rel}", FAILED, problem[1]))
            (missing if problem[0] == "missing" else bad).add(rel)
    out.checks.append(Check("files", FAILED if bad or missing else OK,
                            f"{matched} of {len(manifest.files)} files match their sha256 ({total:,} bytes)"))
    return bad, missing


def _merge_report(root: Path, manifest: Manifest, out: BundleInspection, bad_files: set[str]) -> None:
    """Merge the export report into ``out.manifest`` when the manifest names one and its sha256 matched."""
    ref = (out.manifest or {}).get("report")
    name = ref.get("file") if isinstance(ref, dict) else None
    if not isinstance(name, str) or name in bad_files or name not in manifest.files or not (root / name).is_file():
        return
    try:
        report = json.loads((root / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        out.checks.append(Check(f"file {name}", FAILED, f"the export report does not parse: {exc}"))
        return
    try:
        if not isinstance(report, dict):
            raise TypeError(f"a JSON {type(report).__name__}, not an object")
        out.manifest = merge_export_report(out.manifest or {}, report)
    except (AttributeError, TypeError) as exc:  # signed and hashed, but not what an exporter writes
        out.checks.append(Check(f"file {name}", FAILED, f"the export report is not in the exporter's form: {exc}"))


def _model_summary(root: Path, parsed: Manifest, manifest: Mapping[str, Any] | None, name: str,
                   failed: set[str]) -> dict[str, Any]:
    """One model's row; ``failed``: the files :func:`_check_files` found missing or wrong (not measured)."""
    entry = next((m for m in (manifest or {}).get("models", []) if m.get("name") == name), {})
    packed, parity, quant = (_mapping(entry.get(key)) for key in ("packed", "parity", "quantization"))
    model = parsed.model(name)
    shipped_name = model.packed["file"] if model.packed else model.file  # the signed manifest's, never the report's
    shipped = root / shipped_name if shipped_name in parsed.files and shipped_name not in failed else None
    return {
        "name": name, "format": entry.get("format"), "precision": entry.get("precision"), "graph": entry.get("graph"),
        "file": shipped_name,
        "bytes": shipped.stat().st_size if shipped is not None else None,
        "unpacked_bytes": _number(packed.get("unpacked_bytes")),
        "packing": f"{packed.get('n')}:{packed.get('m')} N:M, {packed.get('compression')}" if packed else None,
        "parity_max_abs_diff": _number(parity.get("max_abs_diff")),
        "parity_top1_agreement": _number(parity.get("top1_agreement")),
        "quantization": _quantization(quant),
    }


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | int | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _quantization(quant: Mapping[str, Any]) -> str | None:
    if not quant:
        return None
    channels = "per-channel" if quant.get("per_channel") else "per-tensor"
    calibration = f"{quant.get('calibration')} calibration on {quant.get('samples')} samples"
    return f"{quant.get('method')}, {channels}, {calibration}"


def _run_golden(root: Path, model: str, trusted_keys: Sequence[bytes] | None, threads: int | None,
                what: str) -> Check:
    started = time.perf_counter()
    try:
        load_bundle(root, model=model, threads=threads, trusted_keys=trusted_keys)
    except ModelLoadError as exc:  # the runtime is here but cannot load the file
        return Check(what, FAILED, str(exc))
    except BackendUnavailableError as exc:
        return Check(what, SKIPPED, f"its runtime cannot run here: {exc}")
    except BundleError as exc:
        return Check(what, FAILED, str(exc))
    except Exception as exc:  # a session that fails to open a corrupt model file: named, not raised
        return Check(what, FAILED, f"{type(exc).__name__}: {exc}")
    return Check(what, OK, f"outputs within tolerance ({1000 * (time.perf_counter() - started):.0f} ms with loading)")


def describe(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a (merged) manifest says about the bundle, in short JSON-ready fields."""
    adaptable = manifest.get("adaptable") or {}
    layers = adaptable.get("layers") or []
    stats = manifest.get("source_statistics") or {}
    created = manifest.get("created_unix_ms")
    labels = list(manifest.get("labels") or [])
    return {
        "name": manifest.get("name"), "arch": manifest.get("arch"), "schema_version": manifest.get("schema_version"),
        "created": _created(created),
        "input": manifest.get("input"), "labels": len(labels), "label_names": labels[:10],
        "output_kind": _mapping(manifest.get("outputs")).get("kind", "logits"),
        "foreign": _foreign(manifest.get("foreign")),
        "normalisation_layers": [layer.get("channels") for layer in layers if isinstance(layer, dict)],
        "source_statistics": sorted(k for k in stats if k != "accuracy"),
        "source_accuracy": stats.get("accuracy"),
        "compression": _compression_lines(manifest.get("compression")),
        "default_model": manifest.get("default_model"),
        "trainable": bool(manifest.get("trainable")),
    }


def _created(unix_ms: Any) -> str | None:
    """``created_unix_ms`` as a UTC time, or None when it is not a time a calendar holds."""
    if not isinstance(unix_ms, int | float) or isinstance(unix_ms, bool):
        return None
    try:
        return datetime.fromtimestamp(unix_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, OSError, ValueError):
        return None


def _foreign(block: Any) -> str | None:
    """One line on a wrapped foreign model: its source file, and what the wrapper added."""
    if not isinstance(block, Mapping):
        return None
    added = _mapping(block.get("added_outputs"))
    extra = f"; outputs added: {', '.join(f'{k} <- {v}' for k, v in added.items())}" if added else ""
    same = "; scores bit-identical to the source model" if block.get("scores_bit_identical_to_source") else ""
    return (f"wrapped from {block.get('source_file')} ({block.get('format')}, sha256 "
            f"{str(block.get('source_sha256'))[:16]}…){extra}{same}")


def _compression_lines(block: Any) -> list[str]:
    try:
        return _compression(block)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:  # a record in another form
        return [f"(the compression record is not in the exporter's form: {type(exc).__name__}: {exc})"]


def _compression(block: Any) -> list[str]:
    """One line per compression pass (either the manifest's summary or the export report's full reports)."""
    if not isinstance(block, dict):
        return []
    lines: list[str] = []
    for rep in block.get("passes", []):
        name = rep.get("pass") if isinstance(rep, dict) else rep
        layers = rep.get("layers", {}) if isinstance(rep, dict) else {}
        if name == "nm_sparsity":
            nm = block.get("nm_sparsity", {}) if not layers else rep
            per_layer = nm.get("layers", {})
            values = [v.get("sparsity") if isinstance(v, dict) else v for v in per_layer.values()]
            values = [v for v in values if isinstance(v, int | float)]
            span = f", sparsity {min(values):.2f}–{max(values):.2f}" if values else ""
            lines.append(f"N:M sparsity {nm.get('pattern')} on {_layers(len(per_layer))}{span}")
        elif name == "low_rank":
            per_layer = layers or block.get("low_rank", {}).get("layers", {})
            ranks = [f"{k} {v.get('rank')}/{v.get('full_rank')}" if isinstance(v, dict) else f"{k} {v[0]}/{v[1]}"
                     for k, v in per_layer.items()]
            more = ", …" if len(ranks) > 4 else ""
            lines.append(f"low-rank on {_layers(len(per_layer))} ({', '.join(ranks[:4])}{more})")
        elif name is not None:
            lines.append(str(name))
    check = block.get("nm_check")
    if isinstance(check, dict):
        verified = check.get("verified_tensors")
        count = len(verified) if isinstance(verified, dict | list) else verified
        lines.append(f"N:M pattern {check.get('pattern')} checked in the exported weights: {count} tensors, "
                     f"all sparsified layers hold: {check.get('all_sparsified_layers_hold')}")
    return lines


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def render_inspection(ins: BundleInspection) -> str:
    """Plain text: the description, the models and every check (failures marked)."""
    lines = [f"bundle {ins.path}", f"  id        {ins.bundle_id}"]
    if ins.manifest is not None:
        d = describe(ins.manifest)
        spec = d["input"] or {}
        lines += [
            f"  name      {d['name']} ({d['arch'] or '?'}), schema {d['schema_version']}, "
            f"created {d['created'] or '?'}",
            f"  input     {spec.get('name')} {spec.get('dtype')} {spec.get('shape')} {spec.get('layout', '')}, "
            f"range {spec.get('value_range')}",
            f"  output    {d['output_kind']}, {d['labels']} labels ({', '.join(map(str, d['label_names']))}"
            f"{', …' if d['labels'] > len(d['label_names']) else ''})",
        ]
        if d["foreign"]:
            lines.append(f"  foreign   {d['foreign']}")
        if d["normalisation_layers"]:
            lines.append(f"  adaptable {len(d['normalisation_layers'])} normalisation layers "
                         f"(channels {', '.join(map(str, d['normalisation_layers']))})")
        if d["source_statistics"]:
            acc = (f"; top-1 on the source sample {d['source_accuracy']:.4f}"
                   if isinstance(d["source_accuracy"], int | float) else "")
            lines.append(f"  source    {', '.join(d['source_statistics'])}{acc}")
        lines += [f"  compress  {line}" for line in d["compression"]]
        if d["trainable"]:
            lines.append("  trainable full-model weights for federated learning")
    if ins.models:
        lines.append("models")
        header = ("name", "format", "precision", "graph", "bytes", "unpacked", "max |Δ| torch", "top-1 agree",
                  "golden")
        rows = [header] + [(
            m["name"] + (" *" if ins.manifest and m["name"] == ins.manifest.get("default_model") else ""),
            str(m["format"]), str(m["precision"]), str(m["graph"]),
            f"{m['bytes']:,}" if m["bytes"] is not None else "missing",
            f"{m['unpacked_bytes']:,}" if m["unpacked_bytes"] else "—",
            f"{m['parity_max_abs_diff']:.3g}" if m["parity_max_abs_diff"] is not None else "—",
            f"{m['parity_top1_agreement']:.4f}" if m["parity_top1_agreement"] is not None else "—",
            m["golden"]["status"]) for m in ins.models]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.append("  (* the default model; bytes as shipped, unpacked after the N:M transport decoding)")
        lines += [f"  {m['name']}: {m['quantization']}" for m in ins.models if m["quantization"]]
    lines.append("checks")
    for c in ins.checks:
        mark = {OK: "ok  ", FAILED: "FAIL", SKIPPED: "skip", ABSENT: "--  "}.get(c.status, c.status)
        lines.append(f"  {mark}  {c.what}: {c.detail}" if c.detail else f"  {mark}  {c.what}")
    failed = len(ins.failures)
    lines.append("verified: every check passed" if not failed else f"NOT VERIFIED: {failed} check(s) failed")
    return "\n".join(lines)
