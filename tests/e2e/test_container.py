"""The OCI image, built here and run: `scripts/containerize --local`, then the service inside the image.

Builds the image (or reuses one built from the same sources: its tag carries their hash) with the Bento of
this session's temporary BENTOML_HOME (tiny synthetic models, baked in), then runs it twice with
`buildah run --isolation chroot --network host`, the image and state folders mounted:
- as Kubernetes does (the entrypoint serves the Bento and its baked models), and
- with a *fresh* tiny store, made on the host by `sdxl-bento models synth`, mounted as the model store
  (the answer must name the mounted model).
Each run: /readyz, one 256x256 image through POST /txt2img, then a graceful stop with nothing left running.

Needs root, buildah and debootstrap (apt-get install buildah debootstrap); skipped without them.
SDXL_BENTO_TEST_IMAGE=<image> runs an image built beforehand instead. Timings go to
test-artifacts/container-smoke.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from io import BytesIO
from pathlib import Path

import httpx
import pytest

from .conftest import wait_ready

REPO = Path(__file__).resolve().parents[2]
DRIVER = os.environ.get("SDXL_BENTO_STORAGE_DRIVER", "vfs")
BUILDAH = shutil.which("buildah")
SOURCES = ("bentofile.yaml", "pyproject.toml", "service.py", "README.md", "scripts/containerize", "scripts/base-image",
           "requirements/cpu.txt")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.skipif(BUILDAH is None or shutil.which("debootstrap") is None,
                       reason="needs buildah and debootstrap (Debian/Ubuntu: apt-get install buildah debootstrap)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (debootstrap, buildah's chroot isolation)"),
]


def buildah(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([BUILDAH, "--storage-driver", DRIVER, *args], capture_output=True, text=True, **kwargs)


def source_hash() -> str:
    digest = hashlib.sha256()
    files = [REPO / f for f in SOURCES] + sorted((REPO / "sdxl_bento").rglob("*"))
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def record(**values) -> None:
    out = REPO / "test-artifacts" / "container-smoke.json"
    out.parent.mkdir(exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**old, **values}, indent=2) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image(bentoml_home, tmp_path_factory) -> str:
    if os.environ.get("SDXL_BENTO_TEST_IMAGE"):
        return os.environ["SDXL_BENTO_TEST_IMAGE"]
    name = f"localhost/sdxl-bento:smoke-{source_hash()}"
    if buildah("inspect", "--type", "image", name).returncode == 0:
        record(image=name, reused=True)
        return name
    log = tmp_path_factory.mktemp("containerize") / "containerize.log"
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "SDXL_BENTO_PYTHON": sys.executable,
           "SDXL_BENTO_STORAGE_DRIVER": DRIVER}
    start = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(["bash", "scripts/containerize", "--local", "-t", name], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    build_s = time.monotonic() - start
    assert done.returncode == 0, log.read_text()[-6000:]
    size = buildah("images", "--format", "{{.Size}}", name).stdout.strip()
    record(image=name, reused=False, containerize_s=round(build_s, 1), image_size=size)
    # older smoke images (other sources) go: with the vfs driver each holds its full size on disk
    listed = buildah("images", "--format", "{{.Name}}:{{.Tag}}").stdout.split()
    for old in listed:
        if old.startswith("localhost/sdxl-bento:smoke-") and old != name:
            buildah("rmi", old)
    return name


@pytest.fixture
def mounted_store(tmp_path) -> tuple[Path, str]:
    """A fresh tiny store, made on the host by the project's own command: the container must serve it."""
    home = tmp_path / "bentoml-home"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "models", "synth", "--preset", "tiny", "--refiner"],
                   check=True, cwd=REPO, env=env, capture_output=True, timeout=600)
    (version,) = [p.name for p in (home / "models" / "sdxl-base").iterdir() if p.is_dir()]
    # BentoML saves each model folder 0700; the container's user (uid 1034) must read the store
    subprocess.run(["chmod", "-R", "a+rX", str(home / "models")], check=True)
    return home / "models", f"sdxl-base:{version}"


def _marked(token: str) -> list[int]:
    """Processes started with SDXL_BENTO_SMOKE=<token> in their environment (the ones this test started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"SDXL_BENTO_SMOKE={token}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def _stop(proc: subprocess.Popen, token: str) -> None:
    """SIGTERM to BentoML's processes inside (its arbiter stops its worker gracefully), then to buildah;
    SIGKILL for whatever is left. BentoML's worker runs in a session of its own, so killing buildah's
    process group alone would leave it running."""
    for pid in _marked(token):
        os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)
    deadline = time.monotonic() + 30
    while _marked(token) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _marked(token):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def container(image):
    """One working container of the image for the runs below (with the vfs driver a container is a full copy)."""
    start = time.monotonic()
    ctr = buildah("from", "--name", f"sdxl-smoke-{uuid.uuid4().hex[:8]}", image, timeout=600)
    assert ctr.returncode == 0, ctr.stderr
    name = ctr.stdout.strip().splitlines()[-1]
    record(buildah_from_s=round(time.monotonic() - start, 1))
    yield name
    buildah("rm", name, timeout=300)


@pytest.fixture
def data_dirs(tmp_path) -> Path:
    """The image store and state folders, mounted at /data, owned by the image's bentoml user (uid 1034)."""
    data = tmp_path / "data"
    for sub in ("images", "state"):
        (data / sub).mkdir(parents=True)
        os.chown(data / sub, 1034, 1034)
    os.chown(data, 1034, 1034)
    return data


@contextlib.contextmanager
def serving(container: str, argv: list[str], volumes: list[str], log: Path):
    """Run argv in the container on the host's network; yield the URL once /readyz answers; stop it."""
    port, token = free_port(), uuid.uuid4().hex
    env = {"SDXL_BENTO_DEVICE": "cpu", "SDXL_BENTO_IMAGE_DIR": "/data/images", "SDXL_BENTO_STATE_DIR": "/data/state",
           "TQDM_DISABLE": "1", "SDXL_BENTO_SMOKE": token}
    cmd = [BUILDAH, "--storage-driver", DRIVER, "run", "--isolation", "chroot", "--network", "host"]
    for volume in volumes:
        cmd += ["--volume", volume]
    for key, value in env.items():
        cmd += ["--env", f"{key}={value}"]
    cmd += [container, "--", *argv, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        ready_s = wait_ready(url, proc, log, timeout=300)
        record(**{f"ready_s_{argv[0].rsplit('/', 1)[-1]}": round(ready_s, 1)})
        yield url
    finally:
        _stop(proc, token)
    assert not _marked(token), "processes of the container are still running"


def _txt2img(url: str, data: Path) -> httpx.Response:
    from PIL import Image

    res = httpx.post(f"{url}/txt2img", timeout=120, json={
        "prompt": "a red fox in the snow", "width": 256, "height": 256, "steps": 2, "seed": 7})
    assert res.status_code == 200, res.text
    assert Image.open(BytesIO(res.content)).size == (256, 256)
    assert res.headers["seed"] == "7"
    stored = sorted(p.suffix for p in (data / "images").glob(f"{res.headers['x-image-id']}.*"))
    assert stored == [".json", ".png"]  # the image and its owner's sidecar, written through the mounted folder
    return res


def test_image_runs_exactly_the_cpu_lock(container):
    """The image's environment is requirements/cpu.txt: every locked package at its version, nothing else."""
    import re

    script = ("import importlib.metadata as m, json; "
              "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    done = buildah("run", "--isolation", "chroot", container, "--", "/app/.venv/bin/python", "-c", script, timeout=300)
    assert done.returncode == 0, done.stderr
    canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    installed = {canon(n): v for n, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    lock = (REPO / "requirements" / "cpu.txt").read_text()
    locked = {canon(n): v for n, v in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock, flags=re.M)}
    assert installed == locked


def test_image_serves_its_baked_bento(container, data_dirs, tmp_path):
    """The image as Kubernetes runs it: the entrypoint serves the Bento with the models inside the image."""
    argv = ["/home/bentoml/bento/env/docker/entrypoint.sh", "serve"]
    with serving(container, argv, [f"{data_dirs}:/data"], tmp_path / "container.log") as url:
        res = _txt2img(url, data_dirs)
        assert res.headers["x-model"].startswith("sdxl-base:")
        assert "sdxl_queue_depth" in httpx.get(f"{url}/metrics", timeout=10).text  # the HPA's metric


def test_image_serves_a_mounted_model_store(container, mounted_store, data_dirs, tmp_path):
    """The mounted-models path: a model store volume at /home/bentoml/models (the image's BENTOML_HOME) and
    `bentoml serve service:SDXL` on the code in the image, which resolves sdxl-base:latest in that store."""
    models, base_tag = mounted_store
    argv = ["/app/.venv/bin/bentoml", "serve", "service:SDXL", "--working-dir", "/home/bentoml/bento/src"]
    volumes = [f"{models}:/home/bentoml/models:ro", f"{data_dirs}:/data"]
    with serving(container, argv, volumes, tmp_path / "container.log") as url:
        res = _txt2img(url, data_dirs)
        assert res.headers["x-model"] == base_tag  # the mounted store's model, not the one baked in
