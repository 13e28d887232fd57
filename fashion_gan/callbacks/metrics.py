"""Throughput, `metrics.csv` and progress lines in the job log."""

import csv
import logging
import time
from pathlib import Path

import pytorch_lightning as pl

from fashion_gan.callbacks.pusher import OutputPusher

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("train/d_loss", "train/g_loss", "train/d_real", "train/d_fake", "perf/images_per_s",
                  "val/fid", "val/fid_best", "val/class_coverage")


class MetricsCallback(pl.Callback):
    """Every `log_every_n_steps`: measure images/s, log it, append a row to `metrics.csv`, log a line.

    On resume the file is cut back to the resumed step first, so each step appears once even after a
    hard kill that left rows beyond the last checkpoint.
    """

    def __init__(self, local_run_dir: Path, log_every_n_steps: int, images_per_step: int, max_steps: int,
                 pusher: OutputPusher, write_csv: bool, loggers: list | None = None) -> None:
        self.csv_path = local_run_dir / "metrics.csv"
        self.log_every_n_steps = log_every_n_steps
        self.images_per_step = images_per_step
        self.max_steps = max_steps
        self.pusher = pusher
        self.write_csv = write_csv
        # Loggers get every row at the job's global step, so metrics and sample images share one x-axis.
        # The Trainer itself has no logger, because it would log at its own batch counter.
        self.loggers = loggers or []
        self.train_seconds = 0.0
        self.steps_timed = 0
        self.last_values: dict[str, float] = {}
        self._window_start: float | None = None
        self._window_start_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.write_csv and trainer.is_global_zero:
            truncate_metrics_csv(self.csv_path, after_step=trainer.global_step)
        self._window_start = time.perf_counter()
        self._window_start_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.log_every_n_steps != 0 and step != self.max_steps:
            return

        values = {key: float(value) for key, value in trainer.callback_metrics.items() if key in METRIC_COLUMNS}
        now = time.perf_counter()
        steps = step - self._window_start_step
        if steps > 0 and self._window_start is not None:
            elapsed_s = now - self._window_start
            values["perf/images_per_s"] = steps * self.images_per_step / elapsed_s
            self.train_seconds += elapsed_s
            self.steps_timed += steps
        self._window_start, self._window_start_step = now, step
        self.last_values.update(values)

        if not trainer.is_global_zero:
            return
        if self.write_csv:
            append_metrics_row(self.csv_path, step, values)
        for logger in self.loggers:
            logger.log_metrics(values, step=step)
        log.info(
            "step %d/%d  d_loss %.4f  g_loss %.4f  D(x) %.3f  D(G(z)) %.3f  %.0f images/s",
            step, self.max_steps, values.get("train/d_loss", float("nan")), values.get("train/g_loss", float("nan")),
            values.get("train/d_real", float("nan")), values.get("train/d_fake", float("nan")),
            values.get("perf/images_per_s", float("nan")),
        )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Push the metrics file with every checkpoint, so storage contains the curves up to that step.
        if self.write_csv and trainer.is_global_zero and self.csv_path.exists():
            self.pusher.push(self.csv_path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.write_csv and trainer.is_global_zero and self.csv_path.exists():
            self.pusher.push(self.csv_path)

    @property
    def images_per_s(self) -> float | None:
        if self.train_seconds <= 0:
            return None
        return self.steps_timed * self.images_per_step / self.train_seconds


def append_metrics_row(path: Path, step: int, values: dict[str, float]) -> None:
    """Append one row of `step` and the known metric columns, writing the header for a new file."""
    new_file = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new_file:
            writer.writerow(("step", *METRIC_COLUMNS))
        writer.writerow((step, *(_format(values.get(column)) for column in METRIC_COLUMNS)))


def truncate_metrics_csv(path: Path, after_step: int) -> None:
    """Drop the rows of steps greater than `after_step` (left by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    header, body = rows[0], rows[1:]
    kept = [row for row in body if row and int(row[0]) <= after_step]
    if len(kept) == len(body):
        return
    log.info("Dropping %d rows of metrics.csv beyond the resumed step %d", len(body) - len(kept), after_step)
    temporary = path.with_suffix(".csv.partial")
    with open(temporary, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *kept])
    temporary.replace(path)


def _format(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
