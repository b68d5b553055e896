import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from interpreter_bounds import bounds_checked  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _interpreted_kernels_stay_in_bounds():
    """Every load and store of a kernel run by the Triton interpreter must fall inside its launch's tensor arguments
    (tests/interpreter_bounds.py): an out-of-bounds read that a GPU turns into an illegal memory access only by
    chance fails here every time. About 9% more time for the kernel test modules."""
    with bounds_checked():
        yield
