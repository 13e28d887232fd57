"""FID and class coverage of the generator during training, every `metrics.eval_every_n_steps`."""

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from fashion_gan.config import MetricsConfig

log = logging.getLogger(__name__)

# Keys this callback puts into trainer.callback_metrics. MetricsCallback writes them to metrics.csv
# and to the loggers together with the training losses of the same step.
FID_METRIC_KEYS = ("val/fid", "val/fid_best", "val/class_coverage")
# Seed of the latent noise that every evaluation draws, so scores of one run differ only by the weights.
EVAL_NOISE_SEED = 1234
EVAL_BATCH_SIZE = 250


def real_statistics_cache_path(decoded_array_path: Path, extractor_name: str) -> Path:
    """Return where the real-image statistics of a decoded array are cached: beside the array.

    The array's file name contains the digest of the dataset contents and the preprocessing, so
    each dataset version gets its own statistics file.
    """
    decoded_array_path = Path(decoded_array_path)
    return decoded_array_path.with_name(f"{decoded_array_path.stem}.fid-{extractor_name}.npz")


class FidCallback(pl.Callback):
    """Score the generator against the real images every `eval_every_n_steps` and at the last step.

    Logs `val/fid`, `val/fid_best` and, with the Fashion-MNIST classifier as extractor,
    `val/class_coverage` (the normalized entropy of the predicted class shares: 1 = all classes
    equally often, 0 = one class only). When the extractor cannot run here (inception without its
    weights offline), the job logs a WARNING and trains without these metrics.

    Only global rank zero evaluates. Place this callback before MetricsCallback, because both act in
    `on_train_batch_end` and MetricsCallback must see the values of the same step.
    """

    def __init__(self, metrics_config: MetricsConfig, decoded, batch_size: int = EVAL_BATCH_SIZE,
                 noise_seed: int = EVAL_NOISE_SEED) -> None:
        self.extractor_name = metrics_config.fid_extractor
        self.every_n_steps = metrics_config.eval_every_n_steps
        self.num_samples = metrics_config.num_samples
        self.decoded = decoded
        self.batch_size = batch_size
        self.noise_seed = noise_seed
        self.evaluator = None
        self.last_scores: dict[str, Any] | None = None
        self._restored_best_fid: float | None = None
        self._last_evaluated_step: int | None = None
        # True once MetricsCallback has written the values in trainer.callback_metrics. They are
        # removed at the next batch, so later rows do not repeat a stale score.
        self._values_written = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from fashion_gan.metrics import FidEvaluator, MetricUnavailable

        if self.every_n_steps % trainer.log_every_n_steps != 0:
            log.warning("metrics.eval_every_n_steps=%d is not a multiple of trainer.log_every_n_steps=%d, so each "
                        "score appears in metrics.csv at the next logged step", self.every_n_steps,
                        trainer.log_every_n_steps)
        try:
            self.evaluator = FidEvaluator(self.extractor_name, num_samples=self.num_samples,
                                          batch_size=self.batch_size, device=pl_module.device)
        except MetricUnavailable as error:
            log.warning("Training continues without val/fid: %s", error)
            return
        self.evaluator.best_fid = self._restored_best_fid
        cache_path = real_statistics_cache_path(self.decoded.cache_path, self.extractor_name)
        self.evaluator.real_statistics(self.decoded.array, cache_path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx) -> None:
        if self._values_written:
            for key in FID_METRIC_KEYS:
                trainer.callback_metrics.pop(key, None)
            self._values_written = False

        step = trainer.global_step
        due = step % self.every_n_steps == 0 or step == trainer.max_steps
        if self.evaluator is not None and due and step != self._last_evaluated_step:
            self.evaluate(trainer, pl_module)

        has_values = any(key in trainer.callback_metrics for key in FID_METRIC_KEYS)
        # The steps at which MetricsCallback writes a row.
        if has_values and (step % trainer.log_every_n_steps == 0 or step == trainer.max_steps):
            self._values_written = True

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Score `num_samples` generated images and put the metric values into trainer.callback_metrics."""
        step = trainer.global_step
        scores = self.evaluator.score(self._generator_fn(pl_module))
        values = {key: value for key, value in self.evaluator.log_values(scores).items() if key in FID_METRIC_KEYS}
        for key, value in values.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        self.last_scores = scores
        self._last_evaluated_step = step
        coverage = values.get("val/class_coverage")
        log.info("step %d  val/fid %.3f  best %.3f%s", step, values["val/fid"], values["val/fid_best"],
                 "" if coverage is None else f"  class coverage {coverage:.3f}")
        return values

    def _generator_fn(self, pl_module: pl.LightningModule):
        """Return generator_fn(count) drawing noise from a fixed seed, so every evaluation uses the same latent points."""
        rng = torch.Generator().manual_seed(self.noise_seed)
        latent_dim = pl_module.hparams.latent_dim
        # The noise takes the module's float type, which is bfloat16 under trainer.precision=bf16-true.
        dtype = pl_module.fixed_noise.dtype

        def generate(count: int) -> torch.Tensor:
            noise = torch.randn(count, latent_dim, generator=rng).to(dtype)
            return pl_module.sample(noise).float()

        return generate

    def state_dict(self) -> dict[str, Any]:
        best = self.evaluator.best_fid if self.evaluator is not None else self._restored_best_fid
        return {"best_fid": best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_best_fid = state_dict.get("best_fid")
        if self.evaluator is not None:
            self.evaluator.best_fid = self._restored_best_fid
