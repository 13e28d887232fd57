"""Tests for BackgroundCheckpointIO: checkpoints written on a background thread from a snapshot."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.serialization import config as serialization_config

from fashion_gan.callbacks.checkpoints import BackgroundCheckpointIO, _require_finite_weights
from fashion_gan.errors import StorageError, TrainingDivergedError


def test_checkpoint_keeps_save_time_values(tmp_path: Path) -> None:
    weights = torch.arange(6, dtype=torch.float32)
    checkpoint = {"state_dict": {"layer.weight": weights}, "global_step": 3, "nested": [weights[:2]]}
    writer = BackgroundCheckpointIO()
    written = threading.Event()
    path = tmp_path / "step.ckpt"
    writer.expect(path, then=written.set, on_error=lambda error: StorageError(str(error)))

    writer.save_checkpoint(checkpoint, path)
    # The training step goes on updating the weights in place while the writer thread works.
    weights.add_(100.0)
    writer.wait()

    assert written.is_set()
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["layer.weight"], torch.arange(6, dtype=torch.float32))
    assert torch.equal(loaded["nested"][0], torch.tensor([0.0, 1.0]))
    assert loaded["global_step"] == 3
    # The writer skips the zip CRC32 only while it writes, so other torch.save calls keep it.
    assert serialization_config.save.compute_crc32 is True
    writer.teardown()



def save_and_load(writer: BackgroundCheckpointIO, checkpoint: dict, path: Path) -> dict:
    writer.save_checkpoint(checkpoint, path)
    writer.wait()
    return torch.load(path, weights_only=True)


def test_second_snapshot_reuses_buffers(tmp_path: Path) -> None:
    weights = torch.randn(8, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    writer = BackgroundCheckpointIO()

    first = save_and_load(writer, {"weight": weights, "step": 1}, tmp_path / "first.ckpt")
    first_buffer_address = writer._snapshot_buffers[0].data_ptr()
    weights.mul_(2.0)
    second = save_and_load(writer, {"weight": weights, "step": 2}, tmp_path / "second.ckpt")

    assert writer._snapshot_buffers[0].data_ptr() == first_buffer_address
    assert torch.equal(second["weight"], weights)
    assert torch.equal(first["weight"] * 2.0, weights)
    assert second["weight"].stride() == weights.stride()
    writer.teardown()
    assert writer._snapshot_buffers == []


def test_snapshot_after_shape_change_copies_values(tmp_path: Path) -> None:
    writer = BackgroundCheckpointIO()
    save_and_load(writer, {"a": torch.zeros(4), "b": torch.zeros(2, 2)}, tmp_path / "first.ckpt")

    grown, strided = torch.arange(6.0), torch.arange(10.0)[::2]
    loaded = save_and_load(writer, {"a": grown, "b": strided, "c": torch.ones(3)}, tmp_path / "second.ckpt")

    assert torch.equal(loaded["a"], torch.arange(6.0))
    assert torch.equal(loaded["b"], torch.tensor([0.0, 2.0, 4.0, 6.0, 8.0]))
    assert torch.equal(loaded["c"], torch.ones(3))
    writer.teardown()

def test_failed_write_raises_at_wait(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should be")
    path = blocker / "step.ckpt"
    writer = BackgroundCheckpointIO()
    seen_errors: list[OSError] = []
    finished: list[bool] = []

    def on_error(error: OSError) -> Exception:
        seen_errors.append(error)
        return StorageError(f"could not write {path}")

    writer.expect(path, then=lambda: finished.append(True), on_error=on_error)
    writer.save_checkpoint({"global_step": 1}, path)

    with pytest.raises(StorageError, match="could not write"):
        writer.wait()
    assert finished == []
    assert len(seen_errors) == 1
    assert seen_errors[0].errno in (errno.ENOTDIR, errno.EEXIST)
    # The error is reported once; the writer then accepts the next checkpoint.
    writer.wait()
    good_path = tmp_path / "next.ckpt"
    writer.save_checkpoint({"global_step": 2}, good_path)
    writer.teardown()
    assert torch.load(good_path, weights_only=True)["global_step"] == 2


def two_layer_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_weight_check_names_bad_parameter(bad_value: float) -> None:
    model = two_layer_model()
    _require_finite_weights(model, step=7)  # finite weights pass

    with torch.no_grad():
        model[1].bias[1] = bad_value
    with pytest.raises(TrainingDivergedError, match=r"Parameter '1\.bias' is NaN or infinite at step 7"):
        _require_finite_weights(model, step=7)


def test_weight_check_rejects_norm_overflow() -> None:
    model = two_layer_model()
    with torch.no_grad():
        model[0].weight.fill_(1e30)  # finite, but its square is not

    with pytest.raises(TrainingDivergedError, match="The weights' norm overflows float32 at step 3"):
        _require_finite_weights(model, step=3)


def test_snapshot_keeps_changed_strides(tmp_path: Path) -> None:
    writer = BackgroundCheckpointIO()
    save_and_load(writer, {"weight": torch.zeros(2, 3, 4, 4)}, tmp_path / "first.ckpt")

    channels_last = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    loaded = save_and_load(writer, {"weight": channels_last}, tmp_path / "second.ckpt")

    assert loaded["weight"].stride() == channels_last.stride()
    assert torch.equal(loaded["weight"], channels_last)
    writer.teardown()
