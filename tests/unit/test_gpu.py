"""GPU telemetry and the temperature throttle, on the CPU: injected readings and a fake clock."""

from __future__ import annotations

import logging
import math

import pytest

from sdxl_bento.gpu.thermal import GpuReading, NvmlSource, StaticSource, Throttle, ThrottleState, gpu_metrics


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def reading(temperature_c: float, index: int = 0, **fields) -> GpuReading:
    values = dict(index=index, name="NVIDIA H100 80GB HBM3", temperature_c=temperature_c, utilization_pct=97.0,
                  memory_used_bytes=20 << 30, memory_total_bytes=80 << 30, power_w=612.5, sm_clock_mhz=1980.0,
                  mem_clock_mhz=2619.0)
    values.update(fields)
    return GpuReading(**values)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def step(throttle: Throttle, source: StaticSource, clock: FakeClock, *temperatures: float) -> ThrottleState:
    """Set the GPUs' temperatures, let interval_s pass, update."""
    source.set([reading(t, index=i) for i, t in enumerate(temperatures)])
    clock.t += throttle.interval_s
    return throttle.update()


def test_hysteresis_normal_slow_paused_slow_normal(clock):
    source = StaticSource()
    throttle = Throttle(source, clock=clock)
    assert throttle.state is ThrottleState.normal
    assert step(throttle, source, clock, 70) is ThrottleState.normal
    assert step(throttle, source, clock, 80) is ThrottleState.normal   # between resume and slow: stays
    assert step(throttle, source, clock, 83) is ThrottleState.normal   # "above" is strict
    assert step(throttle, source, clock, 84) is ThrottleState.slow
    assert step(throttle, source, clock, 80) is ThrottleState.slow     # no flapping back at 80
    assert step(throttle, source, clock, 84) is ThrottleState.slow
    assert step(throttle, source, clock, 80) is ThrottleState.slow
    assert step(throttle, source, clock, 91) is ThrottleState.paused
    assert step(throttle, source, clock, 86) is ThrottleState.paused   # still above slow_above_c
    assert step(throttle, source, clock, 83) is ThrottleState.slow     # at or below slow_above_c
    assert step(throttle, source, clock, 78) is ThrottleState.slow     # resume is strict
    assert step(throttle, source, clock, 77.5) is ThrottleState.normal
    assert step(throttle, source, clock, 80) is ThrottleState.normal


def test_normal_straight_to_paused_and_back_when_cool(clock):
    source = StaticSource()
    throttle = Throttle(source, clock=clock)
    assert step(throttle, source, clock, 95) is ThrottleState.paused
    assert step(throttle, source, clock, 60) is ThrottleState.normal   # cool: both conditions hold at once


def test_the_hottest_gpu_decides(clock):
    source = StaticSource()
    throttle = Throttle(source, clock=clock)
    assert step(throttle, source, clock, 50, 85, 60) is ThrottleState.slow
    assert throttle.status()["max_temperature_c"] == 85


def test_batch_limit_per_state(clock):
    source = StaticSource()
    throttle = Throttle(source, clock=clock)
    assert [throttle.batch_limit(n) for n in (8, 4, 1)] == [8, 4, 1]
    step(throttle, source, clock, 85)
    assert [throttle.batch_limit(n) for n in (8, 4, 3, 1)] == [4, 2, 1, 1]
    step(throttle, source, clock, 92)
    assert [throttle.batch_limit(n) for n in (8, 1)] == [0, 0]


def test_readings_are_cached_within_interval(clock):
    source = StaticSource([reading(70)])
    throttle = Throttle(source, clock=clock, interval_s=2.0)
    assert throttle.update() is ThrottleState.normal and source.reads == 1
    source.set([reading(95)])
    clock.t += 1.9
    assert throttle.update() is ThrottleState.normal and source.reads == 1   # cached
    clock.t += 0.1
    assert throttle.update() is ThrottleState.paused and source.reads == 2


def test_no_gpu_is_always_normal(clock):
    source = StaticSource()
    throttle = Throttle(source, clock=clock)
    assert step(throttle, source, clock) is ThrottleState.normal
    assert throttle.batch_limit(8) == 8
    assert throttle.status() == {"state": "normal", "max_temperature_c": None, "since_s": 2.0}
    # Readings that vanish (NVML failing) must not leave the service paused.
    assert step(throttle, source, clock, 95) is ThrottleState.paused
    assert step(throttle, source, clock) is ThrottleState.normal


def test_status_reports_state_and_time_in_it(clock):
    source = StaticSource()
    throttle = Throttle(source, clock=clock)
    step(throttle, source, clock, 85)
    clock.t += 5
    assert throttle.status() == {"state": "slow", "max_temperature_c": 85.0, "since_s": 5.0}


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError):
        Throttle(StaticSource(), slow_above_c=85, pause_above_c=80)
    with pytest.raises(ValueError):
        Throttle(StaticSource(), resume_below_c=84, slow_above_c=83)


def test_nvml_open_without_a_gpu_is_none(caplog):
    """This machine has no NVIDIA driver: absent, cleanly, with one INFO line (skips on a GPU machine)."""
    with caplog.at_level(logging.INFO, logger="sdxl_bento.gpu.thermal"):
        source = NvmlSource.open()
    if source is not None:  # a machine with a driver: the real readings must be well-formed
        try:
            readings = source.read()
            assert readings and all(r.memory_total_bytes > 0 for r in readings)
        finally:
            source.close()
        pytest.skip("NVML is available here")
    assert "no NVIDIA GPU / NVML: telemetry absent" in caplog.text


class _FakeNvml:
    """The pynvml calls NvmlSource makes, for one GPU whose board does not report power."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_ERROR_NOT_SUPPORTED = 0, 1, 2, 3

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

    class _Memory:
        used, total = 7 << 30, 80 << 30

    class _Utilization:
        gpu = 42

    def __init__(self) -> None:
        self.broken = False

    def nvmlDeviceGetCount(self):
        if self.broken:
            raise self.NVMLError(999)
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 61

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self._Utilization()

    def nvmlDeviceGetMemoryInfo(self, handle):
        return self._Memory()

    def nvmlDeviceGetPowerUsage(self, handle):
        raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetClockInfo(self, handle, which):
        return {self.NVML_CLOCK_SM: 1980, self.NVML_CLOCK_MEM: 2619}[which]


def test_nvml_source_maps_fields_and_logs_a_failure_once(caplog):
    nvml = _FakeNvml()
    source = NvmlSource(nvml)
    assert source.read() == [GpuReading(index=0, name="NVIDIA H100 80GB HBM3", temperature_c=61.0,
                                        utilization_pct=42.0, memory_used_bytes=7 << 30,
                                        memory_total_bytes=80 << 30, power_w=None, sm_clock_mhz=1980.0,
                                        mem_clock_mhz=2619.0)]
    nvml.broken = True
    with caplog.at_level(logging.WARNING, logger="sdxl_bento.gpu.thermal"):
        assert source.read() == [] and source.read() == []
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    nvml.broken = False
    assert len(source.read()) == 1


def test_gpu_metrics_gauges():
    from prometheus_client import REGISTRY

    metrics = gpu_metrics()
    assert gpu_metrics() is metrics   # one per process: gauges register once
    metrics.update([reading(72.0, index=0), reading(88.0, index=1, power_w=None, utilization_pct=math.nan)],
                   ThrottleState.slow)

    def value(name: str, gpu: str | None = None):
        return REGISTRY.get_sample_value(name, {"gpu": gpu} if gpu is not None else {})

    assert value("sdxl_gpu_temperature_celsius", "0") == 72.0
    assert value("sdxl_gpu_temperature_celsius", "1") == 88.0
    assert value("sdxl_gpu_utilization_percent", "0") == 97.0
    assert math.isnan(value("sdxl_gpu_utilization_percent", "1"))
    assert value("sdxl_gpu_memory_used_bytes", "0") == 20 << 30
    assert value("sdxl_gpu_memory_total_bytes", "1") == 80 << 30
    assert value("sdxl_gpu_power_watts", "0") == 612.5
    assert value("sdxl_gpu_power_watts", "1") is None          # not reported: no series
    assert value("sdxl_gpu_sm_clock_mhz", "0") == 1980.0
    assert value("sdxl_gpu_mem_clock_mhz", "1") == 2619.0
    assert value("sdxl_gpu_throttle_state") == 1.0
    metrics.update([], ThrottleState.paused)
    assert value("sdxl_gpu_throttle_state") == 2.0
