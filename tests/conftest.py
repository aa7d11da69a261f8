"""Shared fixtures: the real data in ../shared/data (skipped when absent) and a small
synthetic corpus written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's interpreter. Triton reads TRITON_INTERPRET when
# it is imported and when a kernel is defined, and other packages (DeepSpeed) import it early:
# so it is set here, before any test module imports anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CONKD_SHARED_DATA", ROOT.parent / "shared" / "data"))
REAL_DATA_REASON = (
    f"real ReDial/INSPIRED data not found at {SHARED_DATA} (set CONKD_SHARED_DATA, or fetch "
    "it with `python -m conkd_scale.data fetch`)"
)


def real_data_dir(name: str) -> Path:
    """Path of a real dataset, or skip the test with a stated reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(REAL_DATA_REASON)
    return path


@pytest.fixture(scope="session")
def redial_dir() -> Path:
    return real_data_dir("redial")


@pytest.fixture(scope="session")
def inspired_dir() -> Path:
    return real_data_dir("inspired")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic ReDial-format dataset, shared by the whole session (read-only)."""
    from conkd_scale.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "data"
    write_synthetic(out, seed=0, conversations=200, items=60)
    return out


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic data (60 conversations), a tiny trained D (``lm``: a Hugging Face directory
    with item tokens) and a tiny R (``rec``), built once per session (tests/tiny_lm.py)."""
    from tests.tiny_lm import ensure_tiny_setup

    return ensure_tiny_setup(tmp_path_factory.getbasetemp() / "eval_tiny", rec=True)
