"""DVC's default remote: push a stage's outputs, delete them and the local cache, pull them back, status clean."""

import hashlib
import shutil


from tests.pipeline_helpers import bin_path, copy_project, run, tiny_params

CLS = "quick-classification"


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_push_delete_pull_round_trip(tmp_path):
    (tmp_path / "project").mkdir()
    root = copy_project(tmp_path / "project")
    tiny_params(root / "params.yaml")
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], root)
    dvc, stage, data = bin_path("dvc"), f"split-{CLS}", root / "data" / CLS
    run([dvc, "repro", stage], root)
    before = _digests(data)

    run([dvc, "push", stage], root)
    remote = tmp_path / "sophon-dvc-remote"  # the default remote: a folder beside the workspace
    assert remote.is_dir() and any(p.is_file() for p in remote.rglob("*"))

    shutil.rmtree(data)
    shutil.rmtree(root / ".dvc" / "cache")  # nothing local left: the pull must come from the remote
    assert "not in cache" in run([dvc, "status", stage], root).stdout
    run([dvc, "pull", stage], root)
    assert _digests(data) == before
    assert "up to date" in run([dvc, "status", stage], root).stdout
