"""Weights & Biases set-up: mode choice, run id, group, redacted config, and a start that never stalls."""

import functools
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from fashion_gan.config import TrainConfig
from fashion_gan.redaction import redact

log = logging.getLogger(__name__)


def choose_wandb_mode(config: TrainConfig) -> str:
    """Return "online", "offline" or "disabled".

    WANDB_MODE always wins, then `logger.mode`. Otherwise the mode is online when WANDB_API_KEY is set
    and offline when it is not, so a job without an account still records its files for `wandb sync`.
    """
    environment_mode = os.environ.get("WANDB_MODE")
    if environment_mode:
        return "offline" if environment_mode == "dryrun" else environment_mode
    if config.logger.mode:
        return config.logger.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys: {"model": {"lr": 1}} -> {"model.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def start_wandb_run(config: TrainConfig, config_dict: dict[str, Any], run_id: str, run_name: str,
                    save_dir: Path, tags: list[str]):
    """Start (or continue, for a known run id) the W&B run; return None when W&B is disabled.

    Online start-up waits at most `logger.init_timeout_s`; when it fails the job continues offline
    with a warning instead of stalling, and `wandb sync` uploads the run later.
    """
    import wandb

    mode = choose_wandb_mode(config)
    if mode == "disabled":
        return None

    save_dir.mkdir(parents=True, exist_ok=True)
    arguments = dict(
        project=config.logger.project,
        entity=config.logger.entity,
        id=run_id,
        name=run_name,
        group=wandb_group(config),
        job_type="train",
        tags=sorted(set(config.logger.tags) | set(tags)),
        config=flatten(redact(config_dict)),
        dir=str(save_dir),
        resume="allow",
        reinit="finish_previous",
    )
    try:
        run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=config.logger.init_timeout_s,
                                                             x_disable_stats=True, console="off"), **arguments)
    except Exception as error:  # noqa: BLE001 - wandb raises many types for a failed online start
        if mode != "online":
            raise
        log.warning("W&B online start failed (%s); continuing offline. Upload later with `wandb sync %s`.",
                    type(error).__name__, save_dir / "wandb")
        run = wandb.init(mode="offline", settings=wandb.Settings(x_disable_stats=True, console="off"), **arguments)
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    log.info("W&B run %s (%s mode), files in %s", run_id, mode, run.dir)
    return run


def wandb_group(config: TrainConfig) -> str:
    """Return the W&B group: `logger.group`, else "<experiment>-sweep-<start time>" in a Hydra multirun, else the experiment."""
    if config.logger.group:
        return config.logger.group
    sweep_started = _multirun_started_at()
    if sweep_started is not None:
        return f"{config.run.experiment}-sweep-{sweep_started}"
    return config.run.experiment


def _multirun_started_at() -> Optional[str]:
    """Return the start time of the Hydra multirun this job belongs to, or None outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return _first_call_time()


@functools.cache
def _first_call_time() -> str:
    # NOTE: Hydra's basic launcher runs every job of a multirun in this one process, so all of them
    # share the first job's time. A launcher with one process per job gets one group per job; pass
    # logger.group=<name> there (as `make sweep` does).
    return time.strftime("%Y%m%d-%H%M%S")


def build_run_name(overrides: list[str], run_id: str) -> str:
    """Build a readable run name from Hydra overrides: "lr=0.0004,dropout=0.3 (fg-abc)"."""
    interesting = []
    for override in overrides:
        key, separator, value = override.partition("=")
        key = key.lstrip("+~")
        if not separator or key.startswith(("run.", "hydra.", "data.source")):
            continue
        # Only the key is shortened to its last part: "model.lr=0.0002" -> "lr=0.0002".
        interesting.append(f"{key.split('.')[-1]}={value}")
    return f"{','.join(interesting)} ({run_id})" if interesting else run_id


def finish_wandb_run(run: Optional[Any], summary: dict[str, Any], exit_code: int) -> None:
    """Write summary values and close the run, so a multirun's next job starts a new one."""
    if run is None:
        return
    run.summary.update(redact(summary))
    run.finish(exit_code=exit_code)


GENERATOR_ARTIFACT_FILE = "generator.pt"
_GENERATOR_HPARAMS = ("latent_dim", "generator_features", "channels", "image_size")
# Written always, null when unknown (a local folder has no dataset version).
_ARTIFACT_DATASET_KEYS = ("dataset_source", "dataset_version", "dataset_digest")
# Written when the run has them.
_ARTIFACT_RESULT_KEYS = ("dataset_images", "steps", "val_fid", "val_fid_best", "val_class_coverage")


def log_generator_artifact(run: Optional[Any], module, work_dir: Path, summary: dict[str, Any]):
    """Log the final generator as a W&B artifact of type "model" named `generator-<run id>`.

    With model.ema_decay > 0 the file holds the averaged weights. It contains the generator's `state_dict` (keys prefixed "generator.") and the hyperparameters
    that rebuild it, so `fashion-gan generate --checkpoint generator.pt` loads it like a checkpoint.
    The metadata names the dataset version and digest. In offline mode the artifact is recorded in
    the run files and uploaded by `wandb sync`. Returns the artifact, or None without a W&B run.
    """
    if run is None:
        return None
    import torch
    import wandb

    # Log the weight average when the run keeps one, because the sample grids, val/fid and generate use it.
    trained = module.generator_ema if getattr(module, "generator_ema", None) is not None else module.generator
    generator = getattr(trained, "_orig_mod", trained)  # unwrap torch.compile
    payload = {
        "state_dict": {f"generator.{key}": value.detach().cpu() for key, value in generator.state_dict().items()},
        "hyper_parameters": {name: module.hparams[name] for name in _GENERATOR_HPARAMS},
    }
    metadata = {key: summary.get(key) for key in _ARTIFACT_DATASET_KEYS}
    metadata.update({key: summary[key] for key in _ARTIFACT_RESULT_KEYS if summary.get(key) is not None})
    artifact = wandb.Artifact(f"generator-{run.id}", type="model", metadata=metadata,
                              description="Final DCGAN generator weights (state_dict and hyperparameters).")
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as folder:
        path = Path(folder) / GENERATOR_ARTIFACT_FILE
        torch.save(payload, path)
        # The default "mutable" policy copies the file into W&B's staging folder here, so the
        # temporary file may go once add_file returns.
        artifact.add_file(str(path), name=GENERATOR_ARTIFACT_FILE)
    aliases = ["latest"] + ([f"step-{summary['steps']}"] if summary.get("steps") is not None else [])
    run.log_artifact(artifact, aliases=aliases)
    log.info("Logged the generator as W&B artifact %s (%s)", artifact.name, ", ".join(aliases))
    return artifact
