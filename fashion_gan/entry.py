"""Shared behaviour of the command-line entry points: logging set-up, override checks, exit codes."""

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from fashion_gan.config import schema_keys, suggest_key
from fashion_gan.errors import ConfigError, FashionGanError
from fashion_gan.redaction import RedactingFilter

CONFIG_GROUPS = ("data", "model", "trainer", "logger", "storage", "metrics", "experiment", "debug")


def configure_logging() -> None:
    """Log INFO and above to stderr, secrets removed; FASHION_GAN_LOG_LEVEL changes the level."""
    level = os.environ.get("FASHION_GAN_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "PIL", "wandb", "docker"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def check_overrides(arguments: list[str], config_dir: Path) -> None:
    """Reject unknown keys and config-group options on the command line before Hydra runs.

    Hydra would reject them too, but with a traceback hint and exit code 1; this names the key, the
    closest known one, and exits with the documented configuration error code.
    """
    known_keys = schema_keys()
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:
            continue
        key, _, value = argument.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra") or key.startswith("override"):
            continue
        if key in CONFIG_GROUPS:
            _check_group_options(config_dir, key, value)
            continue
        if key.split("/")[0] in CONFIG_GROUPS and "/" in key:
            continue
        if key not in known_keys:
            raise ConfigError(
                f"Unknown config key '{key}' on the command line.{suggest_key(key, known_keys)} "
                f"Run `python train.py --cfg job` to print every key with its current value."
            )


def _check_group_options(config_dir: Path, group: str, value: str) -> None:
    options = sorted(path.stem for path in (config_dir / group).glob("*.yaml"))
    for option in value.split(","):  # multirun sweeps list several options
        if option and option != "null" and option not in options:
            raise ConfigError(
                f"Unknown option '{option}' for config group '{group}'.{suggest_key(option, options)} "
                f"Known options: {', '.join(options)}."
            )


def exit_for_error(error: BaseException, logger: logging.Logger) -> NoReturn:
    """Exit with the error's documented code and its message, without a traceback, for user errors.

    Anything that is not a FashionGanError is a bug: it is re-raised with its traceback.
    """
    if isinstance(error, FashionGanError):
        logger.error("%s", error)
        sys.exit(error.exit_code)
    raise error
