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


@pytest.fixture(scope="module")
def tiny():
    """120 generated shapes (the original domain) and 120 scikit-learn digits (the restricted one), 16×16."""
    from sophon.data import DomainRequest, load_domain

    shapes = load_domain("shapes10", DomainRequest(size=16, options={"n": 120}))
    digits = load_domain("digits", DomainRequest(size=16))
    return shapes, digits.subset(range(120))
