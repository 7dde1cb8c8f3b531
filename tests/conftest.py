"""Shared fixtures. Tests marked ``cuda`` run only where PyTorch sees a GPU (they build the extension on
first use) and are skipped cleanly elsewhere."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (runs on the device machine via scripts/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
