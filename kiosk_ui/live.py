"""Live parts of the shopper's screen: scans pushed to every open page (Server-Sent Events) and
the camera preview (Motion-JPEG).

The kiosk calls the UI's listener on its own thread after each recorded scan; the listener
only drops the scan into each client's small queue (never blocking the kiosk: a client that
stops reading loses its oldest scans, not the kiosk its pace). Each stream's own thread turns
scans into result cards with its own catalog connection. The preview encodes each camera frame
at most once, however many pages watch it, at a modest size and rate.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import cv2
import numpy as np

from device.camera import Camera


class Broadcaster:
    def __init__(self, max_clients: int = 32, backlog: int = 16) -> None:
        self.max_clients, self.backlog = max_clients, backlog
        self._clients: list[queue.Queue] = []
        self._lock = threading.Lock()

    def register(self) -> queue.Queue | None:
        """A queue that receives every published item; None when there are too many clients."""
        with self._lock:
            if len(self._clients) >= self.max_clients:
                return None
            q: queue.Queue = queue.Queue(self.backlog)
            self._clients.append(q)
            return q

    def unregister(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._clients:
                self._clients.remove(q)

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)

    def publish(self, item: object) -> None:
        """Never blocks: a full queue drops its oldest item."""
        with self._lock:
            clients = list(self._clients)
        for q in clients:
            while True:
                try:
                    q.put_nowait(item)
                    break
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        q.get_nowait()


def encode_jpeg(image_rgb: np.ndarray, width: int, quality: int) -> bytes:
    h, w = image_rgb.shape[:2]
    if w > width:
        image_rgb = cv2.resize(image_rgb, (width, max(1, round(h * width / w))),
                               interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


class Preview:
    """The newest camera frame as a JPEG, encoded once per frame for all viewers."""

    def __init__(self, camera: Camera, width: int = 640, fps: float = 10.0,
                 quality: int = 70, max_clients: int = 8) -> None:
        self.camera, self.width, self.fps, self.quality = camera, width, fps, quality
        self.max_clients = max_clients
        self.clients = 0
        self._lock = threading.Lock()
        self._encoded: tuple[int, bytes] | None = None

    def acquire(self) -> bool:
        with self._lock:
            if self.clients >= self.max_clients:
                return False
            self.clients += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.clients -= 1

    def jpeg(self, after: int = 0, timeout: float = 1.0) -> tuple[int, bytes] | None:
        """(seq, JPEG) of the newest frame newer than `after`, or None if none came in time."""
        cached = self._encoded
        if cached is not None and cached[0] > after:
            return cached
        frame = self.camera.latest(after=after, timeout=timeout)
        if frame is None:
            return None
        with self._lock:
            if self._encoded is not None and self._encoded[0] >= frame.seq:
                return self._encoded
        data = encode_jpeg(frame.image, self.width, self.quality)
        with self._lock:
            if self._encoded is None or self._encoded[0] < frame.seq:
                self._encoded = (frame.seq, data)
            return self._encoded

    def stream(self, stopping: threading.Event, boundary: str = "frame"):
        """multipart/x-mixed-replace parts, at most `fps` a second, until `stopping`."""
        seq, interval, due = 0, 1.0 / self.fps, 0.0
        while not stopping.is_set():
            wait = due - time.monotonic()
            if wait > 0 and stopping.wait(wait):
                return
            got = self.jpeg(after=seq, timeout=1.0)
            if got is None:
                continue  # no new frame (camera reconnecting): the page keeps the last one
            seq, data = got
            due = time.monotonic() + interval
            yield (f"--{boundary}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}"
                   "\r\n\r\n").encode() + data + b"\r\n"
