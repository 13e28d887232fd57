"""Sample quality after the same number of steps: the classic DCGAN recipe vs the project's default recipe.

Both recipes train the project's Generator and Discriminator on Fashion-MNIST at 1x32x32 (features
32/32, latent 100, batch 128, Adam lr 2e-4 with betas (0.5, 0.999)) for the same number of steps
from the same seed. Then FidEvaluator("fashion_mnist_classifier") scores `num_samples` generated
images against the real statistics that `val/fid` uses: a seeded subset of the project's decoded
training array. The latent noise comes from fashion_gan.callbacks.fid.EVAL_NOISE_SEED in chunks of
EVAL_BATCH_SIZE, as in FidCallback.

  classic  the torchvision transforms over the idx files (Resize(32), ToTensor, Normalize), applied
           once and cached, a shuffling DataLoader, and the plain float32 loop of benchmarks/reference.py.
  project  `python train.py experiment=fashion_mnist logger=none metrics=fid ...`: the project's
           defaults, including the EMA generator (model.ema_decay) and trainer.precision=auto.

Child process: `python -m benchmarks.fid_recipe --settings JSON --result FILE --variant classic|project`.
`benchmarks.run --only fid` calls `bench_fid`, which runs the children and collects their scores.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import PROJECT_DIR, BenchSettings, child_parser, run_child, write_result

log = logging.getLogger("benchmarks")

VARIANTS = ("classic", "project")
# The figures of the last full (not --quick) fid run; benchmarks/run.py renders them into RESULTS.md.
FID_RESULTS_PATH = Path(__file__).resolve().parent / "fid_results.json"
EXTRACTOR = "fashion_mnist_classifier"


@dataclass
class FidSettings:
    """One comparison: both recipes train `steps` steps from `seed`, then get scored on `num_samples` images."""

    steps: int = 500
    seed: int = 42
    num_samples: int = 5000
    work_dir: str = ""  # decoded-array cache, real statistics and the project's run folders
    fashion_mnist_dir: str = ""  # "" = the project's search order (FASHION_MNIST_DIR, /usr/share/datasets/...)
    image_size: int = 32
    batch_size: int = 128
    generator_features: int = 32
    discriminator_features: int = 32
    latent_dim: int = 100
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    project_overrides: list[str] = field(default_factory=list)  # extra train.py overrides, for smoke tests

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "FidSettings":
        return cls(**json.loads(text))

    def reference_settings(self) -> BenchSettings:
        """Return the settings of benchmarks/reference.py's trainer: the classic recipe, no dropout or smoothing."""
        return BenchSettings(image_size=self.image_size, channels=1, batch_size=self.batch_size,
                             generator_features=self.generator_features,
                             discriminator_features=self.discriminator_features, latent_dim=self.latent_dim,
                             dropout=0.0, label_smoothing=0.0, lr=self.lr, beta1=self.beta1, beta2=self.beta2,
                             seed=self.seed)


# Scoring, shared by both variants ---------------------------------------------------------------

def decoded_training_array(settings: FidSettings):
    """Return the project's decoded Fashion-MNIST training array, building the cache in work_dir once."""
    from fashion_gan.data.cache import load_decoded_array

    return load_decoded_array(settings.fashion_mnist_dir or None, kind="fashion_mnist", channels=1,
                              image_size=settings.image_size, cache_dir=Path(settings.work_dir) / "cache" / "decoded",
                              show_progress=False)


def fid_evaluator(settings: FidSettings):
    """Return a FidEvaluator holding the real statistics of val/fid, cached where FidCallback caches them."""
    from fashion_gan.callbacks.fid import EVAL_BATCH_SIZE, real_statistics_cache_path
    from fashion_gan.metrics import FidEvaluator

    decoded = decoded_training_array(settings)
    evaluator = FidEvaluator(EXTRACTOR, num_samples=settings.num_samples, batch_size=EVAL_BATCH_SIZE)
    evaluator.real_statistics(decoded.array, real_statistics_cache_path(decoded.cache_path, EXTRACTOR))
    return evaluator


def score_generator(evaluator, generator) -> dict:
    """Score a generator as FidCallback does: eval mode, noise from EVAL_NOISE_SEED drawn batch by batch."""
    import torch

    from fashion_gan.callbacks.fid import EVAL_NOISE_SEED
    from fashion_gan.sampling import generate

    rng = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    evaluator.best_fid = None

    def generate_images(count: int) -> torch.Tensor:
        return generate(generator, torch.randn(count, generator.latent_dim, generator=rng))

    scores = evaluator.score(generate_images)
    return {"fid": scores["fid"], "class_coverage": scores["class_coverage_entropy"],
            "class_shares": scores["class_shares"]}


# The classic recipe ---------------------------------------------------------------------------

def classic_images(settings: FidSettings):
    """Return the Fashion-MNIST training set as the PyTorch DCGAN example's transforms make it: (N, 1, H, W) floats.

    The transforms (PIL image, Resize, ToTensor, Normalize) have no random part, so they run once and
    the result is cached in work_dir. Training from the cached tensors gives the same batches as
    decoding in DataLoader workers every epoch. This benchmark measures sample quality only; the
    classic pipeline's speed is measured by benchmarks/training.py.
    """
    import torch
    from PIL import Image
    from torchvision import transforms

    from fashion_gan.data.fashion_mnist import find_fashion_mnist_dir, load_idx

    cache_path = Path(settings.work_dir) / "cache" / f"classic-fashion-mnist-{settings.image_size}.pt"
    if cache_path.is_file():
        return torch.load(cache_path)
    images, _ = load_idx(find_fashion_mnist_dir(settings.fashion_mnist_dir or None), split="train")
    transform = transforms.Compose([
        transforms.Resize(settings.image_size),
        transforms.ToTensor(),
        transforms.Normalize((0.5,), (0.5,)),
    ])
    transformed = torch.stack([transform(Image.fromarray(image)) for image in images])
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(transformed, cache_path)
    return transformed


def train_classic(settings: FidSettings) -> dict:
    """Train the classic recipe for settings.steps steps and score its generator."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.reference import ReferenceTrainer, endless_batches

    images = classic_images(settings)
    # The shuffle order comes from the loader's own generator, as with worker processes.
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)),
                        batch_size=settings.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(settings.seed))
    trainer = ReferenceTrainer(settings.reference_settings())
    batches = endless_batches(loader)
    started, started_cpu = time.perf_counter(), time.process_time()
    for _ in range(settings.steps):
        d_loss, g_loss = trainer.step(next(batches))
    train_s = time.perf_counter() - started
    train_cpu_s = time.process_time() - started_cpu

    evaluator = fid_evaluator(settings)
    result = score_generator(evaluator, trainer.generator)
    result.update(train_s=train_s, train_cpu_s=train_cpu_s, final_losses=[float(d_loss), float(g_loss)],
                  precision="32-true",
                  real_pipeline_fid=real_pipeline_fid(evaluator, images, settings))
    return result


def real_pipeline_fid(evaluator, images, settings: FidSettings) -> float:
    """Return the FID of real training images through the classic transforms against the val/fid statistics.

    The classic pipeline upsamples 28 -> 32 with PIL's bilinear filter and the project's decoder with
    an antialiased bicubic one, so this is the floor of the classic recipe's FID.
    """
    import numpy as np
    import torch

    order = torch.from_numpy(np.random.default_rng(settings.seed).permutation(len(images))[: settings.num_samples])
    position = 0

    def real_images(count: int) -> torch.Tensor:
        nonlocal position
        batch = images[order[position : position + count]]
        position += count
        return batch

    scores = evaluator.score(real_images)
    return scores["fid"]


# The project's default recipe ------------------------------------------------------------------

def project_command(settings: FidSettings, run_id: str) -> list[str]:
    """Return the train.py command of the project's recipe; only the net shape and schedules are set."""
    work_dir = Path(settings.work_dir)
    return [
        sys.executable, "train.py",
        "experiment=fashion_mnist",
        "logger=none",
        "metrics=fid",
        f"metrics.eval_every_n_steps={settings.steps}",
        f"metrics.num_samples={settings.num_samples}",
        f"trainer.max_steps={settings.steps}",
        f"run.seed={settings.seed}",
        f"run.id={run_id}",
        f"run.output={work_dir / 'outputs'}",
        f"run.checkpoint_every_n_steps={settings.steps}",
        f"run.sample_every_n_steps={settings.steps}",
        f"data.cache_dir={work_dir / 'cache'}",
        *([f"data.source={settings.fashion_mnist_dir}"] if settings.fashion_mnist_dir else []),
        f"data.image_size={settings.image_size}",
        f"data.batch_size={settings.batch_size}",
        f"model.generator_features={settings.generator_features}",
        f"model.discriminator_features={settings.discriminator_features}",
        f"model.latent_dim={settings.latent_dim}",
        f"model.lr={settings.lr}",
        f"model.beta1={settings.beta1}",
        f"model.beta2={settings.beta2}",
        *settings.project_overrides,
    ]


def train_project(settings: FidSettings) -> dict:
    """Run train.py for settings.steps steps, then re-score its final checkpoint as the classic one is scored."""
    from fashion_gan.sampling import load_generator

    run_id = f"fid-project-{settings.seed}-{os.getpid()}"
    command = project_command(settings, run_id)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True,
                               env={**os.environ, "WANDB_MODE": "disabled"})
    wall_s = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"train.py failed with exit code {completed.returncode}:\n{completed.stderr[-4000:]}")
    run_dir = Path(settings.work_dir) / "outputs" / "runs" / run_id
    summary = json.loads((run_dir / "summary.json").read_text())

    result = score_generator(fid_evaluator(settings), load_generator(run_dir / "checkpoints" / "last.ckpt"))
    result.update(
        train_s=summary.get("train_wall_time_s", wall_s),
        # The whole train.py process: start-up, data, training, the FID evaluation and the checkpoint.
        process_cpu_s=children.ru_utime + children.ru_stime,
        final_losses=summary.get("final_losses"),
        precision=summary.get("precision"),
        logged_val_fid=summary.get("val_fid"),
        logged_val_class_coverage=summary.get("val_class_coverage"),
        command="python " + " ".join(command[1:]),
    )
    return result


# The harness side --------------------------------------------------------------------------------

def bench_fid(settings: FidSettings, seeds: list[int]) -> dict:
    """Train and score both recipes once per seed, alternating which goes first; return all scores."""
    from benchmarks.common import load_average

    started = time.perf_counter()
    context = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": load_average()}
    log.info("fid: preparing the decoded array and the real statistics in %s", settings.work_dir)
    fid_evaluator(settings)  # builds both caches once, before the children read them
    runs = []
    for index, seed in enumerate(seeds):
        seeded = FidSettings.from_json(settings.to_json())
        seeded.seed = seed
        order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]
        run = {"seed": seed}
        for variant in order:
            log.info("fid: %s recipe, seed %d, %d steps", variant, seed, settings.steps)
            run[variant] = run_child("fid_recipe", seeded, variant, timeout_s=3600)
        runs.append(run)
    context.update(load_after=load_average(), duration_s=time.perf_counter() - started)
    return {"settings": asdict(settings), "runs": runs, "summary": summarize_runs(runs), "context": context}


def summarize_runs(runs: list[dict]) -> dict:
    """Return the mean FID and class coverage of each recipe, and on how many seeds the project's FID was lower."""
    summary = {}
    for variant in VARIANTS:
        summary[variant] = {
            "fid_mean": statistics.fmean(run[variant]["fid"] for run in runs),
            "class_coverage_mean": statistics.fmean(run[variant]["class_coverage"] for run in runs),
        }
    summary["project_lower_on"] = sum(run["project"]["fid"] < run["classic"]["fid"] for run in runs)
    summary["seeds"] = len(runs)
    return summary


def main(argv: list[str]) -> None:
    arguments = child_parser(__doc__.splitlines()[0]).parse_args(argv)
    settings = FidSettings.from_json(arguments.settings)
    if arguments.variant == "classic":
        result = train_classic(settings)
    elif arguments.variant == "project":
        result = train_project(settings)
    else:
        raise SystemExit(f"unknown variant {arguments.variant!r}; use one of {', '.join(VARIANTS)}")
    write_result(arguments.result, result)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    main(sys.argv[1:])
