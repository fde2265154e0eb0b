"""The split stage's core (paper §5.1.4): the restricted training data is split into two equal, disjoint,
class-stratified, seeded halves — the defender's (Sophon, NTL) and the adversary's (attacks) — beside a
separate test set. `adversary_samples` caps the adversary's half (a class-stratified sample of it): how much
labelled data the attacker has is a setting of the threat model. Parts are safetensors files (uint8 images + labels) with a manifest of their hashes;
for real datasets the manifest also records the index lists into the source split."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sophon.data.registry import DomainRequest, ImageSet, get_domain, load_domain
from sophon.errors import CheckpointError
from sophon.io import atomic_path, read_json, sha256_file, write_json

PART_KEY = "sophon_part"  # the one safetensors metadata key of a split part: sorted JSON


def stratified_halves(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint index sets of equal size (±1 per class), each holding half of every class."""
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    flip = 0
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        half = len(members) // 2 + (flip if len(members) % 2 else 0)
        flip ^= len(members) % 2  # alternate which half gets the odd one out, to keep the halves equal
        first.append(members[:half])
        second.append(members[half:])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def stratified_sample(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` indices, class proportions kept (for capping a training set before the split)."""
    if count >= len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    # Sorting a random permutation by class, then interleaving, keeps proportions in any prefix.
    ranks = torch.empty_like(order)
    for cls in torch.unique(labels):
        members = order[labels[order] == cls]
        ranks[members] = torch.arange(len(members)) * len(labels) // max(1, len(members))
    chosen = order[torch.argsort(ranks[order], stable=True)][:count]
    return chosen.sort().values


def make_splits(original: dict, restricted: dict, request: DomainRequest, seed: int) -> dict[str, ImageSet]:
    """Load both domains and build the five parts. `original`/`restricted` are params.yaml sections."""
    parts: dict[str, ImageSet] = {}
    for section, prefix in ((original, "original"), (restricted, "restricted")):
        sub = request.replace(options=section.get("options", {}))
        train = load_domain(section["domain"], sub.replace(split="train"))
        test = load_domain(section["domain"], sub.replace(split="test", max_samples=section.get("test_samples")))
        if section.get("train_samples"):
            train = train.subset(stratified_sample(train.labels, section["train_samples"], seed))
        if prefix == "original":
            parts["original_train"], parts["original_test"] = train, test
        else:
            defender, adversary = stratified_halves(train.labels, seed)
            if section.get("adversary_samples"):
                adversary = adversary[stratified_sample(train.labels[adversary], section["adversary_samples"], seed)]
            parts["defender"], parts["adversary"], parts["restricted_test"] = (
                train.subset(defender), train.subset(adversary), test)
    return parts


def save_part(data: ImageSet, path: str | Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    # One metadata key holding sorted JSON: safetensors writes several keys in hash-map order, which differs from one
    # process to the next, so the same split would get another file hash (and DVC would see changed data) every run.
    meta = {PART_KEY: json.dumps({"classes": list(data.classes), **{k: str(v) for k, v in metadata.items()}},
                                 sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({"images": data.images.contiguous(), "labels": data.labels}, str(tmp), metadata=meta)


def load_part(path: str | Path, manifest: str | Path | None = None) -> ImageSet:
    """Read one part (safetensors, no pickle), checking its hash against the manifest when given."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"split part missing: {path} (run the split stage first)")
    if manifest is not None:
        expected = read_json(manifest)["parts"].get(path.stem, {}).get("sha256")
        if expected and sha256_file(path) != expected:
            raise CheckpointError(f"split part {path} does not match the hash in {manifest}: re-run the split stage")
    try:
        with safe_open(str(path), framework="pt") as handle:
            classes = part_classes(handle.metadata())
            return ImageSet(handle.get_tensor("images"), handle.get_tensor("labels"), classes)
    except (SafetensorError, OSError, KeyError) as exc:
        raise CheckpointError(f"split part {path} cannot be read: {exc}") from None


def part_classes(metadata: dict) -> tuple[str, ...]:
    """The class names of a part's safetensors metadata; parts written before PART_KEY kept them in `classes`."""
    if PART_KEY in metadata:
        return tuple(json.loads(metadata[PART_KEY])["classes"])
    return tuple(metadata["classes"].split("\x1f"))


def write_manifest(path: str | Path, parts: dict[str, Path], details: dict) -> None:
    entries = {}
    for name, part_path in parts.items():
        entries[name] = {"path": str(part_path), "sha256": sha256_file(part_path)}
    write_json(path, {"parts": entries, **details})


def describe(domain: str) -> str:
    spec = get_domain(domain)
    return f"{spec.name} ({spec.kind}): {spec.description}"
