"""DCGAN-style generator and discriminator (critic) for 28x28 and 32x32 images.

The GAN, WGAN, WGAN-GP and SN-GAN all train on this kind of pair. Three transposed
convolutions grow a latent vector from ``image_size // 4`` pixels square to
``image_size`` (7 -> 14 -> 28 or 8 -> 16 -> 32); the discriminator mirrors it with
stride-2 convolutions and LeakyReLU(0.2) and ends in one raw score per image (no
sigmoid: the losses in :mod:`functorch_diary.training.gan` take scores). Weights start as DCGAN
(and the inpainting code's ``weights_init('gaussian')``) set them: N(0, 0.02) for convolutions,
N(1, 0.02) for BatchNorm scales, zero biases.

Normalisation in the discriminator is a choice per GAN: ``"batch"`` for the classic
DCGAN/WGAN, ``"none"`` for WGAN-GP (the penalty is per sample, which BatchNorm would
couple) and for SN-GAN (spectral norm does the job; wrap the model with
:func:`functorch_diary.model.reparam.spectral_norm`).

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models.dcgan import dcgan_discriminator, dcgan_generator
    >>> g, d = dcgan_generator(latent_dim=8, width=4, image_size=28), dcgan_discriminator(
    ...     width=4, image_size=28)
    >>> (gp, gs), (dp, ds) = g.init(seed=0), d.init(seed=1)
    >>> fake, _ = g.apply(gp, gs, torch.randn(2, 8))
    >>> tuple(fake.shape), tuple(d.apply(dp, ds, fake)[0].shape)
    ((2, 1, 28, 28), (2,))
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from ...model.core import Model

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "dcgan_discriminator", "dcgan_generator"]


def _check_size(image_size: int) -> int:
    if image_size % 4 != 0 or image_size < 8:
        raise ValueError(
            f"image_size must be a multiple of 4 and at least 8 (28, 32...), got {image_size}"
        )
    return image_size // 4


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN's ('gaussian') initialisation, module by module."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANGenerator(nn.Module):
    """Latent ``(N, latent_dim)`` -> images ``(N, channels, image_size, image_size)`` in (-1, 1).

    Args:
        latent_dim: length of the noise vector.
        channels: image channels (1 for the digits).
        width: feature maps of the last hidden layer (the first has twice as many).
        image_size: 28 or 32 (any multiple of 4 from 8).
    """

    def __init__(
        self, latent_dim: int = 100, channels: int = 1, width: int = 64, image_size: int = 32
    ):
        super().__init__()
        base = _check_size(image_size)
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 2 * width, base, 1, 0, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
            nn.Tanh(),
        )
        self.apply(_dcgan_init)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.reshape(z.shape[0], self.latent_dim, 1, 1))


class DCGANDiscriminator(nn.Module):
    """Images ``(N, channels, image_size, image_size)`` -> scores ``(N,)`` (no sigmoid).

    Args:
        channels: image channels.
        width: feature maps of the first convolution (the second has twice as many).
        image_size: 28 or 32 (any multiple of 4 from 8).
        norm: ``"batch"`` (BatchNorm after the second convolution) or ``"none"``.
    """

    def __init__(
        self, channels: int = 1, width: int = 64, image_size: int = 32, norm: str = "batch"
    ):
        super().__init__()
        base = _check_size(image_size)
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=norm == "none"),
            nn.BatchNorm2d(2 * width) if norm == "batch" else nn.Identity(),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, base, 1, 0),
        )
        self.apply(_dcgan_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten()


def dcgan_generator(
    latent_dim: int = 100, channels: int = 1, width: int = 64, image_size: int = 32
) -> Model:
    """The functional :class:`DCGANGenerator`."""
    return Model(partial(DCGANGenerator, latent_dim, channels, width, image_size))


def dcgan_discriminator(
    channels: int = 1, width: int = 64, image_size: int = 32, norm: str = "batch"
) -> Model:
    """The functional :class:`DCGANDiscriminator`; ``reparam.spectral_norm`` it for SN-GAN."""
    return Model(partial(DCGANDiscriminator, channels, width, image_size, norm))
