"""GPU check: 200 steps at 64x64, batch 128, bf16-mixed, for the project and the reference.

Run by benchmarks/gpu_check.sh on a CUDA machine. It installs nothing. Without the clothing photos
(--data-dir) it writes 3,068 synthetic JPEG photos first, so the reference still decodes JPEGs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import DEFAULT_DATA_DIR, BenchSettings, images_per_s, run_child

SYNTHETIC_PHOTOS = 3068
SYNTHETIC_CLASSES = 10


def write_synthetic_photos(folder: Path) -> Path:
    """Write random 300x400 JPEGs in class folders, about the size of the clothing photos."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    for index in range(SYNTHETIC_PHOTOS):
        class_dir = folder / f"class_{index % SYNTHETIC_CLASSES}"
        class_dir.mkdir(parents=True, exist_ok=True)
        pixels = generator.integers(0, 256, size=(400, 300, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(class_dir / f"{index:05d}.jpg", quality=85)
    return folder


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reference-workers", type=int, default=int(os.environ.get("REFERENCE_WORKERS", 2)))
    arguments = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("No CUDA device is visible; run this on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="fashion-gan-gpu-check-") as work_dir:
        data_dir = Path(arguments.data_dir)
        if not data_dir.is_dir():
            print(f"{data_dir} not found: writing {SYNTHETIC_PHOTOS} synthetic JPEG photos instead", flush=True)
            data_dir = write_synthetic_photos(Path(work_dir) / "photos")
        settings = BenchSettings(data_dir=str(data_dir), work_dir=work_dir, batch_size=arguments.batch_size,
                                 warmup_steps=arguments.warmup_steps,
                                 measure_steps=arguments.steps - arguments.warmup_steps,
                                 reference_workers=arguments.reference_workers, device="cuda")
        rows = {}
        for variant in ("project", "reference"):
            # The project runs with its defaults: accelerator auto (the GPU) and precision auto (bf16-mixed).
            result = run_child("training", settings, variant, env={"WANDB_MODE": "disabled"})
            rows[variant] = {
                "images_per_s": round(images_per_s(result["step_end_times"], settings.warmup_steps,
                                                   settings.batch_size), 1),
                "precision": result.get("precision"),
                "peak_gpu_memory_mb": round(result.get("peak_gpu_memory_mb", 0.0)),
                "gpu": result.get("gpu"),
            }
            print(f"{variant}: {json.dumps(rows[variant])}", flush=True)
    ratio = rows["project"]["images_per_s"] / rows["reference"]["images_per_s"]
    print(f"project / reference: {ratio:.2f}x ({arguments.steps} steps, {arguments.warmup_steps} warm-up, "
          f"batch {arguments.batch_size}, 64x64)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
