"""The classic DCGAN recipe that the benchmarks compare against.

As in the PyTorch DCGAN example: torchvision `ImageFolder` with `Resize`, `CenterCrop`,
`ToTensor` and `Normalize`, a shuffling `DataLoader` with worker processes that decode every JPEG
again each epoch, and a plain PyTorch loop in float32 with the default (contiguous) memory
format. The generator, discriminator, batch size, image size, losses and optimizer settings are
the project's own (fashion_gan.models), so only the input pipeline and the training loop differ.
A random horizontal flip matches the project's `data.augment_flip=true`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks.common import BenchSettings


def build_loader(settings: BenchSettings) -> DataLoader:
    """Return the classic loader: decode, resize, crop, flip and normalise every photo in workers."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    transform = transforms.Compose([
        transforms.Resize(settings.image_size),
        transforms.CenterCrop(settings.image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.5,) * settings.channels, (0.5,) * settings.channels),
    ])
    dataset = ImageFolder(settings.data_dir, transform=transform)
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        num_workers=settings.reference_workers,
        drop_last=True,
        persistent_workers=settings.reference_workers > 0,
        generator=torch.Generator().manual_seed(settings.seed),
    )


def endless_batches(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Yield image batches epoch after epoch, dropping the labels."""
    while True:
        for images, _ in loader:
            yield images


class ReferenceTrainer:
    """One D update then one G update per step, in float32, as the PyTorch DCGAN example does them."""

    def __init__(self, settings: BenchSettings) -> None:
        from fashion_gan.models import Discriminator, Generator

        torch.manual_seed(settings.seed)
        self.settings = settings
        self.device = torch.device(settings.device)
        self.generator = Generator(settings.latent_dim, settings.generator_features, settings.channels,
                                   settings.image_size).to(self.device)
        self.discriminator = Discriminator(settings.discriminator_features, settings.channels,
                                           settings.image_size, settings.dropout).to(self.device)
        betas = (settings.beta1, settings.beta2)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=settings.lr, betas=betas)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=settings.lr,
                                                        betas=betas)

    def step(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one batch of images in [-1, 1]; return (d_loss, g_loss)."""
        real = real.to(self.device)
        noise = torch.randn(real.shape[0], self.settings.latent_dim, device=self.device)
        fake = self.generator(noise)

        # D: maximise log D(x) + log(1 - D(G(z))), with one-sided label smoothing on the real target.
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(
            real_logits, torch.full_like(real_logits, 1.0 - self.settings.label_smoothing)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        d_loss.backward()
        self.discriminator_optimizer.step()

        # G: maximise log D(G(z)). The D gradients this adds are cleared by the next D zero_grad.
        self.generator_optimizer.zero_grad(set_to_none=True)
        generated_logits = self.discriminator(fake)
        g_loss = F.binary_cross_entropy_with_logits(generated_logits, torch.ones_like(generated_logits))
        g_loss.backward()
        self.generator_optimizer.step()
        return d_loss.detach(), g_loss.detach()


def train(settings: BenchSettings, steps: int) -> dict:
    """Train the reference for `steps` steps; return the perf_counter time at the end of each step."""
    started_wall = time.time()
    loader = build_loader(settings)
    trainer = ReferenceTrainer(settings)
    step_end_times: list[float] = []
    first_step_wall = None
    batches = endless_batches(loader)
    for _ in range(steps):
        real = next(batches)
        d_loss, g_loss = trainer.step(real)
        if trainer.device.type == "cuda":
            # The classic example reads the losses with .item() every step, which also waits for the GPU.
            torch.cuda.synchronize(trainer.device)
        step_end_times.append(time.perf_counter())
        if first_step_wall is None:
            first_step_wall = time.time()
    return {
        "step_end_times": step_end_times,
        "first_step_wall": first_step_wall,
        "setup_started_wall": started_wall,
        "final_losses": [float(d_loss), float(g_loss)],
    }
