"""Generate images from a trained generator: sample grids, latent interpolations and timelapse GIFs."""

import logging
import math
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from fashion_gan.errors import ConfigError
from fashion_gan.models.generator import Generator

log = logging.getLogger(__name__)

GENERATOR_HPARAMS = ("latent_dim", "generator_features", "channels", "image_size")
GENERATOR_STATE_PREFIX = "generator."
EMA_GENERATOR_STATE_PREFIX = "generator_ema."
GRID_PADDING = 2


def load_generator(checkpoint_path: str | Path) -> Generator:
    """Load the generator of a DCGAN Lightning checkpoint onto the CPU, in eval mode.

    The network is rebuilt from the checkpoint's hyperparameters and its weights: the EMA generator's
    (`generator_ema.*`) when the run kept one (model.ema_decay > 0), else the trained generator's.
    Raises ConfigError when the file is missing or is not a DCGAN checkpoint.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}. Pass the path of a .ckpt file written by training.")
    try:
        # weights_only=True unpickles tensors and plain containers only, so a crafted file cannot run code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise ConfigError(
            f"failed to read checkpoint {path}: {err}. Pass a .ckpt file written by training."
        ) from err

    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    missing = [name for name in GENERATOR_HPARAMS if name not in hparams]
    if missing or "state_dict" not in checkpoint:
        raise ConfigError(
            f"{path} is not a DCGAN checkpoint: it lacks the state_dict or the hyperparameters "
            f"{', '.join(missing) or '(none missing)'}. Pass a .ckpt file written by training."
        )
    generator = Generator(**{name: hparams[name] for name in GENERATOR_HPARAMS})
    has_ema = any(key.startswith(EMA_GENERATOR_STATE_PREFIX) for key in checkpoint["state_dict"])
    prefix = EMA_GENERATOR_STATE_PREFIX if has_ema else GENERATOR_STATE_PREFIX
    state = {
        key.removeprefix(prefix): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }
    generator.load_state_dict(state)
    generator.eval()
    log.info("loaded a %dx%d %sgenerator from %s", generator.image_size, generator.image_size,
             "EMA " if has_ema else "", path)
    return generator


def draw_noise(generator: Generator, count: int, seed: int) -> torch.Tensor:
    """Draw `count` standard normal latent vectors on the CPU from `seed`, shape (count, latent_dim)."""
    rng = torch.Generator().manual_seed(seed)
    return torch.randn(count, generator.latent_dim, generator=rng)


@torch.no_grad()
def generate(generator: Generator, noise: torch.Tensor) -> torch.Tensor:
    """Run the generator in eval mode on `noise` and return float images in [-1, 1] on the CPU."""
    was_training = generator.training
    generator.eval()
    try:
        device = next(generator.parameters()).device
        return generator(noise.to(device)).float().cpu()
    finally:
        generator.train(was_training)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Convert float images in [-1, 1] to uint8 in [0, 255], clamping values outside the range."""
    return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def sample_grid(generator: Generator, n: int, seed: int, nrow: int | None = None) -> torch.Tensor:
    """Generate `n` images from `seed` and tile them; return a uint8 grid of shape (3, H, W).

    `nrow` images go in each row; the default makes the grid close to square.
    """
    if n < 1:
        raise ConfigError(f"n={n!r} is invalid: a sample grid needs at least one image.")
    images = generate(generator, draw_noise(generator, n, seed))
    grid = make_grid(images, nrow=nrow or math.ceil(math.sqrt(n)), padding=GRID_PADDING, pad_value=-1.0)
    return to_uint8(grid)


def save_grid_png(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write images as one PNG grid, `nrow` images per row; return the path.

    `images` is a batch (B, C, H, W) of floats in [-1, 1] or of uint8, or a single uint8 image or
    grid (C, H, W) such as sample_grid returns. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.dtype == torch.uint8:
        scaled = images.float() / 255.0
    else:
        scaled = (images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0
    if scaled.ndim == 3:
        scaled = scaled.unsqueeze(0)
    save_image(scaled.cpu(), path, nrow=nrow, padding=GRID_PADDING, format="png")
    return path


def slerp(start: torch.Tensor, end: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Interpolate along the great circle between two latent vectors; fraction has shape (steps, 1).

    Falls back to linear interpolation when the vectors are (anti)parallel, where the circle is undefined.
    """
    cos_angle = torch.dot(start / start.norm(), end / end.norm()).clamp(-1.0, 1.0)
    angle = torch.acos(cos_angle)
    if torch.sin(angle).abs() < 1e-6:
        return torch.lerp(start, end, fraction)
    return (torch.sin((1.0 - fraction) * angle) * start + torch.sin(fraction * angle) * end) / torch.sin(angle)


def interpolation_strip(generator: Generator, steps: int, seed: int, spherical: bool = True) -> torch.Tensor:
    """Generate `steps` images between two latent points drawn from `seed`, floats in [-1, 1].

    Spherical interpolation (the default) keeps intermediate vectors at the norm typical of
    Gaussian noise; linear interpolation passes closer to the origin. Returns (steps, C, H, W).
    """
    if steps < 2:
        raise ConfigError(f"steps={steps!r} is invalid: an interpolation needs at least 2 images.")
    start, end = draw_noise(generator, 2, seed)
    fraction = torch.linspace(0.0, 1.0, steps).unsqueeze(1)
    noise = slerp(start, end, fraction) if spherical else torch.lerp(start, end, fraction)
    return generate(generator, noise)


def write_timelapse_gif(png_paths: Sequence[str | Path], out_path: str | Path, duration_ms: int = 200) -> Path:
    """Write the PNG files, in the given order, as frames of a looping GIF; return its path.

    `duration_ms` is how long each frame is shown. Frames of different sizes are resized to the
    size of the first.
    """
    if not png_paths:
        raise ConfigError("no PNG files given for the timelapse GIF: pass at least one sample grid.")
    if duration_ms < 1:
        raise ConfigError(
            f"duration_ms={duration_ms!r} is invalid: use a positive frame duration in milliseconds."
        )
    frames = []
    for png_path in png_paths:
        with Image.open(png_path) as image:
            frames.append(image.convert("RGB"))
    size = frames[0].size
    frames = [frame if frame.size == size else frame.resize(size) for frame in frames]

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(out_path, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    log.info("wrote a %d-frame timelapse to %s", len(frames), out_path)
    return out_path
