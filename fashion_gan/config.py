"""The structured config schema of a training job, and its validation.

Hydra composes `conf/` into a DictConfig. `validate_config` merges it into the dataclasses below,
which rejects unknown keys and wrong types, then checks values. It runs before any network, disk or
W&B side effect, and every failure is a `ConfigError` naming the key, the value and what is allowed.
"""

import difflib
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fashion_gan.errors import ConfigError

ALLOWED_IMAGE_SIZES = (16, 32, 64, 128, 256)
ALLOWED_CHANNELS = (1, 3)
ALLOWED_DATA_KINDS = ("fashion_mnist", "image_folder")
ALLOWED_PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed")
ALLOWED_ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
ALLOWED_RESUME_MODES = ("auto", "always", "never")
ALLOWED_LOGGERS = ("wandb", "csv", "none")
ALLOWED_WANDB_MODES = ("online", "offline", "disabled")
ALLOWED_FID_EXTRACTORS = ("fashion_mnist_classifier", "inception")


@dataclass
class DataConfig:
    kind: str = "fashion_mnist"
    source: Optional[str] = None
    datasets_uri: Optional[str] = None
    channels: int = 1
    image_size: int = 32
    batch_size: int = 128
    augment_flip: bool = False
    cache_dir: Optional[str] = None


@dataclass
class ModelConfig:
    latent_dim: int = 100
    generator_features: int = 64
    discriminator_features: int = 64
    dropout: float = 0.0
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    label_smoothing: float = 0.0
    sample_count: int = 64
    ema_decay: float = 0.999
    ema_start_step: int = 1000


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    max_steps: int = 2000
    log_every_n_steps: int = 10
    deterministic: bool = False
    channels_last: bool = True
    compile: bool = False
    check_finite_every_n_steps: int = 1
    inject_nan_at_step: Optional[int] = None


@dataclass
class LoggerConfig:
    name: str = "wandb"
    project: str = "fashion-gan"
    entity: Optional[str] = None
    mode: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = 30.0


@dataclass
class StorageConfig:
    endpoint_url: Optional[str] = None
    max_concurrency: int = 16


@dataclass
class MetricsConfig:
    fid_extractor: Optional[str] = None
    eval_every_n_steps: int = 0
    num_samples: int = 5000


@dataclass
class RunConfig:
    id: Optional[str] = None
    name: Optional[str] = None
    experiment: str = "default"
    output: str = "outputs"
    seed: int = 42
    resume: str = "auto"
    checkpoint_every_n_steps: int = 500
    sample_every_n_steps: int = 250
    grace_period_s: float = 30.0
    lock_stale_after_s: float = 120.0


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    run: RunConfig = field(default_factory=RunConfig)


def validate_config(cfg: DictConfig | dict, original_cwd: Path | None = None) -> TrainConfig:
    """Merge a composed config into the schema, check every value and return the typed config.

    Relative local paths in `data.source`, `data.datasets_uri`, `data.cache_dir` and `run.output`
    resolve against `original_cwd` (the directory the user ran from), not Hydra's working directory.
    """
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("hydra", None)
    _reject_unknown_keys(plain, TrainConfig, prefix="")

    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
        config: TrainConfig = OmegaConf.to_object(merged)
    except (ValidationError, ConfigKeyError) as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(
            f"Invalid config value for '{key}': {error.msg if hasattr(error, 'msg') else error}. "
            f"Fix the value in conf/ or on the command line."
        ) from error
    except OmegaConfBaseException as error:
        raise ConfigError(f"Invalid config: {error}") from error

    _check_values(config)
    _resolve_local_paths(config, original_cwd or Path.cwd())
    _check_local_source_exists(config)
    return config


def schema_keys(schema: type = TrainConfig, prefix: str = "") -> list[str]:
    """List every dotted key of the schema, for "did you mean" suggestions."""
    keys = []
    for schema_field in fields(schema):
        dotted = f"{prefix}{schema_field.name}"
        keys.append(dotted)
        default = schema_field.default_factory() if callable(schema_field.default_factory) else None
        if is_dataclass(default):
            keys.extend(schema_keys(type(default), prefix=f"{dotted}."))
    return keys


def suggest_key(key: str, candidates: list[str]) -> str:
    """Return ' Did you mean "x"?' for the closest candidate, or an empty string."""
    matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f' Did you mean "{matches[0]}"?' if matches else ""


def _reject_unknown_keys(values: dict, schema: type, prefix: str) -> None:
    known = {schema_field.name: schema_field for schema_field in fields(schema)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(
                f"Unknown config key '{dotted}'.{suggest_key(dotted, schema_keys())} "
                f"Known keys here: {', '.join(sorted(f'{prefix}{name}' for name in known))}."
            )
        default_factory = known[key].default_factory
        nested = default_factory() if callable(default_factory) else None
        if is_dataclass(nested):
            if not isinstance(value, dict):
                raise ConfigError(f"Config key '{dotted}' must be a mapping of settings, got {value!r}.")
            _reject_unknown_keys(value, type(nested), prefix=f"{dotted}.")


def _require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"Invalid value for '{key}': {value!r}. Allowed: {allowed}.")


def _check_values(config: TrainConfig) -> None:
    data, model, trainer, run = config.data, config.model, config.trainer, config.run

    _require(data.kind in ALLOWED_DATA_KINDS, "data.kind", data.kind, ", ".join(ALLOWED_DATA_KINDS))
    _require(
        data.image_size in ALLOWED_IMAGE_SIZES,
        "data.image_size",
        data.image_size,
        "a power of two from 16 to 256: " + ", ".join(map(str, ALLOWED_IMAGE_SIZES)),
    )
    _require(data.channels in ALLOWED_CHANNELS, "data.channels", data.channels, "1 (grayscale) or 3 (RGB)")
    _require(data.batch_size >= 1, "data.batch_size", data.batch_size, "an integer >= 1")
    _require(data.kind == "fashion_mnist" or bool(data.source), "data.source", data.source,
             "a folder path, file:// or s3:// URI, or dataset:NAME[/VERSION] when data.kind=image_folder")

    _require(model.latent_dim >= 1, "model.latent_dim", model.latent_dim, "an integer >= 1")
    _require(model.generator_features >= 1, "model.generator_features", model.generator_features, "an integer >= 1")
    _require(model.discriminator_features >= 1, "model.discriminator_features", model.discriminator_features,
             "an integer >= 1")
    _require(0.0 <= model.dropout < 1.0, "model.dropout", model.dropout, "a probability in [0, 1)")
    _require(math.isfinite(model.lr) and model.lr > 0.0, "model.lr", model.lr, "a finite learning rate > 0")
    _require(0.0 <= model.beta1 < 1.0, "model.beta1", model.beta1, "a value in [0, 1)")
    _require(0.0 <= model.beta2 < 1.0, "model.beta2", model.beta2, "a value in [0, 1)")
    _require(0.0 <= model.label_smoothing < 0.5, "model.label_smoothing", model.label_smoothing,
             "a value in [0, 0.5)")
    _require(model.sample_count >= 1, "model.sample_count", model.sample_count, "an integer >= 1")
    _require(0.0 <= model.ema_decay < 1.0, "model.ema_decay", model.ema_decay,
             "a value in [0, 1), such as 0.999; 0 = no EMA generator")
    _require(model.ema_start_step >= 0, "model.ema_start_step", model.ema_start_step, "an integer >= 0")

    _require(trainer.max_steps >= 1, "trainer.max_steps", trainer.max_steps, "an integer >= 1")
    _require(trainer.accelerator in ALLOWED_ACCELERATORS, "trainer.accelerator", trainer.accelerator,
             ", ".join(ALLOWED_ACCELERATORS))
    _require(str(trainer.precision) in ALLOWED_PRECISIONS, "trainer.precision", trainer.precision,
             ", ".join(ALLOWED_PRECISIONS))
    _require(trainer.devices == "auto" or (isinstance(trainer.devices, int) and trainer.devices >= 1),
             "trainer.devices", trainer.devices, '"auto" or an integer >= 1')
    _require(trainer.num_nodes >= 1, "trainer.num_nodes", trainer.num_nodes, "an integer >= 1")
    _require(trainer.log_every_n_steps >= 1, "trainer.log_every_n_steps", trainer.log_every_n_steps,
             "an integer >= 1")
    _require(trainer.check_finite_every_n_steps >= 1, "trainer.check_finite_every_n_steps",
             trainer.check_finite_every_n_steps, "an integer >= 1")

    _require(config.logger.name in ALLOWED_LOGGERS, "logger.name", config.logger.name, ", ".join(ALLOWED_LOGGERS))
    _require(config.logger.mode is None or config.logger.mode in ALLOWED_WANDB_MODES, "logger.mode",
             config.logger.mode, "null (automatic), " + ", ".join(ALLOWED_WANDB_MODES))
    endpoint = config.storage.endpoint_url
    _require(endpoint is None or endpoint.startswith(("http://", "https://")), "storage.endpoint_url", endpoint,
             "null (use AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or AWS) or a URL starting with http:// or https://")
    _require(config.storage.max_concurrency >= 1, "storage.max_concurrency", config.storage.max_concurrency,
             "an integer >= 1")
    _require(config.metrics.fid_extractor is None or config.metrics.fid_extractor in ALLOWED_FID_EXTRACTORS,
             "metrics.fid_extractor", config.metrics.fid_extractor,
             "null (off), " + ", ".join(ALLOWED_FID_EXTRACTORS))
    _require(config.metrics.eval_every_n_steps >= 0, "metrics.eval_every_n_steps",
             config.metrics.eval_every_n_steps, "0 (off) or an integer >= 1")
    _require(config.metrics.num_samples >= 2, "metrics.num_samples", config.metrics.num_samples,
             "an integer >= 2")

    _require(run.id is None or _is_valid_run_id(run.id), "run.id", run.id,
             "1-63 characters of a-z, A-Z, 0-9 and '-', starting with a letter or digit")
    _require(run.resume in ALLOWED_RESUME_MODES, "run.resume", run.resume, ", ".join(ALLOWED_RESUME_MODES))
    _require(run.checkpoint_every_n_steps >= 1, "run.checkpoint_every_n_steps", run.checkpoint_every_n_steps,
             "an integer >= 1")
    _require(run.sample_every_n_steps >= 1, "run.sample_every_n_steps", run.sample_every_n_steps,
             "an integer >= 1")
    _require(run.grace_period_s > 0, "run.grace_period_s", run.grace_period_s, "a number of seconds > 0")
    _require(bool(run.output), "run.output", run.output, "a folder path, file:// or s3:// URI")


def _check_local_source_exists(config: TrainConfig) -> None:
    source = config.data.source
    if source and "://" not in source and not source.startswith("dataset:") and not Path(source).is_dir():
        from fashion_gan.errors import DatasetError

        raise DatasetError(
            f"Dataset source {source} does not exist or is not a folder. Check data.source: give a folder of "
            f"images (or of Fashion-MNIST idx files), a file:// or s3:// URI, or dataset:NAME[/VERSION]."
        )


def _is_valid_run_id(run_id: str) -> bool:
    # SageMaker training job names: ^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}; W&B ids accept the same set.
    if not 1 <= len(run_id) <= 63 or not run_id[0].isalnum() or not run_id[-1].isalnum():
        return False
    return all(character.isascii() and (character.isalnum() or character == "-") for character in run_id)


def _resolve_local_paths(config: TrainConfig, original_cwd: Path) -> None:
    config.data.source = _absolute_if_local(config.data.source, original_cwd)
    config.data.datasets_uri = _absolute_if_local(config.data.datasets_uri, original_cwd)
    config.run.output = _absolute_if_local(config.run.output, original_cwd)
    if config.data.cache_dir:
        config.data.cache_dir = str((original_cwd / os.path.expanduser(config.data.cache_dir)).resolve())


def _absolute_if_local(text: Optional[str], original_cwd: Path) -> Optional[str]:
    if not text or "://" in text or text.startswith("dataset:"):
        return text
    return str((original_cwd / os.path.expanduser(text)).resolve())
