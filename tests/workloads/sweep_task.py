"""A task of a test sweep (no torch): records when it ran, reports a result, or merges its dependencies' results.

sweep_task.py EVENTS_DIR INDEX [--sleep S] [--fail-first-attempt] [--fail]
sweep_task.py EVENTS_DIR merge
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from gpuorch import worker


def main() -> int:
    events, what = Path(sys.argv[1]), sys.argv[2]
    options = sys.argv[3:]
    job_id, attempt = os.environ["GPUORCH_JOB_ID"], int(os.environ["GPUORCH_ATTEMPT"])
    started = time.time()
    if what == "merge":
        results = worker.dependency_results()
        (events / "merge.json").write_text(json.dumps({"start": started, **results}))
        worker.report_result({"tasks": len(results["results"])})
        return 0
    sleep = float(options[options.index("--sleep") + 1]) if "--sleep" in options else 0.0
    time.sleep(sleep)
    seen = {name: os.environ.get(name) for name in ("GPUORCH_ARRAY_ID", "GPUORCH_ARRAY_INDEX", "GPUORCH_ARRAY_SIZE")}
    record = {"job_id": job_id, "attempt": attempt, "argv_index": what, "env": seen, "start": started, "end": time.time()}
    with open(events / f"{what}-attempt-{attempt}.json", "w") as file:
        json.dump(record, file)
    if "--fail" in options or ("--fail-first-attempt" in options and attempt == 1):
        return 1
    worker.report_result({"loss": round(1.0 / (1 + int(what)), 4), "index": int(what)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
