import os

# Tests run on the CPU; some simulate 8 devices in their own subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

# tests/ mirrors the package (tests/train/ for latentr3_jax/train/, ...); the shared helper
# modules (_sft_helpers, hf_fixtures, ...) stay here, importable from every folder
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
AMAZON = SHARED / "data" / "amazon18"


def amazon_dir(name: str) -> pathlib.Path:
    """Path of a real dataset folder in ../shared, or skip the test saying why."""
    p = AMAZON / name
    if not (p / "info.txt").exists():
        pytest.skip(f"real data not found at {p} (../shared/data/amazon18 is absent)")
    return p
