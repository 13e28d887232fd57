"""Tests of the Generator and Discriminator networks and the sampling helpers."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fashion_gan import sampling
from fashion_gan.errors import ConfigError
from fashion_gan.models import ALLOWED_IMAGE_SIZES, Discriminator, Generator

ALL_SHAPES = [(size, channels) for size in ALLOWED_IMAGE_SIZES for channels in (1, 3)]


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Run on one intra-op thread, because these tiny models gain nothing from more.

    On a CPU shared with other processes, extra OpenMP threads spin-wait and slow every step down.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_generator(image_size: int = 32, channels: int = 1) -> Generator:
    return Generator(latent_dim=16, generator_features=8, channels=channels, image_size=image_size)


@pytest.mark.parametrize(("image_size", "channels"), ALL_SHAPES)
def test_generator_output_shape_and_range(image_size, channels):
    generator = small_generator(image_size, channels)
    images = generator(torch.randn(2, 16))
    assert images.shape == (2, channels, image_size, image_size)
    assert images.min() >= -1.0
    assert images.max() <= 1.0


@pytest.mark.parametrize(("image_size", "channels"), ALL_SHAPES)
def test_discriminator_returns_one_logit_per_image(image_size, channels):
    discriminator = Discriminator(discriminator_features=8, channels=channels, image_size=image_size, dropout=0.1)
    logits = discriminator(torch.rand(2, channels, image_size, image_size) * 2 - 1)
    assert logits.shape == (2,)


@pytest.mark.parametrize("image_size", [48, 60, 0, 512, 8, True])
def test_unsupported_image_size_rejected(image_size):
    for build in (
        lambda: Generator(latent_dim=4, generator_features=4, channels=1, image_size=image_size),
        lambda: Discriminator(discriminator_features=4, channels=1, image_size=image_size, dropout=0.0),
    ):
        with pytest.raises(ConfigError) as error:
            build()
        message = str(error.value)
        assert f"image_size={image_size!r}" in message
        assert "16, 32, 64, 128, 256" in message


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_unsupported_channels_rejected(channels):
    with pytest.raises(ConfigError, match=f"channels={channels}"):
        Generator(latent_dim=4, generator_features=4, channels=channels, image_size=16)
    with pytest.raises(ConfigError, match=f"channels={channels}"):
        Discriminator(discriminator_features=4, channels=channels, image_size=16, dropout=0.0)


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_discriminator_dropout_out_of_range_rejected(dropout):
    with pytest.raises(ConfigError, match="dropout"):
        Discriminator(discriminator_features=4, channels=1, image_size=16, dropout=dropout)


def test_generator_rejects_zero_features():
    with pytest.raises(ConfigError, match="generator_features=0"):
        Generator(latent_dim=4, generator_features=0, channels=1, image_size=16)


def test_dropout_follows_each_leaky_relu():
    discriminator = Discriminator(discriminator_features=4, channels=1, image_size=64, dropout=0.3)
    layers = list(discriminator.modules())
    relu_positions = [i for i, layer in enumerate(layers) if isinstance(layer, nn.LeakyReLU)]
    assert len(relu_positions) == 4  # 64 -> 32 -> 16 -> 8 -> 4
    for position in relu_positions:
        assert isinstance(layers[position + 1], nn.Dropout)
        assert layers[position + 1].p == 0.3


def test_zero_dropout_adds_no_dropout_layer():
    discriminator = Discriminator(discriminator_features=4, channels=1, image_size=64, dropout=0.0)
    assert not any(isinstance(layer, nn.Dropout) for layer in discriminator.modules())


def test_64px_widths_follow_dcgan_pattern():
    generator = Generator(latent_dim=100, generator_features=64, channels=3, image_size=64)
    generator_widths = [
        layer.out_channels for layer in generator.modules() if isinstance(layer, nn.ConvTranspose2d)
    ]
    assert generator_widths == [512, 256, 128, 64, 3]
    discriminator = Discriminator(discriminator_features=64, channels=3, image_size=64, dropout=0.0)
    discriminator_widths = [
        layer.out_channels for layer in discriminator.modules() if isinstance(layer, nn.Conv2d)
    ]
    assert discriminator_widths == [64, 128, 256, 512, 1]


def test_256px_widths_capped_at_eight_times_features():
    generator = Generator(latent_dim=100, generator_features=8, channels=1, image_size=256)
    widths = [layer.out_channels for layer in generator.modules() if isinstance(layer, nn.ConvTranspose2d)]
    assert widths == [64, 64, 64, 32, 16, 8, 1]


def test_weight_init_statistics():
    torch.manual_seed(0)
    generator = Generator(latent_dim=100, generator_features=64, channels=3, image_size=64)
    discriminator = Discriminator(discriminator_features=64, channels=3, image_size=64, dropout=0.0)
    conv_weights = torch.cat(
        [
            layer.weight.detach().flatten()
            for network in (generator, discriminator)
            for layer in network.modules()
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))
        ]
    )
    assert conv_weights.mean().abs() < 1e-3
    assert conv_weights.std().item() == pytest.approx(0.02, rel=0.02)

    norms = [
        layer
        for network in (generator, discriminator)
        for layer in network.modules()
        if isinstance(layer, nn.BatchNorm2d)
    ]
    norm_weights = torch.cat([layer.weight.detach() for layer in norms])
    norm_biases = torch.cat([layer.bias.detach() for layer in norms])
    assert norm_weights.mean().item() == pytest.approx(1.0, abs=0.005)
    assert norm_weights.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.count_nonzero(norm_biases) == 0


def test_sample_grid_is_uint8_and_repeatable():
    generator = small_generator(image_size=16, channels=1)
    grid = sampling.sample_grid(generator, n=6, seed=3)
    assert grid.dtype == torch.uint8
    # 6 images -> 3 per row, 2 rows, with 2 pixels of padding around each 16x16 image.
    assert grid.shape == (3, 2 * 18 + 2, 3 * 18 + 2)
    assert torch.equal(grid, sampling.sample_grid(generator, n=6, seed=3))
    assert not torch.equal(grid, sampling.sample_grid(generator, n=6, seed=4))


def test_sample_grid_leaves_training_mode():
    generator = small_generator(image_size=16)
    generator.train()
    sampling.sample_grid(generator, n=2, seed=0)
    assert generator.training


def test_save_grid_png_writes_expected_size(tmp_path):
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    path = sampling.save_grid_png(images, tmp_path / "nested" / "grid.png", nrow=5)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (5 * 18 + 2, 18 + 2)


def test_save_grid_png_keeps_uint8_grid_pixels(tmp_path):
    grid = sampling.sample_grid(small_generator(image_size=16, channels=3), n=4, seed=0)
    path = sampling.save_grid_png(grid, tmp_path / "grid.png")
    with Image.open(path) as image:
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(pixels, grid)


@pytest.mark.parametrize("spherical", [True, False])
def test_interpolation_strip_ends_at_drawn_points(spherical):
    generator = small_generator(image_size=16)
    strip = sampling.interpolation_strip(generator, steps=5, seed=7, spherical=spherical)
    assert strip.shape == (5, 1, 16, 16)
    start, end = sampling.draw_noise(generator, 2, seed=7)
    endpoints = sampling.generate(generator, torch.stack([start, end]))
    assert torch.allclose(strip[0], endpoints[0], atol=1e-5)
    assert torch.allclose(strip[-1], endpoints[1], atol=1e-5)


def test_slerp_keeps_norm_of_equal_norm_vectors():
    start = torch.tensor([3.0, 0.0])
    end = torch.tensor([0.0, 3.0])
    path = sampling.slerp(start, end, torch.linspace(0, 1, 7).unsqueeze(1))
    assert torch.allclose(path.norm(dim=1), torch.full((7,), 3.0))
    assert torch.allclose(torch.lerp(start, end, 0.5).norm(), torch.tensor(3.0 / 2**0.5))


def test_interpolation_strip_needs_two_steps():
    with pytest.raises(ConfigError, match="steps=1"):
        sampling.interpolation_strip(small_generator(image_size=16), steps=1, seed=0)


def test_timelapse_gif_has_one_frame_per_png(tmp_path):
    generator = small_generator(image_size=16)
    paths = [
        sampling.save_grid_png(sampling.sample_grid(generator, 4, seed), tmp_path / f"step_{seed}.png")
        for seed in range(3)
    ]
    gif_path = sampling.write_timelapse_gif(paths, tmp_path / "timelapse.gif", duration_ms=150)
    with Image.open(gif_path) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 3
        assert gif.info["duration"] == 150
        assert gif.info["loop"] == 0


def test_timelapse_gif_without_frames_rejected(tmp_path):
    with pytest.raises(ConfigError, match="no PNG files"):
        sampling.write_timelapse_gif([], tmp_path / "empty.gif")
