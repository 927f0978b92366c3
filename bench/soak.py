"""Soak: thousands of tasks through a served tiny model, with short retention; memory and disk must stay flat.

    .venv/bin/python bench/soak.py --tasks 3000 --clients 4 --out soak.json

Starts `bentoml serve` on the tiny synthetic SDXL in a temporary BENTOML_HOME (made by the project's own
command), with retention at its minimum (images and ended tasks kept 60 s, swept every 5 s, the image store
bounded to a few MiB), then submits tasks (256x256, one step) from several clients, polls each to its end
and fetches its answer. Every `--sample-every` tasks it records the worker's RSS, the bytes of the image
store, of the task journal, of the audit log (bounded by its rotation, not by retention) and of BentoML's task
database, and the journal's row count. The
summary compares the first and last thirds of the run: flat means the last third is not above the first.
Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def rows(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
    except sqlite3.Error:
        return -1


def serve(home: Path, root: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_BENTO_")}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", SDXL_BENTO_DEVICE="cpu",
               SDXL_BENTO_IMAGE_DIR=str(root / "images"), SDXL_BENTO_STATE_DIR=str(root / "state"),
               SDXL_BENTO_IMAGE_RETENTION_S="60", SDXL_BENTO_TASK_RETENTION_S="60",
               SDXL_BENTO_RETENTION_SWEEP_S="5", SDXL_BENTO_IMAGE_STORE_MAX_BYTES=str(4 * 2**20),
               SDXL_BENTO_MAX_CONCURRENCY="64", SDXL_BENTO_CACHE="false", TQDM_DISABLE="1")
    log = open(root / "server.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service:SDXL", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not get ready")


def worker_rss(proc: subprocess.Popen) -> int:
    return sum(child.memory_info().rss for child in psutil.Process(proc.pid).children(recursive=True)
               if "_bentoml_impl.worker" in " ".join(child.cmdline()))


def run(tasks: int, clients: int, sample_every: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="sdxl-soak-"))
    home = root / "bentoml-home"
    subprocess.run([sys.executable, "-m", "sdxl_bento.cli.main", "models", "synth", "--preset", "tiny"], check=True,
                   cwd=REPO, env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"},
                   capture_output=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(home, root, port)
    samples: list[dict] = []
    failures: list[str] = []
    done = 0
    lock = threading.Lock()
    started = time.monotonic()
    try:
        wait_ready(url, proc)
        counter = iter(range(tasks))

        def client() -> None:
            nonlocal done
            with httpx.Client(base_url=url, timeout=60) as http:
                for i in counter:
                    try:
                        task_id = http.post("/jobs/submit", json={"prompt": f"soak {i}", "width": 256,
                                                                  "height": 256, "steps": 1}).json()["task_id"]
                        while http.get("/jobs/status", params={"task_id": task_id}).json()["status"] == "in_progress":
                            time.sleep(0.02)
                        answer = http.get("/jobs/get", params={"task_id": task_id})
                        if answer.status_code != 200:
                            failures.append(f"{task_id}: {answer.status_code} {answer.text[:200]}")
                    except (httpx.HTTPError, KeyError, ValueError) as exc:
                        failures.append(repr(exc))
                    with lock:
                        done += 1
                        if done % sample_every == 0:
                            samples.append({
                                "tasks": done, "seconds": round(time.monotonic() - started, 1),
                                "worker_rss_mib": round(worker_rss(proc) / 2**20, 1),
                                "image_store_mib": round(folder_bytes(root / "images") / 2**20, 2),
                                "journal_mib": round(sum(p.stat().st_size for p in (root / "state").glob("tasks.db*"))
                                                     / 2**20, 2),
                                "audit_log_mib": round(sum(p.stat().st_size for p in (root / "state").glob("audit*"))
                                                       / 2**20, 2),
                                "bentoml_task_db_mib": round(sum(folder_bytes(p) if p.is_dir() else p.stat().st_size
                                                                 for p in home.glob("task_result.db*")) / 2**20, 2),
                                "journal_rows": rows(root / "state" / "tasks.db"),
                            })

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    third = max(1, len(samples) // 3)

    def trend(name: str) -> dict:
        first, last = [s[name] for s in samples[:third]], [s[name] for s in samples[-third:]]
        return {"first_third_median": statistics.median(first), "last_third_median": statistics.median(last),
                "max": max(s[name] for s in samples)}

    names = ("worker_rss_mib", "image_store_mib", "journal_mib", "audit_log_mib", "bentoml_task_db_mib",
             "journal_rows")
    return {"command": " ".join(sys.argv), "python": platform.python_version(), "tasks": tasks, "clients": clients,
            "seconds": round(time.monotonic() - started, 1), "failures": len(failures),
            "failure_examples": failures[:5], "trends": {n: trend(n) for n in names}, "samples": samples}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run(args.tasks, args.clients, args.sample_every)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
