"""`bentoml build` packs the service, the package and the models the service declares."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_bentoml_build_packs_service_package_and_models(bentoml_home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_BENTO_")}
    out = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    tag = next(line for line in out.stdout.splitlines() if line.startswith("__tag__:")).removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = bentoml_home / "bentos" / name / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    (service,) = info["services"]
    models = {m["tag"].split(":")[0] for m in service["models"]}
    assert models == {"sdxl-base", "sdxl-refiner"}
    assert info["entry_service"] == "sdxl" and info["labels"]["project"] == "sdxl-bento"
    for path in ("service.py", "sdxl_bento/gpu/engine.py", "sdxl_bento/gpu/scheduler.py", "sdxl_bento/http/gateway.py",
                 "sdxl_bento/sdxl_configs.json", "sdxl_bento/ui/index.html"):
        assert (bento / "src" / path).is_file(), path
    assert not (bento / "src" / "tests").exists()
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "bentoml" in dockerfile.lower()


def test_the_bento_installs_exactly_the_cuda_lock(bentoml_home):
    """requirements/cuda.txt goes into the Bento as it is (every pin, every hash; BentoML adds its own pin)
    and the image's uv is told to resolve nothing (no dependencies of its own; it checks the hashes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_BENTO_")}
    out = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    tag = next(line for line in out.stdout.splitlines() if line.startswith("__tag__:")).removeprefix("__tag__:")
    bento = bentoml_home / "bentos" / tag.split(":")[0] / tag.split(":")[1]
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    lock = (REPO / "requirements" / "cuda.txt").read_text()
    entries = lambda text: {" ".join(e.split()) for e in re.split(r"\n(?=\S)", text) if re.match(r"[A-Za-z0-9]", e)}
    assert entries(requirements) == entries(lock) | {"bentoml==1.4.39"}
    assert "torch==2.13.0 " in requirements and "diffusers==0.42.1" in requirements
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    config = dockerfile.index("[pip]\\nno-deps = true")
    assert config < dockerfile.index("pip install -r")
