"""Weights & Biases set-up: mode choice, run id, group, redacted config, and a start that never stalls."""

import logging
import os
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
        group=config.logger.group or config.run.experiment,
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


def build_run_name(overrides: list[str], run_id: str) -> str:
    """Build a readable run name from Hydra overrides: "lr=0.0004,dropout=0.3 (fg-abc)"."""
    interesting = [
        override.split(".")[-1]
        for override in overrides
        if "=" in override and not override.split("=")[0].lstrip("+~").startswith(("run.", "hydra.", "data.source"))
    ]
    return f"{','.join(interesting)} ({run_id})" if interesting else run_id


def finish_wandb_run(run: Optional[Any], summary: dict[str, Any], exit_code: int) -> None:
    """Write summary values and close the run, so a multirun's next job starts a new one."""
    if run is None:
        return
    run.summary.update(redact(summary))
    run.finish(exit_code=exit_code)
