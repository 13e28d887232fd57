"""Tests for the step-deterministic batch stream and the Lightning data module around it."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from fashion_gan.data.cache import DecodedArray
from fashion_gan.data.datamodule import DecodedArrayDataModule, StepBatchStream, batch_indices
from fashion_gan.errors import DatasetError

NUM_IMAGES = 50
BATCH_SIZE = 8


def make_decoded(num_images: int = NUM_IMAGES) -> DecodedArray:
    # Every pixel of image i equals i (mod 256), so a batch shows which images it contains.
    values = np.arange(num_images, dtype=np.uint8)
    array = np.broadcast_to(values[:, None, None, None], (num_images, 1, 4, 4)).copy()
    return DecodedArray(
        array=array, content_digest="test", skipped_files=[], cache_path=Path("unused.npy"), reused=False
    )


def fake_trainer(
    global_step: int = 0, rank: int = 0, world_size: int = 1, device: str = "cpu"
) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=global_step,
        global_rank=rank,
        world_size=world_size,
        strategy=SimpleNamespace(root_device=torch.device(device)),
    )


def image_ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0, 0, 0].tolist()


def test_batch_indices_are_sorted_and_unique() -> None:
    indices = batch_indices(3, seed=7, num_items=NUM_IMAGES, batch_size=BATCH_SIZE)

    assert len(indices) == BATCH_SIZE
    assert list(indices) == sorted(set(indices.tolist()))
    assert indices.max() < NUM_IMAGES


def test_batch_indices_depend_on_seed_and_step() -> None:
    same = batch_indices(3, seed=7, num_items=NUM_IMAGES, batch_size=BATCH_SIZE)
    again = batch_indices(3, seed=7, num_items=NUM_IMAGES, batch_size=BATCH_SIZE)
    other_seed = batch_indices(3, seed=8, num_items=NUM_IMAGES, batch_size=BATCH_SIZE)
    other_step = batch_indices(4, seed=7, num_items=NUM_IMAGES, batch_size=BATCH_SIZE)

    np.testing.assert_array_equal(same, again)
    assert not np.array_equal(same, other_seed)
    assert not np.array_equal(same, other_step)


def test_epoch_covers_each_image_once() -> None:
    steps_per_epoch = NUM_IMAGES // BATCH_SIZE  # 6 steps, the last 2 images are dropped
    batches = [
        batch_indices(step, seed=1, num_items=NUM_IMAGES, batch_size=BATCH_SIZE)
        for step in range(2 * steps_per_epoch)
    ]
    epoch_0 = np.concatenate(batches[:steps_per_epoch])
    epoch_1 = np.concatenate(batches[steps_per_epoch:])

    assert len(set(epoch_0.tolist())) == steps_per_epoch * BATCH_SIZE
    assert len(set(epoch_1.tolist())) == steps_per_epoch * BATCH_SIZE
    assert not np.array_equal(epoch_0, epoch_1)  # each epoch has its own shuffle


def test_ranks_get_disjoint_batches() -> None:
    world_size = 2
    steps_per_epoch = NUM_IMAGES // (BATCH_SIZE * world_size)  # 3
    seen_by_rank = []
    for rank in range(world_size):
        indices = [
            batch_indices(
                step, seed=5, num_items=NUM_IMAGES, batch_size=BATCH_SIZE, rank=rank, world_size=world_size
            )
            for step in range(steps_per_epoch)
        ]
        seen_by_rank.append(set(np.concatenate(indices).tolist()))

    assert len(seen_by_rank[0]) == steps_per_epoch * BATCH_SIZE
    assert len(seen_by_rank[1]) == steps_per_epoch * BATCH_SIZE
    assert seen_by_rank[0].isdisjoint(seen_by_rank[1])


def test_resumed_stream_matches_continuous() -> None:
    array = make_decoded().array
    continuous_stream = StepBatchStream(array, BATCH_SIZE, seed=3)
    resumed_stream = StepBatchStream(array, BATCH_SIZE, seed=3, start_step=13)

    continuous = [image_ids(batch) for batch in islice(continuous_stream, 20)]
    resumed = [image_ids(batch) for batch in islice(resumed_stream, 7)]

    assert resumed == continuous[13:]


def test_stream_batches_hold_indexed_images() -> None:
    array = make_decoded().array
    stream = StepBatchStream(array, BATCH_SIZE, seed=3, rank=1, world_size=2)

    batch = stream.batch_at(4)

    expected = batch_indices(4, seed=3, num_items=NUM_IMAGES, batch_size=BATCH_SIZE, rank=1, world_size=2)
    assert batch.dtype == torch.uint8
    assert batch.shape == (BATCH_SIZE, 1, 4, 4)
    assert image_ids(batch) == expected.tolist()


def test_datamodule_starts_at_trainer_step() -> None:
    module = DecodedArrayDataModule(make_decoded(), BATCH_SIZE, seed=11)
    module.trainer = fake_trainer(global_step=0)
    continuous = [image_ids(batch) for batch in islice(module.train_dataloader(), 10)]

    module.trainer = fake_trainer(global_step=6)
    resumed = [image_ids(batch) for batch in islice(module.train_dataloader(), 4)]

    assert resumed == continuous[6:]


def test_datamodule_loader_settings() -> None:
    module = DecodedArrayDataModule(make_decoded(), BATCH_SIZE, seed=0)
    module.trainer = fake_trainer(rank=1, world_size=2)

    loader = module.train_dataloader()

    assert loader.batch_size is None
    assert loader.num_workers == 0
    assert loader.pin_memory is False
    assert loader.dataset.rank == 1
    assert loader.dataset.world_size == 2
    assert module.steps_per_epoch == NUM_IMAGES // (BATCH_SIZE * 2)
    assert len(module) == NUM_IMAGES


def test_datamodule_pins_memory_for_cuda() -> None:
    module = DecodedArrayDataModule(make_decoded(), BATCH_SIZE, seed=0)
    module.trainer = fake_trainer(device="cuda:0")

    assert module.train_dataloader().pin_memory is True


@pytest.mark.gpu
def test_pinned_batches_reach_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    module = DecodedArrayDataModule(make_decoded(), BATCH_SIZE, seed=0)
    module.trainer = fake_trainer(device="cuda:0")

    batch = next(iter(module.train_dataloader()))

    assert batch.is_pinned()
    on_gpu = batch.to("cuda:0", non_blocking=True)
    assert image_ids(on_gpu.cpu()) == image_ids(batch)


def test_datamodule_copies_small_memmap(tmp_path: Path) -> None:
    path = tmp_path / "array.npy"
    np.save(path, make_decoded().array)
    decoded = make_decoded()
    decoded.array = np.load(path, mmap_mode="r")

    in_memory = DecodedArrayDataModule(decoded, BATCH_SIZE, seed=0).train_array()
    mapped = DecodedArrayDataModule(decoded, BATCH_SIZE, seed=0, max_in_memory_bytes=10).train_array()

    assert not isinstance(in_memory, np.memmap)
    assert isinstance(mapped, np.memmap)


@pytest.mark.parametrize("max_in_memory_bytes", [None, 10])
def test_batches_match_array_in_either_layout(tmp_path: Path, max_in_memory_bytes: int | None) -> None:
    path = tmp_path / "array.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, size=(NUM_IMAGES, 3, 4, 5), dtype=np.uint8))
    decoded = make_decoded()
    decoded.array = np.load(path, mmap_mode="r")
    limit = {} if max_in_memory_bytes is None else {"max_in_memory_bytes": max_in_memory_bytes}
    module = DecodedArrayDataModule(decoded, BATCH_SIZE, seed=5, **limit)

    batches = list(islice(iter(module.train_dataloader()), 3))

    for step, batch in enumerate(batches):
        indices = batch_indices(step, seed=5, num_items=NUM_IMAGES, batch_size=BATCH_SIZE)
        assert batch.shape == (BATCH_SIZE, 3, 4, 5)
        assert torch.equal(batch, torch.from_numpy(np.asarray(decoded.array)[indices]))
        # The RAM copy serves channels_last views; the memory map serves (B, C, H, W) batches as stored.
        assert batch.is_contiguous(memory_format=torch.channels_last) is (max_in_memory_bytes is None)


def test_too_few_images_raise_dataset_error() -> None:
    module = DecodedArrayDataModule(make_decoded(num_images=10), 8, seed=0)
    module.trainer = fake_trainer(world_size=2)

    with pytest.raises(DatasetError, match="fewer than one global batch"):
        module.train_dataloader()


class BatchRecorder(pl.LightningModule):
    """Records the image ids of every training batch. Each batch is one optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(image_ids(batch))
        return (self.weight - batch.float().mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_steps(max_steps: int, root: Path, ckpt_path: Path | None = None) -> tuple[pl.Trainer, BatchRecorder]:
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    model = BatchRecorder()
    datamodule = DecodedArrayDataModule(make_decoded(), BATCH_SIZE, seed=21)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, model


def test_lightning_resume_continues_batches(tmp_path: Path) -> None:
    _, continuous = fit_steps(8, tmp_path / "continuous")
    first_trainer, first_half = fit_steps(3, tmp_path / "first")
    checkpoint = tmp_path / "step3.ckpt"
    first_trainer.save_checkpoint(checkpoint)

    resumed_trainer, second_half = fit_steps(8, tmp_path / "resumed", ckpt_path=checkpoint)

    assert len(continuous.seen) == 8
    assert first_half.seen == continuous.seen[:3]
    assert second_half.seen == continuous.seen[3:]
    assert resumed_trainer.global_step == 8
