"""Start-up benchmark: `python train.py` from process start to the end of its first optimizer step.

The first step ends where the job logs "step 1/1" to its job.log (asctime has millisecond
resolution). Peak memory is the process's maximum resident set size from wait4. The decoded-array
cache is warm, as it is for every run after a dataset's first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from benchmarks.common import PROJECT_DIR, BenchSettings

FIRST_STEP_MARKER = " step 1/1 "


def measure_startup(settings: BenchSettings, repeat: int) -> dict:
    """Run train.py for one step; return seconds to the first step, total seconds and peak RSS in MB."""
    work_dir = Path(settings.work_dir)
    run_id = f"bench-startup-{repeat}-{os.getpid()}"
    command = [sys.executable, str(PROJECT_DIR / "train.py"), *settings.model_overrides(),
               f"data.cache_dir={work_dir / 'cache'}", "logger=csv", f"run.output={work_dir / 'outputs'}",
               f"run.id={run_id}", "trainer.max_steps=1", "trainer.log_every_n_steps=1"]
    spawned_at = time.time()
    process = subprocess.Popen(command, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "WANDB_MODE": "disabled"})
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    total_s = time.time() - spawned_at
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"train.py failed during the start-up benchmark:\n{stderr[-4000:].decode(errors='replace')}")
    job_log = work_dir / "outputs" / "runs" / run_id / "job.log"
    first_step_at = _first_step_time(job_log)
    return {"to_first_step_s": first_step_at - spawned_at, "total_s": total_s, "peak_rss_mb": usage.ru_maxrss / 1024}


def _first_step_time(job_log: Path) -> float:
    for line in job_log.read_text().splitlines():
        if FIRST_STEP_MARKER in line:
            # logging's default asctime: "2026-12-04 21:03:04,123", in local time.
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return time.mktime(stamp.timetuple()) + stamp.microsecond / 1e6
    raise RuntimeError(f"no '{FIRST_STEP_MARKER.strip()}' line in {job_log}")


def import_times() -> dict[str, float]:
    """Return the seconds a fresh interpreter takes to import torch, pytorch_lightning and the package entry."""
    times = {}
    for module in ("torch", "pytorch_lightning", "fashion_gan.entry"):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], cwd=PROJECT_DIR, check=True)
        times[module] = time.perf_counter() - started
    return times
