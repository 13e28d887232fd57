"""Child process of the input-pipeline benchmark: images/s delivered to the step, no training.

  project     DecodedArrayDataModule's loader over the decoded uint8 array, plus what the step
              does to a batch before the networks see it: float in [-1, 1], flip, channels_last
  reference   the classic DataLoader (ImageFolder, JPEG decoding and transforms in worker processes)

Each repeat builds a fresh loader, takes one batch as warm-up (worker start-up for the reference),
then times the next `batches` batches. The reference stays within its first epoch.
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks.common import BenchSettings, child_parser, write_result

# About 2 s per repeat. With 400 batches (0.3 to 0.5 s) the median rate moved between 51,000 and
# 91,000 images/s from one run of the harness to the next on the 2-core VM where this was built.
# NOTE: 2000 batches still moved between 59,000 and 99,000 within one run there; the host sets that.
PROJECT_BATCHES = 2000


def project_rate(settings: BenchSettings, decoded, batches: int) -> float:
    from fashion_gan.data.datamodule import DecodedArrayDataModule
    from fashion_gan.models.dcgan import prepare_real_batch

    datamodule = DecodedArrayDataModule(decoded, batch_size=settings.batch_size, seed=settings.seed)
    iterator = iter(datamodule.train_dataloader())
    generator = torch.Generator().manual_seed(settings.seed)
    next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        prepare_real_batch(next(iterator), generator, channels_last=True)
    return batches * settings.batch_size / (time.perf_counter() - started)


def reference_rate(settings: BenchSettings, batches: int) -> float:
    from benchmarks.reference import build_loader

    loader = build_loader(settings)
    iterator = iter(loader)
    next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
    rate = batches * settings.batch_size / (time.perf_counter() - started)
    del iterator, loader  # stops the worker processes
    return rate


def main(argv: list[str]) -> None:
    arguments = child_parser(__doc__.splitlines()[0]).parse_args(argv)
    settings = BenchSettings.from_json(arguments.settings)
    from pathlib import Path

    from fashion_gan.data.cache import load_decoded_array

    decoded = load_decoded_array(settings.data_dir, kind="image_folder", channels=settings.channels,
                                 image_size=settings.image_size, cache_dir=Path(settings.work_dir) / "cache" / "decoded",
                                 show_progress=False)
    # One epoch minus the warm-up batch, so the reference never waits for a new epoch's workers.
    reference_batches = max(1, len(decoded.array) // settings.batch_size - 1)
    project, reference = [], []
    for _ in range(settings.repeats):
        project.append(project_rate(settings, decoded, PROJECT_BATCHES))
        reference.append(reference_rate(settings, reference_batches))
    write_result(arguments.result, {"project": project, "reference": reference,
                                    "project_batches": PROJECT_BATCHES, "reference_batches": reference_batches})


if __name__ == "__main__":
    main(sys.argv[1:])
