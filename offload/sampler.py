"""`Sampler`: a background thread that records what the operating system and the GPU driver see during a run,
as counters on a `Tracer`, next to the runtime's own events.

Counters (all bytes or bytes per second, so the report converts units in one place):
- "host rss": {"rss": bytes} resident memory of this process (psutil).
- "disk io": {"read": bytes/s, "write": bytes/s} this process's storage I/O where the OS reports it
  (Linux /proc/<pid>/io), else the whole machine's (psutil.disk_io_counters); rates between two samples.
- "gpu memory": {"used": bytes (NVML, all processes), "allocated": bytes (torch, this process)}.
- "pcie": {"tx": bytes/s, "rx": bytes/s} PCIe throughput of the device as NVML measures it.

Every source is optional: one that is missing (no CUDA, no NVML, no io counters) or fails once is dropped
without a word, so the sampler works the same on a laptop CPU and on a GPU server.

Lifecycle: `with Sampler(tracer): run()` -- samples once on entry, every `interval` seconds, and once on exit.

NOTE: nvmlDeviceGetPcieThroughput measures over ~20 ms per call, so with PCIe on, one round of samples takes
~40 ms and the effective interval is max(interval, ~40 ms).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

import psutil

from offload.trace import Tracer

log = logging.getLogger(__name__)

Source = Callable[[float], dict[str, float] | None]


class Sampler:
    """Samples host RSS, disk I/O and (with CUDA and NVML) GPU memory and PCIe throughput into `tracer`."""

    def __init__(self, tracer: Tracer, interval: float = 0.05) -> None:
        if not interval > 0:
            raise ValueError(f"interval: expected seconds > 0, got {interval!r}")
        self.tracer = tracer
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self._nvml: Any = None
        self._handle: Any = None
        self._last_io: tuple[float, int, int] | None = None
        self._sources: dict[str, Source] = {"host rss": self._rss, "disk io": self._disk_io}
        if self._open_nvml():
            self._sources["gpu memory"] = self._gpu_memory
            self._sources["pcie"] = self._pcie

    # --- lifecycle ----------------------------------------------------------------------------------------

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("sampler: already started")
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="offload-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.sample()  # the last state, so plots reach the end of the run
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down a driver library we only read from
                pass
            self._nvml = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """One round: every live source records one counter sample; a source that fails is dropped."""
        for name, source in list(self._sources.items()):
            t = self.tracer.now()
            try:
                values = source(t)
            except Exception as e:  # noqa: BLE001 - any failure of an optional source just disables it
                log.debug("sampler: dropping %s: %s", name, e)
                del self._sources[name]
                continue
            if values is not None:
                self.tracer.counter(name, t, values)

    @property
    def sources(self) -> list[str]:
        """The counters still being sampled."""
        return list(self._sources)

    # --- sources ------------------------------------------------------------------------------------------

    def _rss(self, t: float) -> dict[str, float]:
        return {"rss": float(self._process.memory_info().rss)}

    def _disk_io(self, t: float) -> dict[str, float] | None:
        try:
            io = self._process.io_counters()
        except (AttributeError, psutil.Error, OSError):
            io = psutil.disk_io_counters()
            if io is None:
                raise RuntimeError("no disk io counters on this machine") from None
        read, write = int(io.read_bytes), int(io.write_bytes)
        last, self._last_io = self._last_io, (t, read, write)
        if last is None or t <= last[0]:
            return None  # a rate needs two samples
        dt = t - last[0]
        return {"read": max(0, read - last[1]) / dt, "write": max(0, write - last[2]) / dt}

    def _open_nvml(self) -> bool:
        """Opens NVML for the current CUDA device; False (silently) where either is missing."""
        try:
            import torch

            if not torch.cuda.is_available():
                return False
            with warnings.catch_warnings():
                # The `pynvml` package warns on import that it is deprecated in favour of nvidia-ml-py,
                # which installs a module of the same name; either works here.
                warnings.simplefilter("ignore")
                import pynvml
            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(index)
            try:
                # CUDA and NVML may number devices differently (CUDA_VISIBLE_DEVICES); the PCI address is shared.
                bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
                self._handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            except Exception:  # noqa: BLE001 - older torch without PCI ids, or a bus id NVML does not parse
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
            return True
        except Exception as e:  # noqa: BLE001 - no driver, no library, no permission: sample without the GPU
            log.debug("sampler: no NVML: %s", e)
            return False

    def _gpu_memory(self, t: float) -> dict[str, float]:
        import torch

        used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        return {"used": float(used), "allocated": float(torch.cuda.memory_allocated())}

    def _pcie(self, t: float) -> dict[str, float]:
        nv = self._nvml
        tx = nv.nvmlDeviceGetPcieThroughput(self._handle, nv.NVML_PCIE_UTIL_TX_BYTES)  # KB/s
        rx = nv.nvmlDeviceGetPcieThroughput(self._handle, nv.NVML_PCIE_UTIL_RX_BYTES)
        return {"tx": tx * 1024.0, "rx": rx * 1024.0}
