"""Offline domains and the defender/adversary split."""

import subprocess
import sys

import torch

from sophon.data import DomainRequest, conform, load_domain
from sophon.data.splits import load_part, make_splits, save_part, stratified_halves, stratified_sample, write_manifest
from sophon.errors import CheckpointError


def test_shapes10_is_deterministic_balanced_and_split_disjoint():
    request = DomainRequest(size=28, options={"n": 200})
    a, b = load_domain("shapes10", request), load_domain("shapes10", request)
    assert torch.equal(a.images, b.images) and a.images.shape == (200, 3, 28, 28)
    assert torch.bincount(a.labels).tolist() == [20] * 10
    test = load_domain("shapes10", request.replace(split="test"))
    assert not torch.equal(test.images[:10], a.images[:10])
    other_seed = load_domain("shapes10", request.replace(seed=1))
    assert not torch.equal(other_seed.images, a.images)


def test_packaged_domains_load_real_data():
    mnist = load_domain("mnist5k", DomainRequest(size=28, channels=1))
    assert mnist.images.shape == (4000, 1, 28, 28) and mnist.images.max() == 255
    assert len(load_domain("mnist5k", DomainRequest(split="test"))) == 1000
    digits = load_domain("digits", DomainRequest(size=16, channels=3))
    assert digits.images.shape[1:] == (3, 16, 16) and set(digits.labels.tolist()) == set(range(10))
    faces = load_domain("lfw_faces", DomainRequest(size=16, channels=1))
    assert len(faces) == 80 and faces.classes == ("face",)


def test_conform_converts_channels_and_size():
    grey = torch.full((2, 1, 8, 8), 200, dtype=torch.uint8)
    rgb = conform(grey, 16, 3)
    assert rgb.shape == (2, 3, 16, 16) and (rgb == 200).all()
    assert (conform(rgb, 8, 1) == 200).all()


def test_stratified_halves_are_equal_disjoint_and_stratified():
    labels = torch.randint(0, 10, (1001,), generator=torch.Generator().manual_seed(0))
    first, second = stratified_halves(labels, seed=3)
    assert abs(len(first) - len(second)) <= 1
    assert not set(first.tolist()) & set(second.tolist())
    assert len(first) + len(second) == len(labels)
    assert (torch.bincount(labels[first], minlength=10) - torch.bincount(labels[second], minlength=10)).abs().max() <= 1
    again = stratified_halves(labels, seed=3)
    assert torch.equal(again[0], first)
    capped = stratified_sample(labels, 500, seed=0)
    assert len(capped) == 500 and len(set(capped.tolist())) == 500


def test_split_parts_round_trip_and_hash_check(tmp_path):
    request = DomainRequest(size=16, seed=0)
    parts = make_splits({"domain": "shapes10", "options": {"n": 100}, "test_samples": 20},
                        {"domain": "digits", "train_samples": 200, "test_samples": 50}, request, seed=0)
    assert {k: len(v) for k, v in parts.items()} == {"original_train": 100, "original_test": 20, "defender": 100,
                                                     "adversary": 100, "restricted_test": 50}
    paths = {}
    for name, part in parts.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_part(part, paths[name], {"part": name})
    write_manifest(tmp_path / "manifest.json", paths, {})
    loaded = load_part(paths["defender"], tmp_path / "manifest.json")
    assert torch.equal(loaded.images, parts["defender"].images) and loaded.classes == parts["defender"].classes
    paths["defender"].write_bytes(paths["defender"].read_bytes()[:-10] + b"0123456789")
    try:
        load_part(paths["defender"], tmp_path / "manifest.json")
        raise AssertionError("a tampered split part must not load")
    except CheckpointError as err:
        assert "does not match the hash" in str(err)


def test_a_split_part_is_the_same_bytes_whichever_process_writes_it(tmp_path):
    # safetensors writes several metadata keys in a hash-map order that changes per process; run two processes
    write = ("import sys, torch; from sophon.data import ImageSet; from sophon.data.splits import save_part; "
             "save_part(ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ('a', 'b')), "
             "sys.argv[1], {'domain': 'digits', 'seed': 0, 'part': 'defender', 'size': 4, 'channels': 1})")
    for name in ("one", "two", "three"):
        subprocess.run([sys.executable, "-c", write, str(tmp_path / name)], check=True)
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes() == (tmp_path / "three").read_bytes()
    assert load_part(tmp_path / "one").classes == ("a", "b")


def test_a_split_part_written_before_the_single_metadata_key_still_loads(tmp_path):
    from safetensors.torch import save_file

    save_file({"images": torch.zeros(1, 1, 2, 2, dtype=torch.uint8), "labels": torch.tensor([1])},
              str(tmp_path / "old.safetensors"), metadata={"classes": "cat\x1fdog", "part": "defender"})
    assert load_part(tmp_path / "old.safetensors").classes == ("cat", "dog")


def test_adversary_samples_caps_the_adversary_half_class_stratified_and_disjoint_from_the_defender():
    request = DomainRequest(size=16, seed=0)
    restricted = {"domain": "digits", "train_samples": 200, "test_samples": 50}
    full = make_splits({"domain": "shapes10", "options": {"n": 100}}, restricted, request, seed=0)
    capped = make_splits({"domain": "shapes10", "options": {"n": 100}}, {**restricted, "adversary_samples": 40},
                         request, seed=0)
    assert len(capped["adversary"]) == 40 and len(capped["defender"]) == len(full["defender"]) == 100
    assert torch.equal(capped["defender"].images, full["defender"].images)
    counts = torch.bincount(capped["adversary"].labels, minlength=10)
    assert counts.min() >= 3 and counts.max() <= 5  # 4 of each digit, ±1
    # Every kept image is one of the full adversary half's, none of the defender's.
    kept = {bytes(x.numpy()) for x in capped["adversary"].images}
    assert kept <= {bytes(x.numpy()) for x in full["adversary"].images}
    assert not kept & {bytes(x.numpy()) for x in capped["defender"].images}
