"""Child process of the training benchmarks: one timed training run of the project or the reference.

Variants:
  reference        the classic recipe (benchmarks/reference.py)
  project          fashion_gan.train.run with the default settings (precision auto, channels_last)
  project-fp32     the same with trainer.precision=32-true
  upload           the project writing to S3 with a checkpoint and sample push every
                   ALTERNATING_PUSH_INTERVAL steps, so periods of PUSH_EVERY_N_STEPS steps with and
                   without a push alternate in this one run and share its drift in machine speed

The project runs through `fashion_gan.train.run`, the function train.py calls, on the decoded-array
cache that the harness built beforehand. Step times come from a MetricsCallback subclass that
records the time at the end of every step before doing the callback's usual work.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from benchmarks.common import PROJECT_DIR, BenchSettings, child_parser, write_result

PUSH_EVERY_N_STEPS = 25
# The upload benchmark pushes every other period, so each push period sits between two push-free ones.
ALTERNATING_PUSH_INTERVAL = 2 * PUSH_EVERY_N_STEPS
NEVER = 10**9  # a step interval no benchmark run reaches


def project_overrides(settings: BenchSettings, variant: str, run_id: str) -> list[str]:
    """Return the Hydra overrides of one project variant; everything else keeps its default."""
    steps = settings.warmup_steps + settings.measure_steps
    work_dir = Path(settings.work_dir)
    overrides = [
        *settings.model_overrides(),
        f"data.cache_dir={work_dir / 'cache'}",
        "logger=csv",  # the default is W&B; csv keeps a service process out of the measurement
        f"run.id={run_id}",
        f"trainer.max_steps={steps}",
    ]
    if variant == "upload":
        overrides += ["storage=s3", f"run.output={os.environ['BENCH_OUTPUT_URI']}",
                      f"run.checkpoint_every_n_steps={ALTERNATING_PUSH_INTERVAL}",
                      f"run.sample_every_n_steps={ALTERNATING_PUSH_INTERVAL}"]
    else:
        overrides += [f"run.output={work_dir / 'outputs'}", f"run.checkpoint_every_n_steps={NEVER}",
                      f"run.sample_every_n_steps={NEVER}"]
    if variant == "project-fp32":
        overrides.append("trainer.precision=32-true")
    return overrides


# Step end times and the first step's wall-clock time, recorded by TimedMetricsCallback during one
# train_project call, and the (queued, ended) times of every background upload.
_step_end_times: list[float] = []
_first_step_wall: list[float] = []
_upload_times: list[tuple[float, float]] = []


def _install_step_timer() -> None:
    """Make train.run use a MetricsCallback that records the end time of every step."""
    import fashion_gan.callbacks.metrics as metrics_module

    if getattr(metrics_module.MetricsCallback, "records_step_times", False):
        return

    class TimedMetricsCallback(metrics_module.MetricsCallback):
        records_step_times = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _step_end_times.append(time.perf_counter())
            if not _first_step_wall:
                _first_step_wall.append(time.time())
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # _fit imports MetricsCallback from its module when it runs, so it picks up the subclass.
    metrics_module.MetricsCallback = TimedMetricsCallback
    _install_upload_timer()


def _install_upload_timer() -> None:
    """Record when each background upload is queued and when it ends, with what runs after it (the latest pointer)."""
    from fashion_gan.storage.uploader import BackgroundUploader

    submit_then = BackgroundUploader.submit_then

    def timed_submit_then(self, *arguments, **keywords):
        queued = time.perf_counter()
        future = submit_then(self, *arguments, **keywords)
        future.add_done_callback(lambda _: _upload_times.append((queued, time.perf_counter())))
        return future

    BackgroundUploader.submit_then = timed_submit_then


def train_project(settings: BenchSettings, variant: str) -> dict:
    """Run fashion_gan.train.run once and return the step end times and the resolved settings."""
    from hydra import compose, initialize_config_dir

    from fashion_gan.train import run

    _install_step_timer()
    _step_end_times.clear()
    _first_step_wall.clear()
    _upload_times.clear()
    run_id = f"bench-{variant}-{os.getpid()}"
    with initialize_config_dir(config_dir=str(PROJECT_DIR / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=project_overrides(settings, variant, run_id))
    result = run(cfg)
    return {
        "step_end_times": list(_step_end_times),
        "upload_times": list(_upload_times),
        "first_step_wall": _first_step_wall[0] if _first_step_wall else None,
        "precision": result.summary.get("precision"),
        "final_losses": result.summary.get("final_losses"),
    }


def main(argv: list[str]) -> None:
    arguments = child_parser(__doc__.splitlines()[0]).parse_args(argv)
    settings = BenchSettings.from_json(arguments.settings)
    import torch

    if arguments.variant == "reference":
        from benchmarks.reference import train

        result = train(settings, settings.warmup_steps + settings.measure_steps)
        result["precision"] = "32-true"
    else:
        result = train_project(settings, arguments.variant)
    result["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 1024**2
        result["gpu"] = torch.cuda.get_device_name(0)
    write_result(arguments.result, result)


if __name__ == "__main__":
    main(sys.argv[1:])
