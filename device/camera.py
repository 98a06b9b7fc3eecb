"""Cameras by URI, and a grabber thread that always holds the newest frame.

    v4l2:0, /dev/video0     a USB/UVC camera through V4L2; ?format=MJPG|YUYV&width=&height=&fps=
    csi:0                   a Jetson CSI camera through GStreamer (nvarguscamerasrc ... ! appsink);
                            needs an OpenCV built with GStreamer, as JetPack's is
    rtsp://..., http://...  a network camera
    dir:PATH                a folder of images played as a camera, in name order, looping
    PATH                    a video file, looping

File and folder sources play at their own frame rate (`?fps=` overrides it) as a real camera
would; `?fps=0` hands over every frame in lockstep with the reader instead, so a test or a
benchmark sees each frame exactly once.

The kiosk must recognise what is in front of it *now*: `Camera` reads on its own thread and keeps
only the newest frame, so a slow scan never works through a queue of stale ones. When a source
drops (cable pulled, stream gone, file deleted) the thread reopens it with exponential backoff
and reports its state: "ok", "reconnecting", or "failed" after `fail_after` tries in a row (it
keeps retrying, at the longest backoff). Frames come out RGB, as the rest of the device expects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl

import cv2
import numpy as np

from models.preprocess import IMAGE_SUFFIXES, ImageError, load_image

log = logging.getLogger("storyscan.camera")

STATES = ("starting", "ok", "reconnecting", "failed", "stopped")


class CameraError(RuntimeError):
    """A camera URI that cannot work on this machine; str() is one line."""


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # HxWx3 uint8 RGB
    seq: int  # 1, 2, ... in capture order (gaps: frames nobody read)
    time: float  # time.monotonic() when it was captured


class Source(Protocol):
    """One opened camera. read() returns an RGB frame, or None when the source has dropped."""

    fps: float

    def read(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


# --- URIs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CameraURI:
    kind: str  # v4l2 | csi | stream | dir | file
    target: str  # device index, sensor id, URL or path
    options: dict[str, str]

    def option(self, name: str, default: float) -> float:
        try:
            return float(self.options.get(name, default))
        except ValueError:
            raise CameraError(f"camera option {name}={self.options[name]!r} is not a number"
                              ) from None


def parse_uri(uri: str) -> CameraURI:
    """Split a camera URI into its kind, target and ?key=value options."""
    base, _, query = uri.partition("?") if not uri.startswith(("rtsp:", "http")) else (uri, "", "")
    options = dict(parse_qsl(query))
    if base.startswith("v4l2:"):
        return CameraURI("v4l2", base[5:] or "0", options)
    if base.startswith("/dev/video"):
        return CameraURI("v4l2", base[len("/dev/video"):] or "0", options)
    if base.startswith("csi:"):
        return CameraURI("csi", base[4:] or "0", options)
    if base.startswith(("rtsp://", "rtsps://", "http://", "https://")):
        return CameraURI("stream", base, options)
    if base.startswith("dir:"):
        return CameraURI("dir", base[4:], options)
    if not base:
        raise CameraError("no camera given (e.g. v4l2:0, csi:0, rtsp://..., dir:PATH, a video)")
    return CameraURI("file", base, options)


def gstreamer_available() -> bool:
    info = cv2.getBuildInformation()
    return any("GStreamer" in line and "YES" in line for line in info.splitlines())


def csi_pipeline(sensor: str, width: int, height: int, fps: int) -> str:
    """nvarguscamerasrc into BGR frames for OpenCV; the appsink drops old buffers itself."""
    return (f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM), width={width}, "
            f"height={height}, framerate={fps}/1, format=NV12 ! nvvidconv ! "
            "video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
            "appsink drop=true max-buffers=1 sync=false")


# --- sources -----------------------------------------------------------------------------------


class CaptureSource:
    """Anything cv2.VideoCapture opens: V4L2 devices, GStreamer pipelines, streams, files."""

    def __init__(self, cap: cv2.VideoCapture, name: str, loop: bool = False,
                 fps: float | None = None) -> None:
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"{name}: cannot open it")
        self.cap, self.name, self.loop = cap, name, loop
        self.fps = fps if fps is not None else (cap.get(cv2.CAP_PROP_FPS) or 30.0)

    def read(self) -> np.ndarray | None:
        ok, frame = self.cap.read()
        if not ok and self.loop:  # end of the file: play it again
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.cap.read()
        if not ok or frame is None:
            return None
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.cap.release()


class FolderSource:
    """Images of a folder in name order, looping: a camera for the demo and the tests."""

    def __init__(self, folder: Path, fps: float) -> None:
        self.folder, self.fps = folder, fps
        self.files = sorted(f for f in folder.glob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise CameraError(f"dir:{folder}: no images there")
        self.next = 0

    def read(self) -> np.ndarray | None:
        path = self.files[self.next % len(self.files)]
        self.next += 1
        try:
            return load_image(path)
        except (ImageError, FileNotFoundError):
            return None  # gone or broken: the grabber reopens the folder

    def close(self) -> None:
        pass


def open_source(uri: str | CameraURI) -> Source:
    """Open a camera URI now; raises CameraError with one line when it cannot be opened."""
    u = parse_uri(uri) if isinstance(uri, str) else uri
    if u.kind == "dir":
        if not Path(u.target).is_dir():
            raise CameraError(f"dir:{u.target}: no such folder")
        return FolderSource(Path(u.target), u.option("fps", 10))
    if u.kind == "file":
        if not Path(u.target).is_file():
            raise CameraError(f"{u.target}: no such video file")
        fps = u.options.get("fps")
        return CaptureSource(cv2.VideoCapture(u.target), u.target, loop=True,
                             fps=float(fps) if fps is not None else None)
    if u.kind == "stream":
        return CaptureSource(cv2.VideoCapture(u.target, cv2.CAP_FFMPEG), u.target)
    width, height = int(u.option("width", 1280)), int(u.option("height", 720))
    fps = int(u.option("fps", 30))
    if u.kind == "csi":
        if not gstreamer_available():
            raise CameraError(f"csi:{u.target}: this OpenCV has no GStreamer (use JetPack's "
                              "OpenCV on a Jetson)")
        return CaptureSource(cv2.VideoCapture(csi_pipeline(u.target, width, height, fps),
                                              cv2.CAP_GSTREAMER), f"csi:{u.target}", fps=fps)
    if not u.target.isdecimal():
        raise CameraError(f"v4l2:{u.target}: expected a device number such as v4l2:0")
    cap = cv2.VideoCapture(int(u.target), cv2.CAP_V4L2)
    fmt = u.options.get("format", "MJPG").upper()
    if fmt not in ("MJPG", "YUYV"):
        raise CameraError(f"v4l2:{u.target}: format {fmt} is not MJPG or YUYV")
    cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*fmt))
    cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    cap.set(cv2.CAP_PROP_FPS, fps)
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver's queue would hand out stale frames
    return CaptureSource(cap, f"/dev/video{u.target}", fps=fps)


# --- the grabber -------------------------------------------------------------------------------


class Camera:
    """Reads a source on its own thread; `latest()` is the newest frame, never a stale queue.

    File and folder sources are paced to their frame rate; with `?fps=0` they run in lockstep,
    each frame waiting until it has been taken.
    """

    def __init__(self, uri: str, opener: Callable[[CameraURI], Source] = open_source,
                 first_backoff: float = 0.5, max_backoff: float = 10.0,
                 fail_after: int = 5) -> None:
        self.uri = parse_uri(uri)
        self.name = uri
        self._opener = opener
        self.first_backoff, self.max_backoff, self.fail_after = (first_backoff, max_backoff,
                                                                 fail_after)
        self.state = "starting"
        self.problem = ""  # why the camera is not ok, one line
        self.reconnects = 0
        self._frame: Frame | None = None
        self._taken = True  # lockstep: the newest frame has been read
        self._seq = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        played = self.uri.kind in ("dir", "file")
        self.lockstep = played and self.uri.options.get("fps") in ("0", "0.0")

    def start(self) -> Camera:
        self._thread = threading.Thread(target=self._run, name="camera", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._set_state("stopped", "")

    def __enter__(self) -> Camera:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self) -> dict:
        """For the UI and telemetry."""
        return {"uri": self.name, "state": self.state, "problem": self.problem,
                "reconnects": self.reconnects, "frames": self._seq}

    def latest(self, after: int = 0, timeout: float = 1.0) -> Frame | None:
        """The newest frame newer than seq `after`, waiting up to `timeout` s for one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._frame is None or self._frame.seq <= after:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(left)
            self._taken = True
            self._cond.notify_all()
            return self._frame

    def _set_state(self, state: str, problem: str) -> None:
        if state != self.state:
            log.log(logging.INFO if state == "ok" else logging.WARNING, "camera %s: %s%s",
                    self.name, state, f" ({problem})" if problem else "")
        self.state, self.problem = state, problem

    def _open(self) -> Source | None:
        """Open the source, retrying with backoff until it opens or the camera is stopped."""
        failures, backoff = 0, self.first_backoff
        while not self._stop.is_set():
            try:
                return self._opener(self.uri)
            except CameraError as e:
                failures += 1
                self._set_state("failed" if failures >= self.fail_after else "reconnecting",
                                str(e))
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            source = self._open()
            if source is None:
                return
            self._set_state("ok", "")
            interval = 1 / source.fps if source.fps > 0 and not self.lockstep else 0.0
            paced = self.uri.kind in ("dir", "file")
            next_due = time.monotonic()
            try:
                while not self._stop.is_set():
                    image = source.read()
                    if image is None:
                        self.reconnects += 1
                        self._set_state("reconnecting", "the camera stopped sending frames")
                        break
                    self._publish(image)
                    if paced and interval:
                        next_due += interval
                        self._stop.wait(max(0.0, next_due - time.monotonic()))
            finally:
                source.close()
            self._stop.wait(self.first_backoff)

    def _publish(self, image: np.ndarray) -> None:
        with self._cond:
            if self.lockstep:  # wait until the reader took the previous frame
                while not self._taken and not self._stop.is_set():
                    self._cond.wait(0.1)
            self._seq += 1
            self._frame = Frame(image, self._seq, time.monotonic())
            self._taken = False
            self._cond.notify_all()
