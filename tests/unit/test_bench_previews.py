"""The preview benchmark's harness (bench/previews.py) at a tiny size: both decoders run through the service's own
preview code and every figure is there (timings are measured, not asserted)."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_previews_benchmark_reports_both_decoders(tmp_path):
    out = tmp_path / "previews.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_BENTO_")}
    done = subprocess.run([sys.executable, "bench/previews.py", "--size", "128", "--batches", "1,2", "--repeats", "2",
                           "--device", "cpu", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result
    assert result["latents"] == [4, 16, 16] and result["versions"]["torch"] and result["versions"]["diffusers"]
    for batch in (1, 2):
        figures = result[f"batch_{batch}"]
        for decoder in ("linear", "taesd_xl"):
            timing = figures[decoder]
            assert timing["n"] == 2 and 0 < timing["min_ms"] <= timing["median_ms"] <= timing["p90_ms"]
        assert figures["jpeg_bytes_linear"] > 100
