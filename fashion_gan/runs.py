"""Runs in the output storage: listing, side-by-side comparison, loss and FID curves, sample grids.

Everything here reads the files a training job pushes under `runs/<id>/` (config.yaml,
summary.json, metrics.csv, samples/step_NNNNNN.png), so it works on local folders and S3 alike and
needs no W&B account.
"""

import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import yaml

from fashion_gan.errors import ConfigError, StorageError
from fashion_gan.run_outputs import run_prefix
from fashion_gan.storage.base import ObjectStore
from fashion_gan.tracking import flatten

log = logging.getLogger(__name__)

# Config keys that differ between any two runs by construction, so they never explain a difference.
PER_RUN_CONFIG_KEYS = frozenset({"run.id", "run.name"})
# metrics.csv columns drawn by `plot_curves`, one panel each, in this order.
CURVE_KEYS = ("train/d_loss", "train/g_loss", "val/fid")
SAMPLE_NAME = re.compile(r"step_(\d+)\.png$")

# Layout of the side-by-side sample image, in pixels.
SAMPLES_MARGIN_PX = 8
SAMPLES_CAPTION_PX = 20
# Size of the curves figure: inches times dots per inch gives the PNG size in pixels.
CURVES_FIGSIZE_IN = (10.0, 9.0)
CURVES_DPI = 100


@dataclass
class RunRecord:
    """What storage contains about one run: its config, its summary (once finished) and its metrics rows."""

    run_id: str
    config: dict[str, Any]
    summary: Optional[dict[str, Any]] = None
    metrics: list[dict[str, Optional[float]]] = field(default_factory=list)
    sample_keys: list[str] = field(default_factory=list)
    last_modified: Optional[datetime] = None

    @property
    def flat_config(self) -> dict[str, Any]:
        return flatten(self.config or {})

    @property
    def state(self) -> str:
        # A run without summary.json is still training, or was killed before it could write one.
        return str(self.summary.get("state", "unknown")) if self.summary else "running or killed"

    @property
    def final_sample_key(self) -> Optional[str]:
        steps = [(int(match.group(1)), key) for key in self.sample_keys if (match := SAMPLE_NAME.search(key))]
        return max(steps)[1] if steps else None

    def final_metric(self, key: str) -> Optional[float]:
        """Return the last value of a metrics.csv column, or None when the run never logged it."""
        for row in reversed(self.metrics):
            if row.get(key) is not None:
                return row[key]
        return None

    def best_metric(self, key: str) -> Optional[float]:
        """Return the lowest value of a metrics.csv column, or None when the run never logged it."""
        values = [row[key] for row in self.metrics if row.get(key) is not None]
        return min(values) if values else None

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """Return (steps, values) of a metrics.csv column, skipping rows without a value."""
        points = [(int(row["step"]), row[key]) for row in self.metrics if row.get(key) is not None]
        return [step for step, _ in points], [value for _, value in points]


def list_run_ids(store: ObjectStore) -> dict[str, datetime]:
    """Return {run id: newest modification time of its files} for every run folder with a config.yaml."""
    newest: dict[str, datetime] = {}
    has_config: set[str] = set()
    for item in store.list("runs/"):
        parts = item.key.split("/")
        if len(parts) < 3:
            continue
        run_id = parts[1]
        if parts[2] == "config.yaml" and len(parts) == 3:
            has_config.add(run_id)
        if run_id not in newest or item.last_modified > newest[run_id]:
            newest[run_id] = item.last_modified
    return {run_id: newest[run_id] for run_id in has_config}


def list_runs(store: ObjectStore) -> list[RunRecord]:
    """Return every run in the store with its config and summary, newest first (metrics are not read)."""
    runs = []
    for run_id, modified in list_run_ids(store).items():
        record = RunRecord(run_id=run_id, config=_read_yaml(store, f"{run_prefix(run_id)}/config.yaml") or {},
                           summary=_read_json(store, f"{run_prefix(run_id)}/summary.json"), last_modified=modified)
        runs.append(record)
    return sorted(runs, key=lambda record: record.last_modified, reverse=True)


def load_run(store: ObjectStore, run_id: str) -> RunRecord:
    """Read a run's config, summary, metrics.csv and sample grid names; ConfigError when the run is not in the store."""
    prefix = run_prefix(run_id)
    config = _read_yaml(store, f"{prefix}/config.yaml")
    if config is None:
        known = sorted(list_run_ids(store))
        listing = ", ".join(known[:20]) if known else "none"
        if len(known) > 20:
            listing += " …"
        raise ConfigError(
            f"run {run_id!r} not found in {store.describe('runs')}: it has no config.yaml. Runs there: {listing}. "
            "Pass --storage with the output storage of the job (see `fashion-gan runs list --storage URI`)."
        )
    metrics_bytes = _read_optional(store, f"{prefix}/metrics.csv")
    return RunRecord(
        run_id=run_id,
        config=config,
        summary=_read_json(store, f"{prefix}/summary.json"),
        metrics=parse_metrics_csv(metrics_bytes.decode("utf-8")) if metrics_bytes else [],
        sample_keys=[item.key for item in store.list(f"{prefix}/samples/")],
    )


def parse_metrics_csv(text: str) -> list[dict[str, Optional[float]]]:
    """Parse metrics.csv into rows of {column: float or None}; an empty cell is None."""
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        parsed: dict[str, Optional[float]] = {}
        for key, value in row.items():
            if key is None:
                continue
            parsed[key] = float(value) if value not in (None, "") else None
        rows.append(parsed)
    return rows


def differing_config_keys(runs: list[RunRecord]) -> list[str]:
    """Return the sorted dotted config keys whose values are not the same in every run."""
    flat_configs = [run.flat_config for run in runs]
    keys = set().union(*flat_configs) - PER_RUN_CONFIG_KEYS
    missing = object()
    return sorted(key for key in keys
                  if len({json.dumps(config.get(key, missing), default=str) for config in flat_configs}) > 1)


def comparison_rows(runs: list[RunRecord]) -> list[tuple[str, list[str]]]:
    """Return (row label, one cell per run): the differing config keys, then state, metrics and throughput.

    Final values come from summary.json, and from the last metrics.csv row of a run without one.
    Best values are the lowest logged `val/fid`.
    """
    rows = [(key, [format_value(run.flat_config.get(key)) for run in runs]) for key in differing_config_keys(runs)]
    rows.append(("state", [run.state for run in runs]))
    rows.append(("steps", [format_value(_summary_or(run, "steps", _last_step(run))) for run in runs]))
    for key in ("train/d_loss", "train/g_loss"):
        rows.append((f"{key} (final)", [format_value(_final_loss(run, key)) for run in runs]))
    rows.append(("val/fid (final)", [format_value(_summary_or(run, "val_fid", run.final_metric("val/fid")))
                                     for run in runs]))
    rows.append(("val/fid (best)", [format_value(_summary_or(run, "val_fid_best", run.best_metric("val/fid")))
                                    for run in runs]))
    rows.append(("val/class_coverage (final)",
                 [format_value(_summary_or(run, "val_class_coverage", run.final_metric("val/class_coverage")))
                  for run in runs]))
    rows.append(("images/s", [format_value(_summary_or(run, "images_per_s", run.final_metric("perf/images_per_s")))
                              for run in runs]))
    return rows


def run_label(run: RunRecord, keys: list[str]) -> str:
    """Return "<id> (key=value, …)" with the values of `keys`, the last part of each key only."""
    if not keys:
        return run.run_id
    values = ", ".join(f"{key.rsplit('.', 1)[-1]}={format_value(run.flat_config.get(key))}" for key in keys)
    return f"{run.run_id} ({values})"


def plot_curves(runs: list[RunRecord], path: Path) -> Path:
    """Draw the loss and FID curves of all runs, one panel per metric over a shared step axis, as a PNG.

    Uses matplotlib's Agg canvas directly, so no display and no pyplot state are involved.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = differing_config_keys(runs)
    figure = Figure(figsize=CURVES_FIGSIZE_IN, dpi=CURVES_DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(CURVE_KEYS), 1, sharex=True)
    colors = [f"C{index % 10}" for index in range(len(runs))]
    for axis, metric in zip(axes, CURVE_KEYS, strict=True):
        drawn = False
        for run, color in zip(runs, colors, strict=True):
            steps, values = run.curve(metric)
            if steps:
                axis.plot(steps, values, color=color, marker="o" if len(steps) < 20 else None, markersize=3,
                          label=run_label(run, keys))
                drawn = True
        axis.set_ylabel(metric)
        axis.grid(True, alpha=0.3)
        if not drawn:
            axis.text(0.5, 0.5, f"no {metric} in these runs", transform=axis.transAxes, ha="center", va="center")
    axes[-1].set_xlabel("step")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize="small")
    figure.suptitle(f"{len(runs)} runs: {', '.join(keys) if keys else 'same config'}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    log.info("wrote curves of %d runs to %s", len(runs), path)
    return path


def compose_samples(store: ObjectStore, runs: list[RunRecord], path: Path) -> Path:
    """Put each run's final sample grid side by side, its run id above it, and save as a PNG.

    Grids of different heights are scaled to the tallest one. A run without a sample grid gets a
    grey placeholder of the same height, so every run keeps its column.
    """
    from PIL import Image, ImageDraw

    grids = [_final_grid(store, run) for run in runs]
    present = [grid for grid in grids if grid is not None]
    height = max((grid.height for grid in present), default=64)
    tiles = []
    for grid in grids:
        if grid is None:
            tiles.append(Image.new("RGB", (height, height), (128, 128, 128)))
        elif grid.height != height:
            width = max(1, round(grid.width * height / grid.height))
            tiles.append(grid.resize((width, height), Image.Resampling.NEAREST))
        else:
            tiles.append(grid)

    canvas_width = SAMPLES_MARGIN_PX * (len(tiles) + 1) + sum(tile.width for tile in tiles)
    canvas_height = SAMPLES_MARGIN_PX * 2 + SAMPLES_CAPTION_PX + height
    canvas = Image.new("RGB", (canvas_width, canvas_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left = SAMPLES_MARGIN_PX
    for run, tile in zip(runs, tiles, strict=True):
        draw.text((left, SAMPLES_MARGIN_PX // 2), run.run_id, fill=(0, 0, 0))
        canvas.paste(tile, (left, SAMPLES_MARGIN_PX + SAMPLES_CAPTION_PX))
        left += tile.width + SAMPLES_MARGIN_PX

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    log.info("wrote the final sample grids of %d runs to %s", len(runs), path)
    return path


def _final_grid(store: ObjectStore, run: RunRecord):
    from PIL import Image

    key = run.final_sample_key
    if key is None:
        log.warning("run %s has no sample grid in %s; showing a placeholder", run.run_id, store.describe())
        return None
    with Image.open(io.BytesIO(store.read_bytes(key))) as image:
        return image.convert("RGB")


def _read_optional(store: ObjectStore, key: str) -> Optional[bytes]:
    if not store.exists(key):
        return None
    return store.read_bytes(key)


def _read_yaml(store: ObjectStore, key: str) -> Optional[dict[str, Any]]:
    data = _read_optional(store, key)
    if data is None:
        return None
    try:
        return yaml.safe_load(data) or {}
    except yaml.YAMLError as error:
        raise StorageError(f"{store.describe(key)} is not valid YAML: {error}. Restore or delete the file.") from error


def _read_json(store: ObjectStore, key: str) -> Optional[dict[str, Any]]:
    data = _read_optional(store, key)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as error:
        raise StorageError(f"{store.describe(key)} is not valid JSON: {error}. Restore or delete the file.") from error


def _summary_or(run: RunRecord, key: str, fallback: Any) -> Any:
    if run.summary and run.summary.get(key) is not None:
        return run.summary[key]
    return fallback


def _final_loss(run: RunRecord, key: str) -> Optional[float]:
    losses = (run.summary or {}).get("final_losses") or {}
    return losses.get(key, run.final_metric(key))


def _last_step(run: RunRecord) -> Optional[int]:
    return int(run.metrics[-1]["step"]) if run.metrics else None


def format_value(value: Any) -> str:
    """Format a config or metric value for a table cell: 4 significant digits for floats, "-" for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)
