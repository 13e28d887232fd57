"""Compose the real Hydra config in tests, shrink it, and run train.py as a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_DIR / "conf"
CLOTHING_DIR = PROJECT_DIR.parent / "shared" / "data" / "clothing-small" / "train"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Small nets and batches so that a test trains in seconds on 2 CPU cores.
TINY_MODEL = [
    "model.generator_features=8",
    "model.discriminator_features=8",
    "model.latent_dim=16",
    "model.sample_count=16",
    "data.batch_size=16",
    "trainer.precision=32-true",
]


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with overrides, as `python train.py OVERRIDES` would."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_train(arguments: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run `python train.py ARGUMENTS` in a subprocess and capture its output as text."""
    child_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, str(PROJECT_DIR / "train.py"), *arguments],
        cwd=cwd or PROJECT_DIR,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
