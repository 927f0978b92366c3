"""Shared fixtures. BENTOML_HOME points at a fresh temporary model store before bentoml is imported,
and the tiny synthetic SDXL base and refiner are put there by the project's own command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="sdxl-bento-test-home-"))
os.environ["BENTOML_HOME"] = str(_HOME)
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    """The temporary BENTOML_HOME, holding tiny synthetic sdxl-base and sdxl-refiner."""
    subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "models", "synth", "--preset", "tiny", "--refiner"],
                   check=True, cwd=REPO, env=os.environ.copy(), capture_output=True)
    return _HOME


@pytest.fixture(scope="session")
def engine(bentoml_home):
    from sdxl_bento.gpu.engine import Engine
    from sdxl_bento.store import modelstore as store

    return Engine(store.resolve("sdxl-base:latest", "base"), store.resolve("sdxl-refiner:latest", "refiner"),
                  device="cpu")
