"""The benchmark harness itself, on the tiny model: it runs both sides, checks the same function, and reports
every figure BENCHMARKS.md records (timings here are not checked: speed is measured, not asserted)."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_engine_benchmark_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "bench/engine.py", "--preset", "tiny", "--size", "256", "--steps", "4",
                           "--repeats", "1", "--batches", "1,2", "--compile", "off", "--ready", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["same_function"]["ok"] and result["same_function"]["latent_relative_error"] < 1e-2
    assert result["same_function"]["pixel_max_abs_diff"] <= 1  # same device, same dtype: the same pixels
    for name in ("reference", "ours", "ours_deepcache_APPROXIMATE"):
        figures = result[name]
        assert figures["latency_s"] > 0 and set(figures["images_per_s"]) == {"1", "2"}
        assert figures["best_batch"] in (1, 2)
    assert result["deepcache_APPROXIMATE"]["latent_relative_error"] > 0  # approximate, and reported as such
    assert set(result["ready_s"]["fresh_process"]) == {"cold", "warm"}
    assert set(result["ratio_ours_over_reference"]) == {"ours", "ours_deepcache_APPROXIMATE"}
    assert result["command"].startswith("bench/engine.py --preset tiny")
