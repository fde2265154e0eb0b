import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see stages/__init__.py
os.environ.setdefault("SOPHON_PROGRESS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def project_dir():
    return PROJECT
