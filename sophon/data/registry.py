"""Domain registry: every image domain is a function that returns an `ImageSet` for a `DomainRequest`.

Loaders return native uint8 images (N×C×H×W); `load_domain` conforms them to the requested size and
channels in one place, so every domain of an experiment meets the model at the same shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from sophon.errors import unknown


@dataclass
class ImageSet:
    """Images as uint8 N×C×H×W, integer labels N, and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.int64)
        return ImageSet(self.images[index], self.labels[index], self.classes)


@dataclass(frozen=True)
class DomainRequest:
    """What a stage asks of a domain. `options` holds domain-specific settings (e.g. `n` for generated sets)."""

    split: str = "train"  # "train" or "test"
    size: int = 28
    channels: int = 3
    root: Path = Path("data/raw")
    download: bool = False
    seed: int = 0
    max_samples: int | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))  # config values arrive as strings

    def replace(self, **changes) -> "DomainRequest":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DomainSpec:
    name: str
    loader: Callable[[DomainRequest], ImageSet]
    kind: str  # "offline" (generated or shipped by a package) or "real" (read from the data root)
    description: str


DOMAINS: dict[str, DomainSpec] = {}


def register_domain(name: str, *, kind: str, description: str):
    def wrap(loader):
        DOMAINS[name] = DomainSpec(name, loader, kind, description)
        return loader

    return wrap


def get_domain(name: str) -> DomainSpec:
    _load_builtin_domains()
    if name not in DOMAINS:
        raise unknown("domain", name, DOMAINS)
    return DOMAINS[name]


def domain_names() -> list[str]:
    _load_builtin_domains()
    return sorted(DOMAINS)


def load_domain(name: str, request: DomainRequest) -> ImageSet:
    """Load a domain and conform it to the request's size and channels (and cap it at max_samples)."""
    spec = get_domain(name)
    data = spec.loader(request)
    if request.max_samples is not None and len(data) > request.max_samples:
        generator = torch.Generator().manual_seed(request.seed)
        data = data.subset(torch.randperm(len(data), generator=generator)[: request.max_samples].sort().values)
    return ImageSet(conform(data.images, request.size, request.channels), data.labels, data.classes)


def conform(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize uint8 N×C×H×W images to size×size (antialiased bilinear) and convert grey↔RGB."""
    if images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    elif images.shape[1] != channels:
        raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")
    if images.shape[-2:] != (size, size):
        out = []
        for chunk in images.split(4096):  # bounded memory for large sets
            resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out.append(resized.round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(out)
    return images.contiguous()


def _load_builtin_domains() -> None:
    # Imported for their registration side effect; kept lazy so `import sophon.data` stays cheap.
    from sophon.data import offline, real  # noqa: F401
