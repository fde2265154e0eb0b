import os

import pytest
import torch

os.environ.setdefault("SOPHON_PROGRESS", "0")
torch.set_num_threads(1)

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def project_dir():
    return PROJECT
