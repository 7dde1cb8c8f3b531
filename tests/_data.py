"""Where the tests find the shared real data (read-only, never copied into the repository)."""
import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path | None:
    """$LSQUANT_DATA, else ../shared/data beside the checkout (CI and developer machines have it there)."""
    env = os.environ.get("LSQUANT_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


def multi30k_dir() -> Path:
    """The Multi30k directory, or skip the test saying what is missing."""
    root = shared_data_dir()
    if root is None:
        pytest.skip("real data not found: set LSQUANT_DATA or put the shared data at ../shared/data beside "
                    "the checkout")
    path = root / "multi30k" if (root / "multi30k").is_dir() else root
    if not (path / "val.de.gz").is_file():
        pytest.skip(f"Multi30k not found in {path} (expected val.de.gz, val.en.gz)")
    return path
