"""The running kiosk: camera -> presence -> crop -> preprocess -> engine -> match -> record.

Every frame goes through the presence check; a product placed and held still is cut out and
recognised once, and the scan is written to the scan log (committed before anyone hears of it)
and then handed to the listeners: the kiosk UI and the fleet agent subscribe here. A listener
that raises is logged and skipped; the kiosk keeps scanning.

Latency is counted from the moment the camera captured the frame to the recorded result, with
the time of each stage (capture: the frame's age when the kiosk took it). Health covers the last
minute: frames per second, scan latency p50/p95, the camera's state, the engine and the model
and catalog versions.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from device.camera import Camera, CameraError, Frame
from device.crop import Box, product_crop
from device.pipeline import Pipeline, ScanResult
from device.presence import Presence, PresenceConfig
from device.scans import MODES, ScanLog

log = logging.getLogger("storyscan.kiosk")

WINDOW_S = 60.0  # health statistics cover this many seconds


@dataclass
class Scan:
    """A recorded recognition, as listeners receive it."""

    id: int
    time: str
    result: ScanResult
    latency_ms: float
    box: Box
    centre_fallback: bool  # no clear foreground: the frame's central square was used
    mode: str
    session: str | None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "time": self.time, **self.result.to_dict(),
                "latency_ms": self.latency_ms, "box": list(self.box),
                "centre_fallback": self.centre_fallback, "mode": self.mode,
                "session": self.session, "timings_ms": self.timings_ms}


Listener = Callable[[Scan], None]


class Kiosk:
    def __init__(self, camera: Camera, pipeline: Pipeline, scans: ScanLog,
                 presence: Presence | None = None, mode: str = "shopper",
                 session: str | None = None) -> None:
        self.camera, self.pipeline, self.scans = camera, pipeline, scans
        self.presence = presence or Presence(PresenceConfig())
        self.mode, self.session = mode, session
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._frames: deque[float] = deque()  # processing times of recent frames
        self._latencies: deque[tuple[float, float]] = deque()  # (time, ms) of recent scans
        self._stop = threading.Event()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self.last_seq = 0
        self._view: tuple[Frame, Box | None] | None = None  # newest frame seen, its foreground
        # read on the kiosk's thread (SQLite connections stay on theirs), shown by health()
        self.catalog_version = pipeline.catalog.version
        self.recorded = len(scans)

    # --- listeners -----------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(scan)` after every recorded scan; returns the unsubscribe function."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _publish(self, scan: Scan) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(scan)
            except Exception:
                log.exception("a scan listener failed (the kiosk carries on)")

    # --- the loop ------------------------------------------------------------------------------

    def step(self, frame: Frame) -> Scan | None:
        """Process one frame; returns the scan when this frame triggered one."""
        t0 = time.monotonic()
        event = self.presence.update(frame.image)
        t1 = time.monotonic()
        self._view = (frame, event.box)
        self._count_frame(t1)
        if not event.trigger:
            return None
        return self._recognize(frame.image, frame.time, event.box, self.mode, self.session,
                               self.camera.name, {"capture": (t0 - frame.time) * 1e3,
                                                  "presence": (t1 - t0) * 1e3})

    def submit(self, image: np.ndarray, mode: str = "upload", session: str | None = None,
               source: str = "upload") -> Future:
        """Recognise a photo from elsewhere (an upload, a staff capture) on the kiosk's own
        thread, where its engine and database connections live; the Future gets the Scan.
        There is no background to compare with, so the crop is the photo's central square."""
        return self.submit_job(lambda: self._recognize(image, time.monotonic(), None, mode,
                                                       session, source))

    def capture(self, max_age_s: float = 5.0) -> np.ndarray:
        """The scan area cut out now as a scan would cut it (staff enrolling from the camera):
        the newest frame the loop processed, around its foreground, or its central square when
        nothing stands out. Any thread: the loop replaces what this reads in one assignment.
        Raises CameraError when the loop has no recent frame."""
        view = self._view
        camera = self.camera.status()
        state = camera["state"] + (f": {camera['problem']}" if camera["problem"] else "")
        if view is None:
            raise CameraError(f"no picture from the camera yet (camera {state})")
        frame, box = view
        age = time.monotonic() - frame.time
        if age > max_age_s:
            raise CameraError(f"the camera's newest picture is {age:.0f} s old (camera "
                              f"{state}): is the kiosk running?")
        return product_crop(frame.image, box)[0].copy()

    def submit_job(self, job: Callable[[], object]) -> Future:
        """Run `job()` on the kiosk's thread between two frames (the UI's requests that need
        the engine or the kiosk's own database connections); the Future gets its result, or
        the exception it raised. Jobs run while `run()` is looping."""
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    def reload_catalog(self) -> Future:
        """Take in catalog changes written through another connection (a product enrolled from
        the staff page): embed the reference photos this bundle has not seen and rebuild the
        matcher, on the kiosk's thread; the Future gets the number of photos embedded."""
        def reload() -> int:
            pipeline = self.pipeline
            added = pipeline.update_embeddings()
            pipeline.matcher = pipeline._build_matcher(pipeline.matcher.hash_candidates)
            self.catalog_version = pipeline.catalog.version
            return added

        return self.submit_job(reload)

    def _run_jobs(self) -> None:
        while True:
            try:
                job, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except Exception as e:  # the caller hears of it; the kiosk carries on
                future.set_exception(e)

    def _recognize(self, image: np.ndarray, captured: float, box: Box | None, mode: str,
                   session: str | None, source: str, stages: dict[str, float] | None = None
                   ) -> Scan:
        """Crop, recognise, record, tell the listeners."""
        t0 = time.monotonic()
        cropped, box, fallback = product_crop(image, box)
        t1 = time.monotonic()
        result = self.pipeline.recognize(np.ascontiguousarray(cropped), source=source)
        done = time.monotonic()
        timings = {**(stages or {}), "crop": (t1 - t0) * 1e3, **result.timings_ms}
        latency = (done - captured) * 1e3
        result.timings_ms = timings
        self.catalog_version = self.pipeline.catalog.version
        row = self.scans.record(result, latency, mode, session, self.pipeline.bundle.key,
                                self.catalog_version)
        with self._lock:
            self._latencies.append((done, latency))
            self.recorded += 1
        scan = Scan(row["id"], row["time"], result, latency, box, fallback, mode, session,
                    timings)
        self._publish(scan)
        return scan

    def _count_frame(self, now: float) -> None:
        with self._lock:
            self._frames.append(now)
            while self._frames and now - self._frames[0] > WINDOW_S:
                self._frames.popleft()
            while self._latencies and now - self._latencies[0][0] > WINDOW_S:
                self._latencies.popleft()

    def run(self, duration: float | None = None, max_scans: int | None = None) -> int:
        """Scan until stop(), Ctrl-C, `duration` seconds or `max_scans` scans; returns the
        number of scans recorded."""
        self._stop.clear()
        deadline = time.monotonic() + duration if duration else None
        count = 0
        while not self._stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            self._run_jobs()
            frame = self.camera.latest(after=self.last_seq, timeout=0.05)
            if frame is None:
                continue  # no new frame (camera reconnecting): keep serving, keep waiting
            self.last_seq = frame.seq
            if self.step(frame) is not None:
                count += 1
                if max_scans is not None and count >= max_scans:
                    break
        return count

    def stop(self) -> None:
        self._stop.set()

    def set_mode(self, mode: str, session: str | None = None) -> None:
        """Shopper scans, or staff counting towards an inventory session, from the next scan."""
        if mode not in MODES:
            raise ValueError(f"scan mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode, self.session = mode, session

    # --- health --------------------------------------------------------------------------------

    def health(self) -> dict:
        """Frames per second and scan latency over the last minute, camera, engine, versions;
        safe to call from any thread (the UI's, the fleet agent's)."""
        now = time.monotonic()
        with self._lock:
            frames = [t for t in self._frames if now - t <= WINDOW_S]
            latencies = [ms for t, ms in self._latencies if now - t <= WINDOW_S]
        fps = (len(frames) - 1) / (frames[-1] - frames[0]) if len(frames) > 1 and \
            frames[-1] > frames[0] else 0.0
        p50, p95 = (np.percentile(latencies, [50, 95]).tolist() if latencies else (None, None))
        bundle = self.pipeline.bundle
        return {"fps": round(fps, 2), "latency_p50_ms": p50, "latency_p95_ms": p95,
                "scans_last_minute": len(latencies), "presence": self.presence.state,
                "camera": self.camera.status(),
                "engine": {"backend": self.pipeline.engine.backend,
                           "precision": self.pipeline.engine.precision},
                "model": bundle.key, "catalog_version": self.catalog_version,
                "scans_recorded": self.recorded, "mode": self.mode, "session": self.session}
