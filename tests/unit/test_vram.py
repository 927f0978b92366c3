"""Memory-aware admission and OOM recovery, on the CPU: a real CUDA OOM cannot happen here, so the
OOM is injected (and is_cuda_oom is checked against torch's real exception type)."""

from __future__ import annotations

import logging

import pytest
import torch

from sdxl_bento.errors import ServiceError
from sdxl_bento.gpu.vram import (
    REFERENCE_PEAKS_BYTES,
    REFERENCE_WEIGHTS_BYTES,
    SDXL_FP16,
    GiB,
    MemoryModel,
    OutOfMemory,
    VramBudget,
    is_cuda_oom,
    run_with_oom_retry,
)


def test_estimate_is_monotonic():
    m = SDXL_FP16
    for images in range(1, 8):
        assert m.estimate(1024, 1024, images + 1, False) > m.estimate(1024, 1024, images, False)
    assert m.estimate(1024, 1024, 2, False) > m.estimate(1024, 768, 2, False) > m.estimate(768, 768, 2, False)
    assert m.estimate(1024, 1024, 2, True) > m.estimate(1024, 1024, 2, False)
    assert m.estimate(1024, 1024, 2, True) == pytest.approx(1.25 * m.estimate(1024, 1024, 2, False), rel=1e-9)


@pytest.mark.parametrize("images", [1, 4])
def test_calibration_reproduces_the_reference_points(images):
    peak = REFERENCE_WEIGHTS_BYTES + SDXL_FP16.estimate(1024, 1024, images, False)
    assert peak == pytest.approx(REFERENCE_PEAKS_BYTES[images], rel=0.05)
    assert REFERENCE_PEAKS_BYTES == {1: int(13.3 * GiB), 4: int(20.4 * GiB)}
    assert SDXL_FP16.bytes_per_pixel_image == pytest.approx(2423.47, abs=0.01)
    assert SDXL_FP16.fixed_bytes / GiB == pytest.approx(4.0333, abs=1e-3)


SIMPLE = MemoryModel(bytes_per_pixel_image=1.0, fixed_bytes=100)   # 1024x1024: 100 + 1 Mi per image


def test_fits_and_max_images():
    budget = VramBudget(100 + 3 * 1024 * 1024, SIMPLE)
    assert budget.fits(1024, 1024, 3, False) and not budget.fits(1024, 1024, 4, False)
    assert budget.max_images(1024, 1024, False) == 3
    assert budget.max_images(512, 512, False) == 12
    assert budget.max_images(1024, 1024, True) == 2           # x1.25
    assert VramBudget(50, SIMPLE).max_images(1024, 1024, False) == 0
    h100 = VramBudget(int(0.9 * (80 * GiB - REFERENCE_WEIGHTS_BYTES)), SDXL_FP16)
    n = h100.max_images(1024, 1024, False)
    assert h100.fits(1024, 1024, n, False) and not h100.fits(1024, 1024, n + 1, False) and n == 26   # (65.8 - 4.03) / 2.37


def test_no_limit():
    budget = VramBudget(None, SDXL_FP16)
    assert budget.fits(2048, 2048, 1000, True)
    assert budget.max_images(1024, 1024, True) >= 1 << 31
    assert budget.split([8, 8, 8], 1024, 1024, False) == [[0, 1, 2]]


def test_split_respects_budget_and_order():
    budget = VramBudget(100 + 4 * 1024 * 1024, SIMPLE)               # 4 images of 1024x1024
    counts = [1, 2, 1, 3, 6, 1, 1]
    groups = budget.split(counts, 1024, 1024, False)
    assert groups == [[0, 1, 2], [3], [4], [5, 6]]
    assert [i for g in groups for i in g] == list(range(len(counts)))    # every request, in order
    for group in groups:
        images = sum(counts[i] for i in group)
        assert budget.fits(1024, 1024, images, False) or len(group) == 1  # too big alone: its own group
    assert budget.split([], 1024, 1024, False) == []
    assert budget.split([2, 2], 1024, 1024, True) == [[0], [1]]        # the refiner needs more


def test_measure_without_cuda_is_no_limit():
    assert not torch.cuda.is_available()
    assert VramBudget.measure(SDXL_FP16).budget_bytes is None


def test_measure_takes_free_memory_times_headroom(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=0: (60 * GiB, 80 * GiB))
    budget = VramBudget.measure(SDXL_FP16, headroom=0.9)
    assert budget.budget_bytes == int(54 * GiB)
    with pytest.raises(ValueError):
        VramBudget.measure(SDXL_FP16, headroom=0)


class FakeGpu:
    """Runs items (image counts) as one batch; "OOMs" when the batch holds more than `capacity` images."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.calls: list[list[int]] = []
        self.frees = 0

    def run(self, items: list[int]) -> list[str]:
        self.calls.append(list(items))
        if sum(items) > self.capacity:
            raise MemoryError(f"fake OOM: {sum(items)} images")
        return [f"result-{item}-{len(self.calls)}" for item in items]

    def free(self) -> None:
        self.frees += 1


def retry(gpu: FakeGpu, items: list[int]):
    return run_with_oom_retry(gpu.run, items, sizes=lambda n: n, is_oom=lambda e: isinstance(e, MemoryError),
                              free=gpu.free)


def test_no_oom_runs_once():
    gpu = FakeGpu(capacity=8)
    assert len(retry(gpu, [1, 2, 3])) == 3
    assert gpu.calls == [[1, 2, 3]] and gpu.frees == 0


def test_oom_retries_in_halves_in_order():
    gpu = FakeGpu(capacity=3)
    items = [1, 1, 1, 1, 2, 1]
    results = retry(gpu, items)
    assert [r.split("-")[1] for r in results] == ["1", "1", "1", "1", "2", "1"]   # complete, in order
    assert gpu.calls == [[1, 1, 1, 1, 2, 1],      # 7 images: OOM
                         [1, 1, 1, 1],            # first half by images (4): OOM
                         [1, 1], [1, 1],          # fit
                         [2, 1]]                  # second half (3): fits
    assert gpu.frees == 2


def test_a_multi_image_item_is_never_split():
    gpu = FakeGpu(capacity=4)
    results = retry(gpu, [4, 1, 1])
    assert len(results) == 3
    assert gpu.calls == [[4, 1, 1], [4], [1, 1]]


def test_single_oversize_item_is_out_of_memory_and_others_are_lost_only_with_it():
    gpu = FakeGpu(capacity=3)
    with pytest.raises(OutOfMemory) as info:
        retry(gpu, [1, 5, 1])
    error = info.value
    assert isinstance(error, ServiceError)
    assert (error.status, error.type, error.retry_after) == (503, "out_of_memory", 30)
    assert "5 image" in error.message
    assert error.headers() == {"Retry-After": "30"}
    assert error.__cause__ is None                  # the OOM's traceback (its tensors) is not kept alive
    assert gpu.frees >= 2


def test_single_item_gets_one_retry_after_free():
    gpu = FakeGpu(capacity=2)
    with pytest.raises(OutOfMemory):
        retry(gpu, [3])
    assert gpu.calls == [[3], [3]] and gpu.frees == 2

    class Flaky(FakeGpu):   # fragmentation: fails once, fits after the cache is emptied
        def run(self, items):
            if self.frees == 0:
                self.calls.append(list(items))
                raise MemoryError("fragmented")
            return super().run(items)

    flaky = Flaky(capacity=8)
    assert len(retry(flaky, [3])) == 1 and flaky.frees == 1


def test_other_errors_propagate_without_retry():
    gpu = FakeGpu(capacity=8)

    def run(items):
        gpu.calls.append(items)
        raise ValueError("not an OOM")

    with pytest.raises(ValueError):
        run_with_oom_retry(run, [1, 2], sizes=lambda n: n, is_oom=lambda e: isinstance(e, MemoryError),
                           free=gpu.free)
    assert len(gpu.calls) == 1 and gpu.frees == 0


def test_oom_is_logged(caplog):
    gpu = FakeGpu(capacity=1)
    with caplog.at_level(logging.WARNING, logger="sdxl_bento.gpu.vram"):
        retry(gpu, [1, 1])
    assert "out of GPU memory on a batch of 2 requests" in caplog.text


def test_is_cuda_oom():
    assert is_cuda_oom(torch.cuda.OutOfMemoryError("x"))
    assert is_cuda_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_cuda_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_cuda_oom(RuntimeError("expected scalar type Half"))
    assert not is_cuda_oom(ValueError("out of memory"))


def test_default_path_uses_is_cuda_oom_and_free_cuda_memory():
    calls = []

    def run(items):
        calls.append(list(items))
        if len(items) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return items

    assert run_with_oom_retry(run, ["a", "b"], sizes=lambda _: 1) == ["a", "b"]   # free_cuda_memory on CPU: gc only
    assert calls == [["a", "b"], ["a"], ["b"]]
