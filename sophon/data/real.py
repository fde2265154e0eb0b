"""Real domains, read from the data root (`request.root`) in each dataset's usual on-disk layout.

Array sets (CIFAR-10/100, MNIST, SVHN, STL-10) go through torchvision.datasets and may be downloaded
(`request.download`); image-folder sets (CINIC-10, ImageNette, CelebA, FFHQ) are read with PIL, centre-cropped
to a square and resized to `request.size` while reading. A missing dataset raises a one-line
`DatasetNotFoundError` naming the path looked for and how to get the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sophon.data.registry import DomainRequest, ImageSet, register_domain
from sophon.errors import DatasetNotFoundError

DOWNLOAD_HINT = "set data.download: true in params.yaml to fetch it"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}
DIGITS = tuple("0123456789")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
IMAGENETTE_WNIDS = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player", "n03000684": "chain saw",
    "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck", "n03425413": "gas pump",
    "n03445777": "golf ball", "n03888257": "parachute",
}


def _missing(name: str, path: Path | str, hint: str, reason: str = "not found") -> DatasetNotFoundError:
    return DatasetNotFoundError(f"dataset {name!r} {reason} at {path}; {hint}")


def _split(request: DomainRequest, train, test):
    """Pick the value for the request's split ("train" or "test")."""
    if request.split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {request.split!r}")
    return train if request.split == "train" else test


def _torchvision(name: str, path: Path, request: DomainRequest, build):
    """Call `build(download=...)` (a torchvision dataset), turning its not-found errors into DatasetNotFoundError."""
    try:
        return build(download=request.download)
    except (RuntimeError, OSError) as err:  # torchvision: RuntimeError if missing/corrupt; URLError if offline
        if not request.download:
            raise _missing(name, path, DOWNLOAD_HINT, "missing or corrupted") from err
        reason = "could not be downloaded or read (" + " ".join(str(err).split())[:200] + ")"
        raise _missing(name, path, "check the network or place the files there by hand", reason) from err


def _array_set(images, labels, classes) -> ImageSet:
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.as_tensor(np.asarray(labels)), tuple(classes))


@register_domain("cifar10", kind="real", description="CIFAR-10, 32×32 RGB, 10 classes (root/cifar-10-batches-py)")
def cifar10(request: DomainRequest, *, name: str = "cifar10", folder: str = "cifar-10-batches-py") -> ImageSet:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    ds = _torchvision(name, request.root / folder, request,
                      lambda **kw: cls(request.root, train=_split(request, True, False), **kw))
    return _array_set(ds.data.transpose(0, 3, 1, 2), ds.targets, ds.classes)


@register_domain("cifar100", kind="real", description="CIFAR-100, 32×32 RGB, 100 fine classes (root/cifar-100-python)")
def cifar100(request: DomainRequest) -> ImageSet:
    return cifar10(request, name="cifar100", folder="cifar-100-python")


@register_domain("mnist", kind="real", description="MNIST, 28×28 grey digits (root/MNIST/raw idx files)")
def mnist(request: DomainRequest) -> ImageSet:
    from torchvision import datasets

    ds = _torchvision("mnist", request.root / "MNIST" / "raw", request,
                      lambda **kw: datasets.MNIST(request.root, train=_split(request, True, False), **kw))
    return ImageSet(ds.data.unsqueeze(1).contiguous(), ds.targets, DIGITS)


@register_domain("svhn", kind="real", description="SVHN cropped digits, 32×32 RGB (root/svhn/{train,test}_32x32.mat)")
def svhn(request: DomainRequest) -> ImageSet:
    from torchvision import datasets

    split = _split(request, "train", "test")
    ds = _torchvision("svhn", request.root / "svhn" / f"{split}_32x32.mat", request,
                      lambda **kw: datasets.SVHN(request.root / "svhn", split=split, **kw))
    return _array_set(ds.data, ds.labels, DIGITS)  # torchvision already maps label 10 to digit 0


@register_domain("stl10", kind="real", description="STL-10 labelled images, 96×96 RGB (root/stl10_binary)")
def stl10(request: DomainRequest) -> ImageSet:
    from torchvision import datasets

    ds = _torchvision("stl10", request.root / "stl10_binary", request,
                      lambda **kw: datasets.STL10(request.root, split=_split(request, "train", "test"), **kw))
    return _array_set(ds.data, ds.labels, STL10_CLASSES)


def _read_images(name: str, path: Path, hint: str, samples: list[tuple[Path, int]], classes,
                 request: DomainRequest) -> ImageSet:
    """Read (file, label) pairs as RGB, centre-cropped square and resized to request.size; seeded subset first."""
    if not samples:
        raise _missing(name, path, hint, "not found (no images)")
    if request.max_samples is not None and len(samples) > request.max_samples:
        generator = torch.Generator().manual_seed(request.seed)  # same rule as load_domain's cap
        keep = torch.randperm(len(samples), generator=generator)[: request.max_samples].sort().values
        samples = [samples[i] for i in keep]
    size = request.size
    images = torch.empty(len(samples), 3, size, size, dtype=torch.uint8)
    for i, (file, _) in enumerate(samples):
        with Image.open(file) as image:
            image = image.convert("RGB")
            w, h = image.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
        images[i] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    return ImageSet(images, torch.tensor([label for _, label in samples]), tuple(classes))


def _class_folders(folder: Path, class_dirs) -> list[tuple[Path, int]]:
    """(file, label) for images under folder/<class_dir>/, labels in the order of class_dirs."""
    return [(file, label) for label, sub in enumerate(class_dirs) if (folder / sub).is_dir()
            for file in sorted((folder / sub).iterdir()) if file.suffix.lower() in IMAGE_EXTENSIONS]


@register_domain("cinic10", kind="real",
                 description="CINIC-10, 32×32 RGB, CIFAR-10 classes (root/cinic-10/{train,test}/<class>)")
def cinic10(request: DomainRequest) -> ImageSet:
    folder = request.root / "cinic-10" / _split(request, "train", "test")
    hint = f"download CINIC-10 from https://datashare.ed.ac.uk/handle/10283/3192 and extract it into {folder.parent}"
    return _read_images("cinic10", folder, hint, _class_folders(folder, CIFAR10_CLASSES), CIFAR10_CLASSES, request)


def _imagenette_dir(root: Path, size: int) -> Path | None:
    """Prefer the smallest imagenette2* variant (160, 320, full) whose images are at least `size` pixels."""
    def px(path: Path) -> int:
        tail = path.name.rpartition("-")[2]
        return int(tail) if tail.isdigit() else 10**6

    found = [path for path in root.glob("imagenette2*") if path.is_dir()]
    return min(found, key=lambda path: (px(path) < size, abs(px(path) - size)), default=None)


@register_domain("imagenette", kind="real",
                 description="ImageNette, 10 easy ImageNet classes, RGB (root/imagenette2*/{train,val}/<wnid>)")
def imagenette(request: DomainRequest) -> ImageSet:
    split = _split(request, "train", "val")
    path = request.root / "imagenette2*"
    if _imagenette_dir(request.root, request.size) is None and request.download:
        from torchvision import datasets

        variant = "160px" if request.size <= 160 else "320px"
        _torchvision("imagenette", path, request, lambda **kw: datasets.Imagenette(request.root, split, variant, **kw))
    base = _imagenette_dir(request.root, request.size)
    if base is None:
        raise _missing("imagenette", path, DOWNLOAD_HINT)
    samples = _class_folders(base / split, IMAGENETTE_WNIDS)
    return _read_images("imagenette", base / split, DOWNLOAD_HINT, samples, IMAGENETTE_WNIDS.values(), request)


@register_domain("celeba", kind="real",
                 description="CelebA aligned faces, one class 'face' "
                             "(root/celeba/img_align_celeba + list_eval_partition.txt)")
def celeba(request: DomainRequest) -> ImageSet:
    base = request.root / "celeba"
    hint = ("download img_align_celeba.zip and list_eval_partition.txt from "
            f"https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into {base} and unzip the images there")
    partition, folder = base / "list_eval_partition.txt", base / "img_align_celeba"
    for needed in (partition, folder):
        if not needed.exists():
            raise _missing("celeba", needed, hint)
    wanted = _split(request, "0", "2")  # partition 0 = train, 1 = valid, 2 = test
    rows = (line.split() for line in partition.read_text().splitlines())
    samples = [(folder / row[0], 0) for row in rows if len(row) == 2 and row[1] == wanted]
    return _read_images("celeba", folder, hint, samples, ("face",), request)


@register_domain("ffhq", kind="real", description="FFHQ faces, one class 'face'; 90/10 split by filename (root/ffhq)")
def ffhq(request: DomainRequest) -> ImageSet:
    folder = request.root / "ffhq"
    hint = "get FFHQ images (e.g. thumbnails128x128) from https://github.com/NVlabs/ffhq-dataset and put them there"
    files = sorted((file for pattern in ("*", "*/*") for file in folder.glob(pattern)
                    if file.suffix.lower() in IMAGE_EXTENSIONS), key=lambda file: file.relative_to(folder).as_posix())
    cut = len(files) * 9 // 10
    files = _split(request, files[:cut], files[cut:])
    return _read_images("ffhq", folder, hint, [(file, 0) for file in files], ("face",), request)
