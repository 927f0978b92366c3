"""The lock (requirements/, made by scripts/lock) is what pyproject.toml asks for, and what is installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("lockcheck", REPO / "scripts" / "lockcheck.py")
lockcheck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lockcheck)


def pins(name: str) -> dict[str, Version]:
    text = (REPO / "requirements" / name).read_text()
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, flags=re.M)
    assert found, name
    return {canonicalize_name(n): Version(v) for n, v in found}


def test_every_lock_file_has_hashes_for_every_package():
    for name in lockcheck.LOCKS:
        entries = re.split(r"\n(?=\S)", (REPO / "requirements" / name).read_text())
        packages = [e for e in entries if re.match(r"[A-Za-z0-9]", e)]
        assert packages and all("--hash=sha256:" in e for e in packages), name


def test_the_lock_was_made_from_pyproject_as_it_is():
    assert lockcheck.stale() == []


def test_a_changed_pyproject_is_caught_with_a_clear_message(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "lockcheck.py", tmp_path / "scripts")
    shutil.copytree(REPO / "requirements", tmp_path / "requirements")
    pyproject = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(pyproject)
    assert lockcheck.stale(tmp_path) == []
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"pyyaml>=6",', '"pyyaml>=6", "rich>=13",'))
    assert lockcheck.stale(tmp_path) == ["requirements/cpu.txt", "requirements/cuda.txt", "requirements/test.txt"]
    done = subprocess.run([sys.executable, tmp_path / "scripts" / "lockcheck.py"], capture_output=True, text=True)
    assert done.returncode == 1 and "Run scripts/lock" in done.stderr


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_each_variant_satisfies_every_requirement_of_pyproject(variant):
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = pins(f"{variant}.txt") | pins("test.txt")
    for line in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in requirements/{variant}.txt"
        assert req.specifier.contains(locked[name], prereleases=True), f"{name} {locked[name]} does not meet {req}"


def test_cpu_and_cuda_locks_agree_on_every_package_they_share():
    cpu, cuda = pins("cpu.txt"), pins("cuda.txt")
    assert cpu.pop("torch").local == "cpu" and cuda.pop("torch").local is None
    assert set(cpu) <= set(cuda)  # CUDA adds its runtime libraries and triton
    assert {n: cpu[n] for n in cpu if cpu[n] != cuda[n]} == {}
    assert not set(pins("test.txt")) & set(cuda)


def test_the_installed_environment_is_exactly_the_lock():
    """What scripts/setup installed: every locked package at its version, and nothing else."""
    torch = Version(importlib.metadata.version("torch"))
    locked = pins("cpu.txt" if torch.local == "cpu" else "cuda.txt") | pins("test.txt")
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in importlib.metadata.distributions()}
    installed.pop("sdxl-bento")  # the project itself, installed editable
    installed.pop("pip")  # the installer
    assert {n: str(v) for n, v in installed.items() if locked.get(n) != v} == {}, "installed but not locked"
    assert sorted(set(locked) - set(installed)) == [], "locked but not installed"


def test_version_prints_the_versions_that_run():
    import torch

    out = subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "--version"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("sdxl-bento 0.1.0 (") and "\n" not in line
    for lib in ("torch", "diffusers", "transformers", "bentoml"):
        assert f"{lib} {importlib.metadata.version(lib)}" in line
    assert (", cpu," in line) == (torch.version.cuda is None)
