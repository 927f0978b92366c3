"""GPU telemetry (NVML) and a temperature throttle for admission.

A hot GPU clocks itself down and, past its slowdown temperature, stalls; admitting less work while it
is hot keeps latency predictable and the card out of its thermal limit. Readings come from a
``ReadingSource``: ``NvmlSource`` on a machine with an NVIDIA driver, ``StaticSource`` for tests and
injected readings. Without a GPU there are no readings, the throttle stays ``normal`` and the service
behaves exactly as before.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    temperature_c: float
    utilization_pct: float
    """NaN where the driver does not report it (for example a GPU in MIG mode)."""
    memory_used_bytes: int
    memory_total_bytes: int
    power_w: float | None
    sm_clock_mhz: float | None
    mem_clock_mhz: float | None


class ReadingSource(Protocol):
    def read(self) -> list[GpuReading]:
        """One reading per GPU; ``[]`` when there is none (or it cannot be read)."""
        ...


class StaticSource:
    """Readings set by hand: for tests, and for injecting readings from elsewhere."""

    def __init__(self, readings: list[GpuReading] | None = None) -> None:
        self._readings = list(readings or [])
        self.reads = 0
        """How many times ``read`` was called (tests check the throttle's caching with it)."""

    def set(self, readings: list[GpuReading]) -> None:
        self._readings = list(readings)

    def read(self) -> list[GpuReading]:
        self.reads += 1
        return list(self._readings)


class NvmlSource:
    """Readings of every GPU through NVML (``pynvml``, from the ``nvidia-ml-py`` package)."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._failing = False
        self._lock = threading.Lock()  # NVML is thread-safe; this keeps the log-once flag consistent

    @classmethod
    def open(cls) -> "NvmlSource | None":
        """Initialise NVML; None where there is no pynvml or no driver (telemetry is then absent, not an error)."""
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound / DriverNotLoaded, OSError
            logger.info("no NVIDIA GPU / NVML: telemetry absent (%s: %s)", exc.__class__.__name__, exc)
            return None
        return cls(pynvml)

    def driver_version(self) -> str:
        return str(self._nvml.nvmlSystemGetDriverVersion())

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass

    def read(self) -> list[GpuReading]:
        """Read every GPU; an NVML error is logged once per run of failures and gives ``[]``."""
        with self._lock:
            try:
                readings = [self._read_one(i) for i in range(self._nvml.nvmlDeviceGetCount())]
            except Exception as exc:
                if not self._failing:
                    logger.warning("reading the GPUs through NVML failed, telemetry absent until it recovers: %s: %s",
                                   exc.__class__.__name__, exc)
                self._failing = True
                return []
            if self._failing:
                logger.info("reading the GPUs through NVML works again")
                self._failing = False
            return readings

    def _read_one(self, index: int) -> GpuReading:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):  # older bindings return bytes
            name = name.decode(errors="replace")
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = self._optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        power_mw = self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        return GpuReading(
            index=index,
            name=name,
            temperature_c=float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            utilization_pct=math.nan if utilization is None else utilization,
            memory_used_bytes=int(memory.used),
            memory_total_bytes=int(memory.total),
            power_w=None if power_mw is None else power_mw / 1000.0,
            sm_clock_mhz=self._optional(lambda: float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))),
            mem_clock_mhz=self._optional(lambda: float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM))),
        )

    def _optional(self, call: Callable[[], Any]) -> Any:
        """A value the GPU may not support (power on some boards, utilization under MIG): None then."""
        try:
            return call()
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) == self._nvml.NVML_ERROR_NOT_SUPPORTED:
                return None
            raise


class ThrottleState(str, enum.Enum):
    normal = "normal"
    slow = "slow"
    paused = "paused"

    @property
    def level(self) -> int:
        """0, 1, 2: the value of the ``throttle_state`` gauge (higher is worse, so ``max`` over workers works)."""
        return _LEVELS[self]


_LEVELS = {ThrottleState.normal: 0, ThrottleState.slow: 1, ThrottleState.paused: 2}


class Throttle:
    """Slows admission when a GPU runs hot, with hysteresis.

    The hottest GPU decides. ``normal -> slow`` above ``slow_above_c``; any state ``-> paused`` above
    ``pause_above_c``; ``paused -> slow`` at or below ``slow_above_c``; ``slow -> normal`` only below
    ``resume_below_c``. Between ``resume_below_c`` and ``slow_above_c`` the state stays what it was, so a
    GPU hovering at the threshold does not flap. No readings (no GPU, or NVML failing) means ``normal``:
    absent telemetry must never stall the service.
    """

    def __init__(self, source: ReadingSource, *, slow_above_c: float = 83, pause_above_c: float = 90,
                 resume_below_c: float = 78, clock: Callable[[], float] = time.monotonic,
                 interval_s: float = 2.0) -> None:
        if not resume_below_c <= slow_above_c <= pause_above_c:
            raise ValueError("the throttle needs resume_below_c <= slow_above_c <= pause_above_c, got "
                             f"{resume_below_c}, {slow_above_c}, {pause_above_c}")
        self.source = source
        self.slow_above_c = slow_above_c
        self.pause_above_c = pause_above_c
        self.resume_below_c = resume_below_c
        self.clock = clock
        self.interval_s = interval_s
        self._state = ThrottleState.normal
        self._since = clock()
        self._read_at: float | None = None
        self._max_temperature: float | None = None
        self.readings: list[GpuReading] = []
        """The latest readings (for metrics), refreshed at most every ``interval_s``."""
        self._lock = threading.Lock()

    @property
    def state(self) -> ThrottleState:
        return self._state

    def update(self) -> ThrottleState:
        """Read the source (at most every ``interval_s``; cached otherwise) and move the state."""
        with self._lock:
            now = self.clock()
            if self._read_at is not None and now - self._read_at < self.interval_s:
                return self._state
            self._read_at = now
            self.readings = self.source.read()
            temperatures = [r.temperature_c for r in self.readings if not math.isnan(r.temperature_c)]
            self._max_temperature = max(temperatures) if temperatures else None
            new = self._next(self._state, self._max_temperature)
            if new is not self._state:
                log = logger.info if new is ThrottleState.normal else logger.warning
                log("GPU throttle %s -> %s at %s C (slow above %s C, pause above %s C, resume below %s C)",
                    self._state.value, new.value, self._max_temperature, self.slow_above_c,
                    self.pause_above_c, self.resume_below_c)
                self._state, self._since = new, now
            return self._state

    def _next(self, state: ThrottleState, t: float | None) -> ThrottleState:
        if t is None:
            return ThrottleState.normal
        if t > self.pause_above_c:
            return ThrottleState.paused
        if state is ThrottleState.paused and t <= self.slow_above_c:
            state = ThrottleState.slow
        if state is ThrottleState.normal and t > self.slow_above_c:
            state = ThrottleState.slow
        if state is ThrottleState.slow and t < self.resume_below_c:
            state = ThrottleState.normal
        return state

    def batch_limit(self, normal: int) -> int:
        """How many images (or requests) to admit into the next batch, given the limit when cool."""
        if self._state is ThrottleState.paused:
            return 0
        if self._state is ThrottleState.slow:
            return min(normal, max(1, normal // 2))
        return normal

    def status(self) -> dict[str, Any]:
        """For ``/readyz`` and the status APIs."""
        with self._lock:
            return {"state": self._state.value, "max_temperature_c": self._max_temperature,
                    "since_s": round(max(0.0, self.clock() - self._since), 3)}


@functools.cache
def gpu_metrics() -> "GpuMetrics":
    """The process's GPU gauges, created on first use (inside a worker, never at import)."""
    return GpuMetrics()


class GpuMetrics:
    """Per-GPU gauges (label ``gpu``: the NVML index) and the throttle state, on BentoML's ``/metrics``.

    Create it once per process (``gpu_metrics()``), after BentoML has set ``PROMETHEUS_MULTIPROC_DIR``;
    ``max`` over workers: every worker sees the same GPUs, the worst value is the one to show.
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Gauge

        registry = REGISTRY if registry is None else registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("gpu",)) -> Gauge:
            return Gauge(name, doc, labels, multiprocess_mode="max", registry=registry)

        self.temperature = gauge("sdxl_gpu_temperature_celsius", "GPU temperature (core sensor).")
        self.utilization = gauge("sdxl_gpu_utilization_percent", "GPU utilization over the last sample period.")
        self.memory_used = gauge("sdxl_gpu_memory_used_bytes", "GPU memory in use (all processes).")
        self.memory_total = gauge("sdxl_gpu_memory_total_bytes", "GPU memory in total.")
        self.power = gauge("sdxl_gpu_power_watts", "GPU power draw (absent where the board does not report it).")
        self.sm_clock = gauge("sdxl_gpu_sm_clock_mhz", "GPU SM clock.")
        self.mem_clock = gauge("sdxl_gpu_mem_clock_mhz", "GPU memory clock.")
        self.throttle_state = gauge("sdxl_gpu_throttle_state",
                                    "Admission throttle: 0 normal, 1 slow, 2 paused (too hot).", ())

    def update(self, readings: list[GpuReading], throttle_state: ThrottleState) -> None:
        """Set the gauges. A value the GPU does not report (None) leaves its series unset."""
        for r in readings:
            gpu = str(r.index)
            values = ((self.temperature, r.temperature_c), (self.utilization, r.utilization_pct),
                      (self.memory_used, r.memory_used_bytes), (self.memory_total, r.memory_total_bytes),
                      (self.power, r.power_w), (self.sm_clock, r.sm_clock_mhz), (self.mem_clock, r.mem_clock_mhz))
            for gauge, value in values:
                if value is not None:
                    gauge.labels(gpu=gpu).set(value)
        self.throttle_state.set(ThrottleState(throttle_state).level)


def start_gpu_telemetry(throttle: Any, interval_s: float = 5.0) -> None:
    """Refresh the throttle and the per-GPU gauges in the background (no-op readings without a GPU)."""

    def loop() -> None:
        while True:
            state = throttle.update()
            gpu_metrics().update(throttle.readings, state)
            time.sleep(interval_s)

    threading.Thread(target=loop, name="sdxl-gpu-telemetry", daemon=True).start()
