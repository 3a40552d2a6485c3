import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthetic import write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_cifar(tmp_path_factory):
    """A full-size CIFAR-10 binary data set of random images (read-only by convention)."""
    return write_dataset(str(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-bin"))


@pytest.fixture(scope="session")
def real_cifar():
    root = os.environ.get("CIFAR10_DIR")
    if not root or not os.path.isdir(root):
        pytest.skip("real CIFAR-10 not available: set CIFAR10_DIR to the cifar-10-batches-bin folder")
    return root
