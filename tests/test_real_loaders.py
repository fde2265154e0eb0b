"""Real-dataset loaders read tiny fixtures written in each dataset's own on-disk format (offline, fast)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sophon.data import DomainRequest, load_domain
from sophon.errors import DatasetNotFoundError


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks fixed md5 sums of the real files (CIFAR meta included); accept any existing file."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10
    import torchvision.datasets.svhn as svhn

    for module in (cifar, svhn, stl10):
        monkeypatch.setattr(module, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _rng_images(n, c, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _load(name, root, split="train", size=32, channels=3, **kw):
    return load_domain(name, DomainRequest(split=split, size=size, channels=channels, root=root, **kw))


def _pickle(path, obj):
    # Real CIFAR batches are Python 2 pickles: torchvision loads them with encoding="latin1" and indexes str keys.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar(tmp_path, no_md5, name):
    ten = name == "cifar10"
    base = tmp_path / ("cifar-10-batches-py" if ten else "cifar-100-python")
    base.mkdir()
    label_key = "labels" if ten else "fine_labels"
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if ten else ["train", "test"]
    data = {}
    for k, file in enumerate(files):
        images = _rng_images(4, 3, 32, 32, seed=k)
        labels = [(3 * k + j) % (10 if ten else 100) for j in range(4)]
        data[file] = (images, labels)
        _pickle(base / file, {"data": images.reshape(4, -1), label_key: labels})
    classes = [f"class{i}" for i in range(10 if ten else 100)]
    _pickle(base / ("batches.meta" if ten else "meta"), {"label_names" if ten else "fine_label_names": classes})

    train = _load(name, tmp_path)
    expected = np.concatenate([data[f][0] for f in files[:-1]])
    assert train.images.shape == (len(expected), 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.tolist() == sum((data[f][1] for f in files[:-1]), [])
    assert train.classes == tuple(classes)

    test = _load(name, tmp_path, split="test")
    assert torch.equal(test.images, torch.from_numpy(data[files[-1]][0]))
    assert test.labels.dtype == torch.int64 and test.labels.tolist() == data[files[-1]][1]


def _idx(path, array):
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    sets = {}
    for k, prefix in enumerate(["train", "t10k"]):
        images = _rng_images(6, 1, 28, 28, seed=k)[:, 0]
        labels = np.arange(6) + k
        sets[prefix] = (images, labels)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)

    train = _load("mnist", tmp_path, size=28, channels=1)
    assert train.images.shape == (6, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], torch.from_numpy(sets["train"][0]))
    assert train.labels.tolist() == list(range(6)) and train.classes == tuple("0123456789")

    test = _load("mnist", tmp_path, split="test", size=28, channels=3)  # grey expanded to RGB by the registry
    assert test.images.shape == (6, 3, 28, 28)
    assert torch.equal(test.images[:, 2], torch.from_numpy(sets["t10k"][0]))
    assert test.labels.tolist() == list(range(1, 7))


def test_svhn(tmp_path, no_md5):
    import scipy.io

    base = tmp_path / "svhn"
    base.mkdir()
    sets = {}
    for k, split in enumerate(["train", "test"]):
        images = _rng_images(5, 3, 32, 32, seed=k)
        labels = np.array([10, 1, 2, 9, 10][: 5 - k] + [3] * k, dtype=np.uint8)
        sets[split] = (images, labels)
        scipy.io.savemat(base / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": labels[:, None]})

    for split, (images, labels) in sets.items():
        got = _load("svhn", tmp_path, split=split)
        assert got.images.shape == (5, 3, 32, 32) and got.images.dtype == torch.uint8
        assert torch.equal(got.images, torch.from_numpy(images))
        assert got.labels.tolist() == np.where(labels == 10, 0, labels).tolist()  # SVHN's 10 is the digit 0


def test_stl10(tmp_path, no_md5):
    base = tmp_path / "stl10_binary"
    base.mkdir()
    sets = {}
    for k, split in enumerate(["train", "test"]):
        images = _rng_images(3, 3, 96, 96, seed=k)
        labels = np.array([1, 5, 10], dtype=np.uint8)  # 1-based on disk
        sets[split] = images
        (base / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())  # column-major on disk
        (base / f"{split}_y.bin").write_bytes(labels.tobytes())
    (base / "unlabeled_X.bin").write_bytes(b"")  # torchvision's integrity check wants it even for train/test

    for split, images in sets.items():
        got = _load("stl10", tmp_path, split=split, size=96)
        assert got.images.shape == (3, 3, 96, 96) and got.images.dtype == torch.uint8
        assert torch.equal(got.images, torch.from_numpy(images))
        assert got.labels.tolist() == [0, 4, 9] and got.classes[9] == "truck"
    assert _load("stl10", tmp_path, size=32).images.shape == (3, 3, 32, 32)


def _save(path, array):
    """Save an H×W×3 uint8 array as an image (format from the suffix) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **({"quality": 100} if path.suffix.lower() in {".jpg", ".jpeg"} else {}))
    return array


def _flat(value, h=16, w=16):
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_cinic10(tmp_path):
    from sophon.data.real import CIFAR10_CLASSES

    pixels = {}
    for split in ["train", "valid", "test"]:
        for label in (0, 3, 9):
            for j in range(2):
                file = tmp_path / "cinic-10" / split / CIFAR10_CLASSES[label] / f"{split}-{j}.png"
                pixels[file] = (_save(file, _rng_images(1, 32, 32, 3, seed=label * 10 + j)[0]), label)

    test = _load("cinic10", tmp_path, split="test")
    assert test.images.shape == (6, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.labels.tolist() == [0, 0, 3, 3, 9, 9] and test.classes == CIFAR10_CLASSES
    file = tmp_path / "cinic-10" / "test" / "cat" / "test-1.png"
    assert torch.equal(test.images[3], torch.from_numpy(pixels[file][0]).permute(2, 0, 1))  # lossless PNG round-trip

    full = _load("cinic10", tmp_path, size=16)
    assert full.images.shape == (6, 3, 16, 16)
    capped = _load("cinic10", tmp_path, size=16, max_samples=3, seed=5)
    index = torch.randperm(6, generator=torch.Generator().manual_seed(5))[:3].sort().values
    assert torch.equal(capped.images, full.images[index]) and torch.equal(capped.labels, full.labels[index])


def test_imagenette(tmp_path):
    from sophon.data.real import IMAGENETTE_WNIDS

    wnids = list(IMAGENETTE_WNIDS)
    for split in ["train", "val"]:
        for label in (1, 9):
            for j in range(2):
                file = tmp_path / "imagenette2" / split / wnids[label] / f"{split}_{j}.JPEG"
                _save(file, _flat(20 * label + 50 * j, 40, 60))

    val = _load("imagenette", tmp_path, split="test", size=24)
    assert val.images.shape == (4, 3, 24, 24) and val.images.dtype == torch.uint8
    assert val.labels.tolist() == [1, 1, 9, 9]
    assert val.classes[9] == "parachute" and len(val.classes) == 10
    assert (val.images.float().mean(dim=(1, 2, 3)) - torch.tensor([20.0, 70, 180, 230])).abs().max() < 2  # JPEG


def test_celeba(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    lines = []
    for i in range(8):
        image = _flat(10 * i, 30, 20)  # portrait like CelebA (H > W): the centre square is kept
        image[:5], image[-5:] = 255, 255  # bands that the centre crop removes
        _save(folder / f"{i + 1:06d}.jpg", image)
        lines.append(f"{i + 1:06d}.jpg {i % 3}")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")

    train = _load("celeba", tmp_path, size=10)
    test = _load("celeba", tmp_path, split="test", size=10)
    assert train.images.shape == (3, 3, 10, 10) and test.images.shape == (2, 3, 10, 10)
    assert train.labels.tolist() == [0, 0, 0] and train.classes == ("face",)
    # partition 2 holds files 3 and 6 (values 20 and 50); the white bands are cropped away
    assert (test.images[:, :, 2:-2, 2:-2].float().mean(dim=(1, 2, 3)) - torch.tensor([20.0, 50])).abs().max() < 3


def test_ffhq(tmp_path):
    for i in range(10):  # official layout: one subfolder per thousand images
        _save(tmp_path / "ffhq" / f"{i // 5:02d}000" / f"{i:05d}.png", _flat(i * 20, 16, 16))

    train = _load("ffhq", tmp_path, size=16)
    test = _load("ffhq", tmp_path, split="test", size=16)
    assert train.images.shape == (9, 3, 16, 16) and test.images.shape == (1, 3, 16, 16)
    assert train.labels.tolist() == [0] * 9 and test.classes == ("face",)
    assert train.images[:, 0, 0, 0].tolist() == [i * 20 for i in range(9)]  # sorted filename order
    assert test.images.unique().tolist() == [180]


@pytest.mark.parametrize("name, looked_in", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("mnist", "MNIST/raw"),
    ("svhn", "svhn/train_32x32.mat"), ("stl10", "stl10_binary"), ("cinic10", "cinic-10/train"),
    ("imagenette", "imagenette2*"), ("celeba", "celeba/list_eval_partition.txt"), ("ffhq", "ffhq"),
])
def test_missing_dataset(tmp_path, name, looked_in):
    with pytest.raises(DatasetNotFoundError) as info:
        _load(name, tmp_path)
    message = str(info.value)
    assert "\n" not in message and name in message and str(tmp_path / looked_in) in message
