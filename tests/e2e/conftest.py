"""Start the real service (``bentoml serve`` in a subprocess) on the tiny synthetic models."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> float:
    """Seconds until ``/readyz`` answers 200; fails with the log's tail if the process exits or time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not ready in {timeout} s:\n{log.read_text()[-6000:]}")


class Server:
    def __init__(self, env: dict[str, str], log: Path, replica: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if replica:  # other replicas reach this one at its own URL
            env = {**env, "SDXL_BENTO_REPLICA_URL": self.url}
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service:SDXL", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        wait_ready(self.url, self.proc, self.log, timeout)

    def crash(self) -> None:
        """SIGKILL, no graceful shutdown, for the server and its workers (which run in sessions of their own)."""
        import psutil

        workers = psutil.Process(self.proc.pid).children(recursive=True)
        os.killpg(self.proc.pid, 9)
        for worker in workers:
            worker.kill()
        psutil.wait_procs(workers, timeout=30)
        self.proc.wait()
        self._log_file.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self._log_file.close()


def service_env(home: Path, images: Path, **settings: str) -> dict[str, str]:
    """The environment of a served process: its own image store and state (journal, audit) folders."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_BENTO_")}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", SDXL_BENTO_IMAGE_DIR=str(images),
               SDXL_BENTO_STATE_DIR=str(images.parent / f"{images.name}-state"), SDXL_BENTO_DEVICE="cpu",
               PYTHONUNBUFFERED="1")
    env.update({f"SDXL_BENTO_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@pytest.fixture(scope="module")
def http(server):
    """Plain HTTP to the session's service."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def private_home(shared: Path, root: Path) -> Path:
    """A BENTOML_HOME of its own (``bentoml serve`` re-creates the task database in its home at every
    start), sharing the session's model store."""
    home = root / "bentoml-home"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(shared / "models", target_is_directory=True)
    return home


@pytest.fixture(scope="session")
def server(bentoml_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    with serving(service_env(private_home(bentoml_home, root), root / "images", max_concurrency=4, concurrency=2,
                             timeout=60), root / "server.log") as srv:
        yield srv


@contextlib.contextmanager
def serving(env: dict[str, str], log: Path, **options):
    """A started, ready service, stopped at the end."""
    srv = Server(env, log, **options)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def redis_process():
    """A real redis-server on a free loopback port: (url, process). The test command installs Debian's."""
    import shutil

    import redis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/test installs it: apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.kill()
        proc.wait()
