"""Atomic file output: write to a temporary file beside the target, then rename it into place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's folder; rename it onto `path` only if the block succeeds.

    The file gets the permissions a plain open() would give (0666 less the umask, not mkstemp's 0600), and it is
    fsynced before the rename and its folder after, so a power loss never leaves an empty "complete" file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; if the block succeeds, it replaces `path` (an older folder there is
    moved aside first and removed after), so readers see the old folder or the complete new one, never a part."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    old = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old"
    try:
        yield tmp
        for item in tmp.rglob("*"):
            if item.is_file():
                with open(item, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def code_digest() -> str:
    """Hash of the core's source (sophon/**/*.py): what was computed or checked by other code is never reused."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def config_hash(obj) -> str:
    """A short, stable hash of a JSON-able config section (for model cards and MLflow tags)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- training state: tensors in safetensors, everything else in JSON (never a pickle) -------------------------

def _encode(obj, tensors: dict, key: str):
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):  # keys keep their type (optimizer states are keyed by int)
        return {"dict": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot save a {type(obj).__name__} in a training state ({key})")


def _decode(node, tensors: dict):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _decode(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    return node["value"]


def write_state(folder, state: dict) -> None:
    """Save a nested training state (dicts, lists, tuples, tensors, plain values) to `folder` atomically: a new
    `state-<id>.safetensors` first, then `state.json`, which names it and its digest; older tensor files go last,
    so a kill at any point leaves the previous complete state readable."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict = {}
    tree = _encode(state, tensors, "state")
    name = f"state-{uuid.uuid4().hex[:12]}.safetensors"
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / "state.json", {"tensors": name, "sha256": sha256_file(folder / name), "tree": tree})
    for old in folder.glob("state-*.safetensors"):  # earlier states, and one a kill left unnamed
        if old.name != name:
            old.unlink(missing_ok=True)


def read_state(folder) -> dict | None:
    """The state `write_state` saved in `folder`, or None when there is none or it does not check out."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = read_json(folder / "state.json")
        path = folder / meta["tensors"]
        if sha256_file(path) != meta["sha256"]:
            return None
        return _decode(meta["tree"], load_file(str(path)))
    except (OSError, ValueError, KeyError):
        return None
