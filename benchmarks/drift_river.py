"""Runs River's drift detectors over streams saved as ``.npy`` files; executed by River's own interpreter.

``python drift_river.py SPEC.json OUT.json``. SPEC: ``{"jobs": [{"key", "path", "detector", "kwargs", "start",
"stop_after"}]}``; for each job the stream ``np.load(path)[start:]`` is fed value by value to
``river.drift.<detector>(**kwargs)`` (stopping after the first drift at or beyond position ``stop_after`` when
given). OUT: per key the drift positions (in the full stream), the values fed and the seconds taken.
Kept free of edgeloop imports: River lives in its own virtual environment.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import river
from river import drift


def run_job(job: dict) -> dict:
    """Feed one stream to one fresh River detector."""
    values = np.load(job["path"])[job.get("start", 0) :].tolist()
    detector = getattr(drift, job["detector"])(**job.get("kwargs", {}))
    start, stop_after = job.get("start", 0), job.get("stop_after")
    found, fed = [], 0
    t0 = time.perf_counter()
    for i, x in enumerate(values):
        fed += 1
        detector.update(x)  # River 0.26's ADWIN.update returns None: read the flag separately
        if detector.drift_detected:
            found.append(start + i)
            if stop_after is not None and start + i >= stop_after:
                break
    return {"drifts": found, "fed": fed, "seconds": time.perf_counter() - t0}


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    out = {"river_version": river.__version__, "jobs": {job["key"]: run_job(job) for job in spec["jobs"]}}
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
