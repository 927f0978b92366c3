"""`bentoml build` packs the service, the package and the models the service declares."""

import os
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
    for path in ("service.py", "sdxl_bento/engine.py", "sdxl_bento/scheduler.py", "sdxl_bento/sdxl_configs.json"):
        assert (bento / "src" / path).is_file(), path
    assert not (bento / "src" / "tests").exists()
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "diffusers==0.42.1" in (bento / "env" / "python" / "requirements.txt").read_text()
    assert "bentoml" in dockerfile.lower()
