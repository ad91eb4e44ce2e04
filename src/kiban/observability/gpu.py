"""NVML GPU exporter: a Prometheus collector that reads every GPU at scrape time.

Runs on the gateway's registry (``kiban serve``, when NVML is present) and
alone (``kiban gpu-exporter``). Readings an NVML call refuses as not
supported (fan speed on data-centre cards, several calls under WSL2) are
never reported as zeros: ``kiban_gpu_metric_supported{gpu,metric}`` is 0 for
them and their series are absent. Without a driver the collector says why in
:attr:`GpuCollector.unavailable_reason` and exports only
``kiban_gpu_nvml_available 0``.

XID errors come from NVML events, not from a query, so a thread waits on
them (``watch_xid``); the gateway turns it off in multi-worker mode, where
each worker would count the same events.

This module imports only prometheus_client and, lazily, pynvml (nvidia-ml-py),
so device scripts can load it from a source checkout.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("kiban.gpu")

GPU = "gpu"

#: NVML clock-event (throttle) reason bits, by the label kiban reports them with
CLOCK_EVENT_REASONS = {
    "gpu_idle": "nvmlClocksEventReasonGpuIdle",
    "applications_clocks_setting": "nvmlClocksEventReasonApplicationsClocksSetting",
    "sw_power_cap": "nvmlClocksEventReasonSwPowerCap",
    "hw_slowdown": "nvmlClocksEventReasonHwSlowdown",
    "sync_boost": "nvmlClocksEventReasonSyncBoost",
    "sw_thermal_slowdown": "nvmlClocksEventReasonSwThermalSlowdown",
    "hw_thermal_slowdown": "nvmlClocksEventReasonHwThermalSlowdown",
    "hw_power_brake_slowdown": "nvmlClocksEventReasonHwPowerBrakeSlowdown",
    "display_clock_setting": "nvmlClocksEventReasonDisplayClockSetting",
}


class _Unsupported(Exception):
    """The platform does not give this reading (NVML said so, or gave no value)."""


class _Families:
    """The metric families of one scrape, filled reading by reading."""

    def __init__(self) -> None:
        self.items: dict[str, Metric] = {}

    def gauge(self, name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        family = self.items.get(name)
        if not isinstance(family, GaugeMetricFamily):
            family = self.items[name] = GaugeMetricFamily(name, doc, labels=labels)
        return family

    def counter(self, name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        family = self.items.get(name)
        if not isinstance(family, CounterMetricFamily):
            family = self.items[name] = CounterMetricFamily(name, doc, labels=labels)
        return family


Reading = Callable[[Any, Any, str, _Families], None]


class GpuCollector(Collector):
    """Reads every GPU through NVML on each ``collect()``."""

    def __init__(self, nvml: ModuleType | Any | None = None, watch_xid: bool = True) -> None:
        self.unavailable_reason: str | None = None
        self.gpus: list[tuple[str, Any]] = []  # (index label, handle)
        self.info: list[dict[str, str]] = []
        self._unsupported: set[tuple[str, str]] = set()
        self._read_errors: dict[tuple[str, str], int] = {}
        self._xid_counts: dict[tuple[str, str], int] = {}
        self._xid_supported: dict[str, bool] = {}
        self._xid_lock = threading.Lock()
        self._xid_thread: threading.Thread | None = None
        self._stop = threading.Event()
        found = nvml if nvml is not None else _import_nvml()
        self.nvml: Any = None  # pynvml, which ships no types (or a test's stand-in)
        if isinstance(found, str):
            self.unavailable_reason = found
            return
        self.nvml = found
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError as err:
            self.unavailable_reason = _init_failure(self.nvml, err)
            return
        n = self.nvml
        driver = _text(n.nvmlSystemGetDriverVersion())
        for i in range(n.nvmlDeviceGetCount()):
            handle = n.nvmlDeviceGetHandleByIndex(i)
            self.gpus.append((str(i), handle))
            self.info.append(
                {
                    GPU: str(i),
                    "name": _text(n.nvmlDeviceGetName(handle)),
                    "uuid": _text(n.nvmlDeviceGetUUID(handle)),
                    "driver_version": driver,
                }
            )
        if not self.gpus:
            self.unavailable_reason = "NVML found no GPU"
        elif watch_xid:
            self._start_xid_watch()

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def describe_state(self) -> str:
        """One line for logs and the CLI: what this collector can see."""
        if not self.available:
            return f"no GPU metrics: {self.unavailable_reason}"
        names = ", ".join(f"{i['gpu']}: {i['name']}" for i in self.info)
        return f"NVML driver {self.info[0]['driver_version']}, {len(self.gpus)} GPU(s) ({names})"

    # -- collection ----------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily(
            "kiban_gpu_nvml_available", "1 when NVML (the NVIDIA driver) answers, 0 when not"
        )
        up.add_metric([], 1 if self.available else 0)
        yield up
        if not self.available:
            return
        fam = _Families()
        info = fam.gauge(
            "kiban_gpu_info", "GPU identity (value 1)", [GPU, "name", "uuid", "driver_version"]
        )
        for item in self.info:
            info.add_metric([item[GPU], item["name"], item["uuid"], item["driver_version"]], 1)
        supported = fam.gauge(
            "kiban_gpu_metric_supported",
            "1 when the platform gives the reading, 0 when NVML does not support it here",
            [GPU, "metric"],
        )
        for gpu, handle in self.gpus:
            for metric, read in READINGS.items():
                key = (gpu, metric)
                if key in self._unsupported:
                    supported.add_metric([gpu, metric], 0)
                    continue
                try:
                    read(self.nvml, handle, gpu, fam)
                except _Unsupported:
                    self._unsupported.add(key)
                    supported.add_metric([gpu, metric], 0)
                    continue
                except self.nvml.NVMLError as err:
                    if _is_unsupported(self.nvml, err):
                        self._unsupported.add(key)
                        supported.add_metric([gpu, metric], 0)
                        continue
                    self._read_errors[key] = self._read_errors.get(key, 0) + 1
                    log.warning("NVML %s on GPU %s failed: %s", metric, gpu, err)
                supported.add_metric([gpu, metric], 1)
            if gpu in self._xid_supported:
                supported.add_metric([gpu, "xid_errors"], int(self._xid_supported[gpu]))
        self._collect_xid(fam)
        errors = fam.counter(
            "kiban_gpu_read_errors", "NVML reads that failed (not as unsupported)", [GPU, "metric"]
        )
        for (gpu, metric), count in self._read_errors.items():
            errors.add_metric([gpu, metric], count)
        yield from fam.items.values()
        took = GaugeMetricFamily(
            "kiban_gpu_collect_duration_seconds", "Time the last NVML sweep of all GPUs took"
        )
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _collect_xid(self, fam: _Families) -> None:
        if not self._xid_supported:
            return
        counter = fam.counter(
            "kiban_gpu_xid_errors", "XID critical errors NVML reported, by XID code", [GPU, "xid"]
        )
        with self._xid_lock:
            counts = dict(self._xid_counts)
        for (gpu, xid), count in counts.items():
            counter.add_metric([gpu, xid], count)

    # -- XID events ----------------------------------------------------------------------

    def _start_xid_watch(self) -> None:
        n = self.nvml
        try:
            event_set = n.nvmlEventSetCreate()
        except n.NVMLError as err:
            log.info("XID events unavailable: %s", err)
            for gpu, _ in self.gpus:
                self._xid_supported[gpu] = False
            return
        indices: dict[int, str] = {}
        for gpu, handle in self.gpus:
            try:
                n.nvmlDeviceRegisterEvents(handle, n.nvmlEventTypeXidCriticalError, event_set)
                self._xid_supported[gpu] = True
                indices[int(gpu)] = gpu
            except n.NVMLError as err:
                self._xid_supported[gpu] = False
                log.info("XID events on GPU %s unavailable: %s", gpu, err)
        if not indices:
            with contextlib.suppress(n.NVMLError):
                n.nvmlEventSetFree(event_set)
            return
        self._xid_thread = threading.Thread(
            target=self._watch_xid, args=(event_set,), name="kiban-nvml-xid", daemon=True
        )
        self._xid_thread.start()

    def _watch_xid(self, event_set: Any) -> None:
        n = self.nvml
        try:
            while not self._stop.is_set():
                try:
                    data = n.nvmlEventSetWait_v2(event_set, 500)
                except n.NVMLError as err:
                    if getattr(err, "value", None) == n.NVML_ERROR_TIMEOUT:
                        continue
                    log.warning("NVML event wait failed, XID watch stops: %s", err)
                    return
                if data.eventType != n.nvmlEventTypeXidCriticalError:
                    continue
                gpu = str(n.nvmlDeviceGetIndex(data.device))
                key = (gpu, str(int(data.eventData)))
                with self._xid_lock:
                    self._xid_counts[key] = self._xid_counts.get(key, 0) + 1
                log.error("GPU %s reported XID %s", gpu, key[1])
        finally:
            with contextlib.suppress(n.NVMLError):
                n.nvmlEventSetFree(event_set)

    def close(self) -> None:
        """Stop the XID watch and release NVML."""
        self._stop.set()
        if self._xid_thread is not None:
            self._xid_thread.join(timeout=2)
        if self.nvml is not None and self.available:
            with contextlib.suppress(self.nvml.NVMLError):
                self.nvml.nvmlShutdown()


# -- readings: one function per NVML query, each adding its samples -------------------------


def _utilization(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    rates = n.nvmlDeviceGetUtilizationRates(h)
    fam.gauge(
        "kiban_gpu_utilization_ratio", "Share of time a kernel ran on the GPU, 0 to 1", [GPU]
    ).add_metric([gpu], rates.gpu / 100)
    fam.gauge(
        "kiban_gpu_memory_utilization_ratio",
        "Share of time device memory was read or written, 0 to 1",
        [GPU],
    ).add_metric([gpu], rates.memory / 100)


def _memory(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    try:
        mem = n.nvmlDeviceGetMemoryInfo(h, version=n.nvmlMemory_v2)
        reserved = mem.reserved
    except n.NVMLError as err:
        if not _is_unsupported(n, err):
            raise
        mem, reserved = n.nvmlDeviceGetMemoryInfo(h), None
    labels = [GPU]
    fam.gauge("kiban_gpu_memory_used_bytes", "Device memory in use", labels).add_metric(
        [gpu], mem.used
    )
    fam.gauge("kiban_gpu_memory_total_bytes", "Device memory in all", labels).add_metric(
        [gpu], mem.total
    )
    if reserved is not None:
        fam.gauge(
            "kiban_gpu_memory_reserved_bytes", "Device memory the driver reserves", labels
        ).add_metric([gpu], reserved)


def _temperature(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    fam.gauge("kiban_gpu_temperature_celsius", "GPU core temperature", [GPU]).add_metric(
        [gpu], n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)
    )


def _slowdown_temperature(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    value = n.nvmlDeviceGetTemperatureThreshold(h, n.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
    fam.gauge(
        "kiban_gpu_temperature_slowdown_celsius",
        "Temperature at which the GPU slows its clocks",
        [GPU],
    ).add_metric([gpu], value)


def _power(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    fam.gauge("kiban_gpu_power_watts", "Power draw", [GPU]).add_metric(
        [gpu], n.nvmlDeviceGetPowerUsage(h) / 1000
    )


def _power_limit(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    fam.gauge("kiban_gpu_power_limit_watts", "Enforced power limit", [GPU]).add_metric(
        [gpu], n.nvmlDeviceGetEnforcedPowerLimit(h) / 1000
    )


def _energy(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    fam.counter("kiban_gpu_energy_joules", "Energy used since the driver loaded", [GPU]).add_metric(
        [gpu], n.nvmlDeviceGetTotalEnergyConsumption(h) / 1000
    )


def _clocks(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    sm = n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)
    mem = n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)
    fam.gauge("kiban_gpu_sm_clock_hertz", "Streaming multiprocessor clock", [GPU]).add_metric(
        [gpu], sm * 1e6
    )
    fam.gauge("kiban_gpu_memory_clock_hertz", "Memory clock", [GPU]).add_metric([gpu], mem * 1e6)


def _clock_events(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    query = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None)
    mask = query(h) if query else n.nvmlDeviceGetCurrentClocksThrottleReasons(h)
    family = fam.gauge(
        "kiban_gpu_clock_event_active",
        "1 while the reason holds the clocks down (NVML clock-event / throttle reasons)",
        [GPU, "reason"],
    )
    for reason, constant in CLOCK_EVENT_REASONS.items():
        bit = getattr(n, constant, None)
        if bit is not None:
            family.add_metric([gpu, reason], 1 if mask & bit else 0)


def _ecc(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    corrected = n.nvmlDeviceGetTotalEccErrors(
        h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC
    )
    uncorrected = n.nvmlDeviceGetTotalEccErrors(
        h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC
    )
    family = fam.counter(
        "kiban_gpu_ecc_errors", "ECC memory errors since the driver loaded", [GPU, "type"]
    )
    family.add_metric([gpu, "corrected"], corrected)
    family.add_metric([gpu, "uncorrected"], uncorrected)


def _pcie(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    tx = n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES)
    rx = n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES)
    family = fam.gauge(
        "kiban_gpu_pcie_throughput_bytes_per_second",
        "PCIe traffic over the last 20 ms NVML sampled, by direction",
        [GPU, "direction"],
    )
    family.add_metric([gpu, "tx"], tx * 1024)
    family.add_metric([gpu, "rx"], rx * 1024)


def _performance_state(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    fam.gauge(
        "kiban_gpu_performance_state", "Performance state, 0 (fastest) to 15", [GPU]
    ).add_metric([gpu], n.nvmlDeviceGetPerformanceState(h))


def _fan(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    fam.gauge("kiban_gpu_fan_speed_ratio", "Fan speed, share of its maximum", [GPU]).add_metric(
        [gpu], n.nvmlDeviceGetFanSpeed(h) / 100
    )


def _processes(n: Any, h: Any, gpu: str, fam: _Families) -> None:
    procs = n.nvmlDeviceGetComputeRunningProcesses(h)
    count = fam.gauge("kiban_gpu_processes", "Compute processes on the GPU", [GPU])
    count.add_metric([gpu], len(procs))
    known = [p for p in procs if p.usedGpuMemory is not None]
    if procs and not known:
        raise _Unsupported  # the platform lists processes but not their memory (WDDM, WSL2)
    family = fam.gauge(
        "kiban_gpu_process_memory_used_bytes",
        "Device memory a compute process holds",
        [GPU, "pid", "command"],
    )
    for proc in known:
        family.add_metric([gpu, str(proc.pid), _command(proc.pid)], proc.usedGpuMemory)


READINGS: dict[str, Reading] = {
    "utilization": _utilization,
    "memory": _memory,
    "temperature": _temperature,
    "temperature_slowdown": _slowdown_temperature,
    "power": _power,
    "power_limit": _power_limit,
    "energy": _energy,
    "clocks": _clocks,
    "clock_events": _clock_events,
    "ecc_errors": _ecc,
    "pcie_throughput": _pcie,
    "performance_state": _performance_state,
    "fan_speed": _fan,
    "process_memory": _processes,
}


# -- helpers ---------------------------------------------------------------------------------


def _import_nvml() -> ModuleType | str:
    """pynvml, or the reason it cannot be used."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py (pynvml) is not installed"
    module: ModuleType = pynvml
    return module


def _init_failure(n: Any, err: Exception) -> str:
    code = getattr(err, "value", None)
    if code in (n.NVML_ERROR_LIBRARY_NOT_FOUND, n.NVML_ERROR_DRIVER_NOT_LOADED):
        return f"no NVIDIA GPU driver on this machine (NVML: {err})"
    if code == n.NVML_ERROR_NO_PERMISSION:
        return f"NVML refused access to the GPUs (NVML: {err})"
    return f"NVML failed to start: {err}"


def _is_unsupported(n: Any, err: Exception) -> bool:
    return getattr(err, "value", None) in (
        n.NVML_ERROR_NOT_SUPPORTED,
        n.NVML_ERROR_NO_PERMISSION,
        n.NVML_ERROR_FUNCTION_NOT_FOUND,
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _command(pid: int) -> str:
    """The process name where this machine can see it (not across containers)."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""
