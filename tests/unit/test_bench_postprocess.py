"""The after-the-GPU benchmark harness (bench/postprocess.py), at tiny sizes with one repetition: it runs every part,
including a real served /txt2img, and its JSON holds every figure BENCHMARKS.md records (timings are measured, not
asserted)."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

TIMING = {"median_ms", "p90_ms", "min_ms", "max_ms", "n"}


def timing(figure):
    assert TIMING <= set(figure), figure
    assert figure["n"] >= 1 and 0 <= figure["min_ms"] <= figure["median_ms"] <= figure["p90_ms"] <= figure["max_ms"]
    return figure


def test_postprocess_benchmark_reports_every_figure(tmp_path):
    out = tmp_path / "postprocess.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_BENTO_")}
    env["BENTOML_HOME"] = str(tmp_path / "home")
    command = ["bench/postprocess.py", "--size", "256", "--batch", "2", "--repeats", "1", "--heavy-repeats", "1",
               "--checker", "tiny", "--http-sizes", "256", "--http-watermark", "off", "--out", str(out)]
    done = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result  # the same document on stdout

    assert result["command"].startswith("bench/postprocess.py --size 256")
    assert result["machine"]["cpu"] and result["machine"]["cores"] >= 1
    for package in ("python", "pillow", "torch", "numpy", "diffusers", "transformers", "bentoml"):
        assert result["versions"][package], package
    assert result["size"] == 256 and result["batch"] == 2 and result["repeats"] == 1

    image = result["test_image"]
    assert image["contrast_flat_png_level_6_bytes"] < image["png_level_6_bytes"] < \
        image["contrast_uniform_noise_png_level_6_bytes"]  # natural-looking: between flat and noise
    assert image["in_issue_range_1.5_to_2.5_MB"] is None  # only judged at 1024x1024

    for n in (1, 2):
        assert len(result["tensor_to_pil"][f"batch_{n}"]) == 3
        for figure in result["tensor_to_pil"][f"batch_{n}"].values():
            timing(figure)

    encode = result["encode"]
    for name in [f"png_level_{level}" for level in range(10)] + [
            "png_level_1_rle", "png_huffman_only", "service_png (images.encode)", "jpeg_q90 (images.encode)",
            "webp_q90 (images.encode)"]:
        assert timing(encode[name])["bytes"] > 0, name
        assert encode[name]["bytes_vs_png_level_6"] > 0
    assert encode["png_level_6"]["bytes_vs_png_level_6"] == 1.0
    assert encode["png_level_0"]["bytes"] > encode["png_level_1"]["bytes"]  # level 0 stores, does not compress
    assert encode["service_png_encoding"] == "level 6, Z_RLE"  # the service's PNG: Pillow's level, run-length
    assert encode["png_level_1_rle_lossless"] is True
    assert set(result["encode_batch"]) == {f"png_level_{v}_{how}" for v in ("6", "1", "1_rle")
                                           for how in ("serial", "threads")}
    for figure in result["encode_batch"].values():
        timing(figure)

    store = result["store"]
    for name in ("png_level_6", "png_level_1", "jpeg_q90"):
        assert timing(store[name])["bytes"] > 0
    assert store["filesystem"]

    watermark = result["watermark"]
    for name in ("watermarker_batch_1", "watermarker_batch_2", "vectorized_batch_1", "vectorized_batch_2"):
        timing(watermark[name])
    assert watermark["vectorized_identical"] and watermark["vectorized_max_abs_pixel_diff"] == 0
    assert 0 < watermark["watermark_changed_pixels_share"] < 1  # it did mark the 256x256 image

    safety = result["safety_check"]
    assert {"tiny_sd_checker (tests' synthetic)", "tiny_classifier (tests' synthetic)"} <= set(safety)
    for name, figures in safety.items():
        if not isinstance(figures, dict):
            continue
        assert figures["parameters"] > 0
        for n in (1, 2):
            for part in (f"preprocess_batch_{n}", f"review_batch_{n}", f"review_batch_{n}_torch_1_thread"):
                timing(figures[part])

    gil = result["gil"]
    for name in ("png_level_6", "png_level_1", "png_level_1_rle", "jpeg_q90", "watermarker", "watermark_vectorized",
                 "review tiny_sd_checker (tests' synthetic)", "control: hashlib.sha256 of 16 MB (releases the GIL)",
                 "control: a pure-Python loop (shares the GIL)",
                 "control: sorted() of 400k floats (holds the GIL in C)"):
        assert set(gil[name]) == {"other_thread_speed", "stalled_share"}, name
        assert 0 <= gil[name]["stalled_share"] <= 1

    hop = result["scheduler_hop"]
    assert timing(hop["submit_to_future_thread_wait"])["n"] >= 50
    assert timing(hop["submit_to_future_event_loop (Generation.wait)"])["n"] >= 50

    manifest = result["manifest"]
    assert [name.split(" (")[0] for name in manifest if name != "record_bytes"] == ["png", "jpeg", "webp"]
    for name, figure in manifest.items():
        if name != "record_bytes":
            timing(figure)
    assert 1000 < manifest["record_bytes"] < 20_000

    for n in (1, 2):
        store_path = result["generation_store"][f"batch_{n}"]
        assert [name.split(" (")[0] for name in store_path] == [
            "today_synthetic", "today_real", "today_real_manifest", "cheaper_serial", "cheaper_parallel",
            "save_after_answer"]
        for figure in store_path.values():
            timing(figure)

    http = result["http"]["watermark_off"]
    assert http["ready_s"] > 0
    served = http["256x256"]
    for part in ("total", "headers", "body", "queue", "generate", "outside"):
        timing(served[part])
    assert served["total"]["median_ms"] >= served["generate"]["median_ms"]
    assert served["response_bytes"] > 0
    timing(served["served_image_png_level_6_encode"])

    summary = result["summary"]
    for name in ("png_level_6_ms", "png_level_1_ms", "png_level_1_bytes_vs_level_6", "png_level_1_rle_ms",
                 "png_level_1_rle_bytes_vs_level_6", "store_save_png_level_6_ms",
                 "watermarker_ms", "watermark_vectorized_ms", "numpy_to_pil_ms", "scheduler_hop_event_loop_ms",
                 "http_watermark_off_256x256_outside_generation_ms"):
        assert summary[name] > 0, name
    assert "generation_store_batch_1_today_real_share_of_0.9s" in summary
    assert "generation_store_batch_2_cheaper_parallel_ms" in summary
