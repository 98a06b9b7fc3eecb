"""The machine's load and temperatures for the status page: jtop on a Jetson (CPU, GPU, their
temperatures and power, through the jtop service), psutil elsewhere. Readings are cached for a
couple of seconds, so fifty status requests a second cost one reading."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import psutil

log = logging.getLogger("storyscan.ui")

try:  # jetson-stats, on a Jetson with its jtop service running
    from jtop import jtop as _jtop
except Exception:  # not a Jetson (ImportError), or a broken install: psutil alone
    _jtop = None


class SystemMonitor:
    def __init__(self, cache_s: float = 2.0) -> None:
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None
        self._jetson = None
        self._jtop_failed = False
        # CPU load between two readings, from the totals: psutil.cpu_percent(None) keeps its
        # reference point per thread, and each request comes on a new one (always 0.0 then)
        self._cpu_times = psutil.cpu_times()

    def read(self) -> dict:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.cache_s:
                self._cached = (now, self._sample())
            return self._cached[1]

    def _sample(self) -> dict:
        memory = psutil.virtual_memory()
        out = {"source": "psutil", "cpu_percent": self._cpu_percent(),
               "cpu_count": psutil.cpu_count(), "load_average": [round(x, 2) for x in
                                                                 os.getloadavg()],
               "memory_percent": memory.percent, "temperatures_c": self._temperatures(),
               "gpu_percent": None, "power_mw": None}
        jetson = self._jtop()
        if jetson is not None:
            try:
                stats = dict(jetson.stats)
                out["source"] = "jtop"
                out["gpu_percent"] = stats.get("GPU")
                out["temperatures_c"] |= {k[5:].lower(): v for k, v in stats.items()
                                          if k.startswith("Temp ") and
                                          isinstance(v, (int, float))}
                out["power_mw"] = stats.get("Power TOT")
            except Exception as e:  # the jtop service went away: psutil only from now on
                log.warning("jtop stopped answering (%s); reading psutil only", e)
                self._close_jtop()
        return out

    def _cpu_percent(self) -> float:
        """Share of CPU time busy since the previous reading (all cores), in percent."""
        now = psutil.cpu_times()
        before, self._cpu_times = self._cpu_times, now
        idle = (now.idle + getattr(now, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
        total = sum(now) - sum(before)
        return round(100 * max(0.0, 1 - idle / total), 1) if total > 0 else 0.0

    def _jtop(self):
        if _jtop is None or self._jtop_failed:
            return None
        if self._jetson is None:
            try:
                jetson = _jtop()
                jetson.start()
                self._jetson = jetson
            except Exception as e:
                log.warning("jtop is installed but does not start (%s); reading psutil", e)
                self._jtop_failed = True
                return None
        return self._jetson

    def _close_jtop(self) -> None:
        self._jtop_failed = True
        if self._jetson is not None:
            with contextlib.suppress(Exception):
                self._jetson.close()
            self._jetson = None

    def close(self) -> None:
        with self._lock:
            self._close_jtop()

    @staticmethod
    def _temperatures() -> dict[str, float]:
        read = getattr(psutil, "sensors_temperatures", None)
        try:
            sensors = read() if read else {}
        except Exception:
            sensors = {}
        return {name: round(entries[0].current, 1) for name, entries in sensors.items()
                if entries and entries[0].current is not None}
