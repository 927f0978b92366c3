"""The versions this process runs with: the project's and those of the libraries that decide its images.

Read from the installed distributions, and torch's CUDA version from ``torch/version.py`` loaded on its own,
so that ``sdxl-bento --version`` does not initialise torch. Exported as the ``sdxl_build_info`` gauge.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import platform
from pathlib import Path

from . import __version__

LIBRARIES = ("torch", "diffusers", "transformers", "bentoml")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _torch_cuda() -> str:
    """The CUDA version torch was built with, or ``cpu`` (its CPU build)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "missing"
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    version_spec = importlib.util.spec_from_file_location("_sdxl_bento_torch_version", path)
    module = importlib.util.module_from_spec(version_spec)
    version_spec.loader.exec_module(module)
    return getattr(module, "cuda", None) or "cpu"


@functools.cache
def build_info() -> dict[str, str]:
    return {"version": __version__, "python": platform.python_version(),
            **{lib: _version(lib) for lib in LIBRARIES}, "cuda": _torch_cuda()}


def describe() -> str:
    """One line, as ``sdxl-bento --version`` prints it."""
    info = build_info()
    libs = ", ".join(f"{lib} {info[lib]}" for lib in LIBRARIES)
    cuda = "cpu" if info["cuda"] == "cpu" else f"CUDA {info['cuda']}"
    return f"sdxl-bento {info['version']} ({libs}, {cuda}, Python {info['python']})"
