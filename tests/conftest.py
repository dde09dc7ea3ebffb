"""Shared fixtures: the example chest CT (skipped cleanly when absent) and small phantoms."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHEST_CT_ENV = "SONORAY_CHEST_CT"


def chest_ct_dir() -> Path | None:
    """Folder of the example chest CT (``ct.nii.gz``, ``labels.nii.gz``, ``structures.csv``)."""
    value = os.environ.get(CHEST_CT_ENV)
    if not value:
        return None
    path = Path(value)
    return path if (path / "ct.nii.gz").is_file() else None


@pytest.fixture(scope="session")
def chest_ct_path() -> Path:
    path = chest_ct_dir()
    if path is None:
        pytest.skip(f"example chest CT not found; set {CHEST_CT_ENV} to its folder")
    return path


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
