"""Cameras by URI and the grabber thread, with folders and video files as the camera."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.camera import Camera, CameraError, gstreamer_available, open_source, parse_uri


def write_frames(folder: Path, count: int, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    """PNG frames whose top-left pixel encodes their number (RGB as returned)."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = []
    for i in range(count):
        rgb = np.full((size[1], size[0], 3), 20 * i, np.uint8)
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        frames.append(rgb)
    return frames


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("uri, kind, target", [
    ("v4l2:0", "v4l2", "0"), ("/dev/video2", "v4l2", "2"), ("csi:1", "csi", "1"),
    ("rtsp://cam.local:554/stream?user=a", "stream", "rtsp://cam.local:554/stream?user=a"),
    ("dir:/data/frames?fps=0", "dir", "/data/frames"), ("demo/scan.avi", "file", "demo/scan.avi"),
])
def test_camera_uris(uri: str, kind: str, target: str) -> None:
    u = parse_uri(uri)
    assert (u.kind, u.target) == (kind, target)


def test_v4l2_options_are_read_from_the_uri() -> None:
    u = parse_uri("v4l2:0?format=YUYV&width=640&height=480&fps=15")
    assert u.options == {"format": "YUYV", "width": "640", "height": "480", "fps": "15"}


def test_unusable_cameras_say_why_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="no such folder"):
        open_source(f"dir:{tmp_path / 'missing'}")
    with pytest.raises(CameraError, match="no such video file"):
        open_source(str(tmp_path / "missing.avi"))
    with pytest.raises(CameraError, match="MJPG or YUYV"):
        open_source("v4l2:0?format=H264")
    if not gstreamer_available():
        with pytest.raises(CameraError, match="GStreamer"):
            open_source("csi:0")


def test_lockstep_folder_hands_over_every_frame_once_and_loops(tmp_path: Path) -> None:
    frames = write_frames(tmp_path / "cam", 4)
    with Camera(f"dir:{tmp_path / 'cam'}?fps=0") as camera:
        seen, last = [], 0
        for _ in range(10):
            f = camera.latest(after=last, timeout=5)
            assert f is not None
            seen.append((f.seq, int(f.image[0, 0, 0])))
            last = f.seq
    assert [s for s, _ in seen] == list(range(1, 11))
    assert [v for _, v in seen] == [int(frames[i % 4][0, 0, 0]) for i in range(10)]
    assert camera.state == "stopped"


def test_a_video_file_loops(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(5):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    with Camera(f"{path}?fps=0") as camera:
        last = 0
        for _ in range(12):
            f = camera.latest(after=last, timeout=5)
            assert f is not None and f.image.shape == (48, 64, 3)
            last = f.seq
    assert last == 12


def test_a_slow_reader_gets_the_newest_frame_not_a_queue(tmp_path: Path) -> None:
    write_frames(tmp_path / "cam", 3)
    with Camera(f"dir:{tmp_path / 'cam'}?fps=100") as camera:
        first = camera.latest(timeout=5)
        time.sleep(0.3)  # ~30 frames arrive meanwhile
        second = camera.latest(after=first.seq, timeout=5)
    assert second.seq - first.seq > 5
    assert time.monotonic() - second.time < 1.0


def test_a_camera_that_disappears_is_reported_and_retried(tmp_path: Path) -> None:
    write_frames(tmp_path / "cam", 3)
    camera = Camera(f"dir:{tmp_path / 'cam'}?fps=50", first_backoff=0.05, max_backoff=0.1,
                    fail_after=3).start()
    try:
        assert wait_for(lambda: camera.state == "ok")
        shutil.rmtree(tmp_path / "cam")  # unplugged
        assert wait_for(lambda: camera.state == "failed")
        assert "no such folder" in camera.status()["problem"]
        write_frames(tmp_path / "cam", 3)  # plugged back in
        assert wait_for(lambda: camera.state == "ok")
        before = camera.status()["frames"]
        assert wait_for(lambda: camera.status()["frames"] > before)
        assert camera.status()["reconnects"] >= 1
    finally:
        camera.stop()
