"""One training job: validate, pull, decode, resume, fit, push. `train.py` and the tests call `run`."""

import hashlib
import json
import logging
import os
import platform
import secrets
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

import fashion_gan
from fashion_gan.config import TrainConfig, validate_config
from fashion_gan.errors import ConfigError, ExitCode, FashionGanError, RunConflictError
from fashion_gan.redaction import RedactingFilter, redact

log = logging.getLogger(__name__)

RUN_ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass
class TrainResult:
    """The outcome of a finished or stopped job, returned to its caller."""

    run_id: str
    exit_code: int
    local_run_dir: Path
    output_uri: str
    summary: dict[str, Any] = field(default_factory=dict)


def new_run_id() -> str:
    """Return a short, unique id valid as a SageMaker job name and a W&B run id: "fg-" + 10 base36 chars."""
    return "fg-" + "".join(secrets.choice(RUN_ID_ALPHABET) for _ in range(10))


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASHION_GAN_CACHE", Path.home() / ".cache" / "fashion-gan")).expanduser()


def run(cfg: DictConfig | dict, overrides: Optional[list[str]] = None, original_cwd: Optional[Path] = None,
        tags: Optional[list[str]] = None) -> TrainResult:
    """Train one run to `trainer.max_steps`, resuming it when its id already has a checkpoint.

    Raises FashionGanError subclasses for user-facing failures (bad config or data, storage,
    divergence, run conflicts); returns a result whose exit code is ExitCode.PREEMPTED after SIGTERM.
    """
    # 1. Validate everything before any network, disk or W&B side effect.
    config = validate_config(cfg, original_cwd=original_cwd)
    _apply_sagemaker_distributed_env(config)
    run_id = config.run.id or os.environ.get("FASHION_GAN_RUN_ID") or _external_launch_run_id() or new_run_id()
    config.run.id = run_id
    config_dict = redact(asdict(config))
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
    # Lightning imports torchmetrics, which imports matplotlib when it is installed, and matplotlib
    # writes its font cache and config folder into HOME unless MPLCONFIGDIR points elsewhere.
    os.environ.setdefault("MPLCONFIGDIR", str(cache_dir / "matplotlib"))
    global_rank = _global_rank_from_environment()
    # Processes that Lightning launches for more devices re-run train.py and inherit the environment:
    # this gives them this process's run id (and so one run folder, one W&B run, one output prefix).
    shares_run_id = _expected_world_size(config) > 1 and "FASHION_GAN_RUN_ID" not in os.environ
    if shares_run_id:
        os.environ["FASHION_GAN_RUN_ID"] = run_id

    from fashion_gan.storage import open_store

    store = open_store(config.run.output, endpoint_url=config.storage.endpoint_url,
                       max_concurrency=config.storage.max_concurrency)
    local_run_dir = _local_run_dir(store, run_id, cache_dir)
    try:
        local_run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(
            f"Cannot create the run folder {local_run_dir}: {error.strerror}. Set run.output to a writable folder "
            f"or an s3:// URI (and FASHION_GAN_CACHE to a writable cache folder)."
        ) from error
    log_handler = _attach_job_log(local_run_dir / "job.log") if global_rank == 0 else None

    from fashion_gan.run_outputs import RunLock

    lock = RunLock(store, run_id, stale_after_s=config.run.lock_stale_after_s) if global_rank == 0 else None
    started_at = time.time()
    summary: dict[str, Any] = {"run_id": run_id, "state": "running", "package_version": fashion_gan.__version__}
    pusher = None
    owns_run = False  # False until this job may write into runs/<id>/ (lock taken, config compatible)
    try:
        if lock is not None:
            lock.acquire()
        log.info("Run %s: outputs at %s", run_id, store.describe(f"runs/{run_id}"))
        resume_from = _check_existing_run(store, config, config_dict, run_id, local_run_dir)
        owns_run = True
        _write_config(store, run_id, local_run_dir, config_dict, global_rank)

        from fashion_gan.callbacks.pusher import OutputPusher

        pusher = OutputPusher(store, run_id, local_run_dir, enabled=global_rank == 0)

        # 2-3. Pull the dataset and decode it once into the uint8 array cache.
        decoded, source = _prepare_data(config, cache_dir)
        summary.update(_dataset_summary(decoded, source))

        # 4-5. Resume from the run's latest checkpoint and fit.
        outcome = _fit(config, config_dict, run_id, decoded, source, local_run_dir, pusher, resume_from,
                       overrides or [], tags or [], summary)
        summary["state"] = "stopped" if outcome["preempted"] else "succeeded"
        exit_code = ExitCode.PREEMPTED if outcome["preempted"] else ExitCode.SUCCESS
        summary["exit_code"] = exit_code

        # 6. Push the final outputs and wait for every upload.
        _finish(summary, started_at, local_run_dir, pusher, global_rank)
    except FashionGanError as error:
        summary.update(state="failed", failure_reason=str(error), exit_code=error.exit_code)
        if owns_run:
            _finish(summary, started_at, local_run_dir, pusher, global_rank)
        raise
    finally:
        if shares_run_id:
            os.environ.pop("FASHION_GAN_RUN_ID", None)
        if lock is not None and lock.held:
            lock.release()
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()
    return TrainResult(run_id=run_id, exit_code=exit_code, local_run_dir=local_run_dir,
                       output_uri=config.run.output, summary=summary)


def _apply_sagemaker_distributed_env(config: TrainConfig) -> None:
    """Set MASTER_ADDR, MASTER_PORT, NODE_RANK and WORLD_SIZE from SM_HOSTS on a multi-instance SageMaker job.

    Lightning's default cluster environment reads them and launches one process per device on
    each node. Values already in the environment win. `trainer.num_nodes` follows the host count
    when the config leaves it at 1.
    """
    if "SM_HOSTS" not in os.environ:
        return
    from fashion_gan.runner.distributed import sagemaker_distributed_env

    values = sagemaker_distributed_env(os.environ)
    if values is None:
        return
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE"):
        os.environ.setdefault(name, values[name])
    host_count = int(values["NUM_NODES"])
    if config.trainer.num_nodes == 1:
        config.trainer.num_nodes = host_count
    elif config.trainer.num_nodes != host_count:
        raise ConfigError(
            f"trainer.num_nodes={config.trainer.num_nodes} does not match the {host_count} SageMaker hosts in "
            f"SM_HOSTS. Leave trainer.num_nodes at 1 or set it to {host_count}."
        )


def _external_launch_run_id() -> Optional[str]:
    """Return a run id that every process of a torchrun launch derives alike, or None outside torchrun.

    torchrun starts every process itself, so no process can hand its generated id to the others.
    Raises ConfigError when several processes were launched without a shared rendezvous id.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None  # Lightning's own launcher: the first process passes FASHION_GAN_RUN_ID to the others
    rendezvous_id = os.environ["TORCHELASTIC_RUN_ID"]
    if rendezvous_id in ("", "none"):
        raise ConfigError(
            "run.id is not set, and the processes of this torchrun launch share no rendezvous id to derive one "
            "from. Pass run.id=<id> (the same on every node), or use torchrun --standalone or --rdzv-id."
        )
    digest = int(hashlib.sha256(rendezvous_id.encode()).hexdigest(), 16)
    characters = []
    for _ in range(10):
        digest, index = divmod(digest, len(RUN_ID_ALPHABET))
        characters.append(RUN_ID_ALPHABET[index])
    return "fg-" + "".join(characters)


def _global_rank_from_environment() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    node_rank = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return node_rank + local_rank if node_rank == 0 else node_rank * int(os.environ.get("LOCAL_WORLD_SIZE", 1)) + local_rank


def _local_run_dir(store, run_id: str, cache_dir: Path) -> Path:
    """Return where the job writes its files: the output folder itself, or a staging folder to upload from."""
    if store.root.scheme == "file":
        return Path(store.root.path) / "runs" / run_id
    return cache_dir / "runs" / run_id


def _attach_job_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    logging.getLogger().addHandler(handler)
    return handler


def _check_existing_run(store, config: TrainConfig, config_dict: dict, run_id: str, local_run_dir: Path):
    """Return the local checkpoint to resume from, or None; reject a conflicting run."""
    from fashion_gan.run_outputs import config_differences, read_latest_pointer, read_run_config, run_prefix

    stored_config = read_run_config(store, run_id)
    if stored_config is None:
        return None
    if config.run.resume == "never":
        raise RunConflictError(
            f"Run id '{run_id}' already exists in {store.describe()} and run.resume=never. "
            f"Choose another run.id, or set run.resume=auto to continue it."
        )
    differences = config_differences(stored_config, config_dict)
    if differences and config.run.resume != "always":
        raise RunConflictError(
            f"Run id '{run_id}' already exists with a different config ({'; '.join(differences)}). "
            f"Choose another run.id for a new run, or set run.resume=always to continue this run with the new values."
        )

    pointer = read_latest_pointer(store, run_id)
    if pointer is None:
        log.info("Run %s exists but has no checkpoint yet; starting from step 0", run_id)
        return None
    local_path = local_run_dir / pointer.key
    if not (local_path.exists() and local_path.stat().st_size == pointer.size):
        store.download_file(f"{run_prefix(run_id)}/{pointer.key}", local_path, expected_size=pointer.size,
                            expected_sha256=pointer.sha256)
        _restore_run_files(store, run_id, local_run_dir)
    log.info("Resuming run %s from step %d (%s)", run_id, pointer.step, pointer.key)
    return local_path


def _restore_run_files(store, run_id: str, local_run_dir: Path) -> None:
    """Fetch the run's metrics and sample grids, so a resumed run on a new machine keeps its history."""
    from fashion_gan.run_outputs import run_prefix

    prefix = run_prefix(run_id)
    wanted = [item for item in store.list(f"{prefix}/")
              if item.key == f"{prefix}/metrics.csv" or item.key.startswith(f"{prefix}/samples/")]
    if not wanted:
        return
    # local_run_dir is <staging root>/runs/<id>, and the object keys start with runs/<id>/.
    store.download_many(wanted, local_run_dir.parent.parent, description="restore run files")


def _write_config(store, run_id: str, local_run_dir: Path, config_dict: dict, global_rank: int) -> None:
    if global_rank != 0:
        return
    text = OmegaConf.to_yaml(OmegaConf.create(config_dict))
    path = local_run_dir / "config.yaml"
    temporary = path.with_suffix(".yaml.partial")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    if store.root.scheme != "file":
        store.write_bytes(f"runs/{run_id}/config.yaml", text.encode())


def _prepare_data(config: TrainConfig, cache_dir: Path):
    from fashion_gan.data.cache import load_decoded_array
    from fashion_gan.data.pull import pull_source

    source = pull_source(config, cache_dir)
    decoded = load_decoded_array(source.local_dir, kind=config.data.kind, channels=config.data.channels,
                                 image_size=config.data.image_size, cache_dir=cache_dir)
    log.info("Dataset %s: %d images of %dx%dx%d (%s decoded-array cache at %s)", source.description, len(decoded.array),
             config.data.channels, config.data.image_size, config.data.image_size,
             "reused" if decoded.reused else "new", decoded.cache_path)
    return decoded, source


def _dataset_summary(decoded, source) -> dict[str, Any]:
    return {
        "dataset_source": source.description,
        "dataset_version": source.version,
        "dataset_digest": decoded.content_digest,
        "dataset_images": int(len(decoded.array)),
        "skipped_files": len(decoded.skipped_files),
        "skipped_file_names": [name for name, _ in decoded.skipped_files[:50]],
    }


def resolve_precision(precision: str, accelerator: str) -> str:
    """Resolve `trainer.precision=auto`: bf16-mixed where the hardware computes in bf16, else 32-true."""
    if precision != "auto":
        return precision
    import torch

    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("cpu", "auto") and _cpu_has_bf16():
        return "bf16-mixed"
    return "32-true"


def _cpu_has_bf16() -> bool:
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _fit(config: TrainConfig, config_dict: dict, run_id: str, decoded, source, local_run_dir: Path, pusher,
         resume_from: Optional[Path], overrides: list[str], tags: list[str], summary: dict) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch

    from fashion_gan.callbacks.checkpoints import CheckpointPushCallback
    from fashion_gan.callbacks.metrics import MetricsCallback
    from fashion_gan.callbacks.preemption import PreemptionCallback, PreemptionSignal
    from fashion_gan.callbacks.samples import SampleGridCallback
    from fashion_gan.data.datamodule import DecodedArrayDataModule
    from fashion_gan.models.dcgan import DCGAN
    from fashion_gan.tracking import build_run_name, start_wandb_run

    if config.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    pl.seed_everything(config.run.seed, workers=True, verbose=False)
    precision = resolve_precision(str(config.trainer.precision), config.trainer.accelerator)
    module = DCGAN(
        latent_dim=config.model.latent_dim,
        generator_features=config.model.generator_features,
        discriminator_features=config.model.discriminator_features,
        channels=config.data.channels,
        image_size=config.data.image_size,
        dropout=config.model.dropout,
        generator_lr=config.model.lr,
        discriminator_lr=config.model.lr,
        adam_beta1=config.model.beta1,
        adam_beta2=config.model.beta2,
        label_smoothing=config.model.label_smoothing,
        sample_count=config.model.sample_count,
        augment_flip=config.data.augment_flip,
        seed=config.run.seed,
        channels_last=config.trainer.channels_last,
        check_finite_every_n_steps=config.trainer.check_finite_every_n_steps,
        inject_nan_at_step=config.trainer.inject_nan_at_step,
        ema_decay=config.model.ema_decay,
        ema_start_step=config.model.ema_start_step,
    )
    if config.trainer.compile:
        module.generator = torch.compile(module.generator)
        module.discriminator = torch.compile(module.discriminator)
    datamodule = DecodedArrayDataModule(decoded, batch_size=config.data.batch_size, seed=config.run.seed)

    wandb_run = None
    loggers = []
    if config.logger.name == "wandb" and pusher.enabled:
        wandb_run = start_wandb_run(config, config_dict, run_id, config.run.name or build_run_name(overrides, run_id),
                                    local_run_dir, tags)
    if wandb_run is not None:
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(WandbLogger(experiment=wandb_run))

    preemption = PreemptionSignal()
    checkpoints = CheckpointPushCallback(local_run_dir, config.run.checkpoint_every_n_steps, pusher)
    metrics = MetricsCallback(local_run_dir, config.trainer.log_every_n_steps,
                              images_per_step=config.data.batch_size * _expected_world_size(config), max_steps=config.trainer.max_steps,
                              pusher=pusher, write_csv=config.logger.name != "none", loggers=loggers)
    preemption_callback = PreemptionCallback(preemption, checkpoints)
    # Metric callbacks come first: they put val/* values into trainer.callback_metrics in the same
    # on_train_batch_end in which MetricsCallback then writes the row of that step.
    callbacks = [*_metric_callbacks(config, decoded, local_run_dir), metrics,
                 SampleGridCallback(local_run_dir, config.run.sample_every_n_steps, pusher,
                                    real_images=decoded.array[: config.model.sample_count], loggers=loggers),
                 checkpoints, preemption_callback]

    _require_accelerator(config.trainer.accelerator)
    trainer = _build_trainer(pl.Trainer, dict(
        accelerator=config.trainer.accelerator,
        devices=config.trainer.devices,
        num_nodes=config.trainer.num_nodes,
        strategy=_training_strategy(config),
        precision=precision,
        max_steps=config.trainer.max_steps,
        max_epochs=-1,
        logger=False,
        callbacks=callbacks,
        plugins=[checkpoints.checkpoint_io],
        log_every_n_steps=config.trainer.log_every_n_steps,
        deterministic=config.trainer.deterministic,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=str(local_run_dir),
    ))
    # Every process takes its own batch_size images per step (the data module shards by rank).
    metrics.images_per_step = config.data.batch_size * trainer.world_size
    log.info("Training %s to step %d on %s with precision %s, %d process(es)", run_id, config.trainer.max_steps,
             trainer.accelerator.__class__.__name__.replace("Accelerator", "").lower(), precision, trainer.world_size)

    preemption.install()
    fit_started = time.perf_counter()
    exit_code = ExitCode.BUG
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
        exit_code = ExitCode.SUCCESS
    except FashionGanError as error:
        exit_code = error.exit_code
        raise
    finally:
        preemption.uninstall()
        fit_seconds = time.perf_counter() - fit_started
        pusher_wait_s = preemption.seconds_left(config.run.grace_period_s) if preemption.received.is_set() else None
        from fashion_gan.tracking import finish_wandb_run, log_generator_artifact

        outcome = {
            "steps": int(trainer.global_step),
            "max_steps": config.trainer.max_steps,
            "resumed_from_step": _step_of(resume_from),
            "images_seen": int(trainer.global_step) * config.data.batch_size * trainer.world_size,
            "train_wall_time_s": round(fit_seconds, 3),
            "images_per_s": metrics.images_per_s,
            "precision": precision,
            "final_losses": {key: value for key, value in metrics.last_values.items() if key.startswith("train/")},
            "preempted": preemption_callback.stopped_at_step is not None,
        }
        outcome.update(_metric_summary(metrics.last_values))
        summary.update(outcome)
        if trainer.is_global_zero:
            if exit_code == ExitCode.SUCCESS and not outcome["preempted"]:
                log_generator_artifact(wandb_run, module, local_run_dir, summary)
            finish_wandb_run(wandb_run, _wandb_summary(summary), exit_code=0 if exit_code in (0, 75) else exit_code)
        if pusher_wait_s is not None:
            pusher.wait(timeout_s=pusher_wait_s)
    return outcome


def _require_accelerator(accelerator: str) -> None:
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible to this process. Use trainer=cpu "
            f"(or trainer=auto to use a GPU when there is one), or run on a GPU machine (fashion-gan run --gpu)."
        )


def _build_trainer(trainer_class, arguments: dict):
    """Create the Trainer, turning Lightning's rejection of a device or strategy setting into a ConfigError."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        return trainer_class(**arguments)
    except MisconfigurationException as error:
        raise ConfigError(
            f"Invalid trainer settings (accelerator={arguments['accelerator']}, devices={arguments['devices']}, "
            f"strategy={arguments['strategy']}, precision={arguments['precision']}): {error}"
        ) from error


def _metric_callbacks(config: TrainConfig, decoded, local_run_dir: Path) -> list:
    if not config.metrics.fid_extractor or config.metrics.eval_every_n_steps <= 0:
        return []
    from fashion_gan.callbacks.fid import FidCallback

    return [FidCallback(config.metrics, decoded)]


def _metric_summary(values: dict[str, float]) -> dict[str, Any]:
    return {key.replace("/", "_"): value for key, value in values.items() if key.startswith("val/")}


def _wandb_summary(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps", "images_seen", "images_per_s", "train_wall_time_s", "dataset_digest", "dataset_source",
            "dataset_version", "skipped_files", "val_fid", "val_fid_best", "val_class_coverage")
    return {key: summary[key] for key in keys if summary.get(key) is not None}


def _expected_world_size(config: TrainConfig) -> int:
    """Return how many training processes the Trainer will run, before it is built.

    WORLD_SIZE wins when a launcher set it; `trainer.devices=auto` counts the visible GPUs unless the
    accelerator is the CPU, where Lightning uses one device.
    """
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    devices = config.trainer.devices
    if not isinstance(devices, int):
        devices = 1
        if config.trainer.accelerator != "cpu":
            import torch

            devices = max(1, torch.cuda.device_count())
    return devices * config.trainer.num_nodes


def _training_strategy(config: TrainConfig) -> str:
    """Return the Lightning strategy: DDP that tolerates parameters without gradients when several processes train.

    Each step runs two backward passes, and neither reaches every parameter: the D loss does not
    reach G (its input is detached), and the G loss skips D (toggled off). Plain DDP expects every
    parameter in each backward and raises, so find_unused_parameters is required.
    """
    strategy = config.trainer.strategy
    if strategy == "ddp" or (strategy == "auto" and _expected_world_size(config) > 1):
        return "ddp_find_unused_parameters_true"
    return strategy


def _step_of(checkpoint: Optional[Path]) -> Optional[int]:
    if checkpoint is None:
        return None
    digits = "".join(character for character in checkpoint.stem if character.isdigit())
    return int(digits) if digits else None


def _finish(summary: dict[str, Any], started_at: float, local_run_dir: Path, pusher, global_rank: int) -> None:
    """Write summary.json and job.log, push them, and wait for every pending upload."""
    if global_rank != 0:
        return
    summary["wall_time_s"] = round(time.time() - started_at, 3)
    summary["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = local_run_dir / "summary.json"
    temporary = path.with_suffix(".json.partial")
    temporary.write_text(json.dumps(redact(summary), indent=2, default=str), encoding="utf-8")
    temporary.replace(path)
    if pusher is None:
        return
    pusher.push(path)
    log_path = local_run_dir / "job.log"
    if log_path.exists():
        pusher.push(log_path)
    pusher.wait()
    pusher.close()
    log.info("Run %s %s: samples in %s, checkpoints in %s", summary["run_id"], summary["state"],
             pusher.store.describe(f"runs/{summary['run_id']}/samples"),
             pusher.store.describe(f"runs/{summary['run_id']}/checkpoints"))
