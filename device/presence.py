"""Is a product standing in the scan area? One recognition per placement.

A model of the empty scan area is learned from the first frames and kept up to date while the
area is empty. Each frame is compared with it on a small blurred grey copy, after dividing out
the overall brightness change (the median ratio of frame to background), so daylight drifting
or a lamp switching on does not look like a product. A product placed and then held still for
`still_frames` frames triggers exactly one recognition; the kiosk re-arms once the area has been
empty for `empty_frames` frames. A hand waving through never holds still, so it triggers nothing.
Something left standing for `absorb_frames` frames becomes part of the empty area.

    >>> presence = Presence()
    >>> for frame in frames:
    ...     event = presence.update(frame)
    ...     if event.trigger:
    ...         recognise(crop(frame, event.box))
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LEARNING, EMPTY, ARRIVING, HELD = "learning", "empty", "arriving", "held"


@dataclass(frozen=True)
class PresenceConfig:
    width: int = 160  # frames are compared at this width: noise averages out, and it is fast
    learn_frames: int = 10  # frames of the empty area learned at start
    learn_rate: float = 0.05  # how fast the background follows the empty area
    threshold: float = 22.0  # grey-level difference that makes a pixel foreground
    min_area: float = 0.015  # share of the area that must be foreground: something is there
    motion: float = 0.004  # share of pixels changing between frames that counts as moving
    still_frames: int = 6  # frames held still before the one recognition
    empty_frames: int = 4  # frames of empty area that re-arm the kiosk
    # a product left standing this many frames becomes part of the empty area, so the kiosk
    # re-arms (and a "ghost" of something removed while it started up fades the same way)
    absorb_frames: int = 900


@dataclass(frozen=True)
class PresenceEvent:
    state: str  # learning | empty | arriving | held
    trigger: bool  # recognise now: a product was placed and has been held still
    box: tuple[int, int, int, int] | None  # foreground box (x0, y0, x1, y1) in frame pixels
    area: float  # foreground share of the frame
    moving: float  # share of pixels that changed since the previous frame


class Presence:
    def __init__(self, config: PresenceConfig | None = None) -> None:
        self.config = config or PresenceConfig()
        self.reset()

    def reset(self) -> None:
        """Learn the empty area again (the camera moved, the counter was rearranged)."""
        self.state = LEARNING
        self.background: np.ndarray | None = None
        self._learned = 0
        self._previous: np.ndarray | None = None
        self._still = 0
        self._empty = 0
        self.mask: np.ndarray | None = None  # foreground of the last frame, analysis scale

    def _small(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        width = min(self.config.width, w)
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
        small = cv2.resize(grey, (width, max(1, round(h * width / w))),
                           interpolation=cv2.INTER_AREA)
        return cv2.GaussianBlur(small.astype(np.float32), (5, 5), 0)

    @staticmethod
    def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """|a - g*b| with g the median brightness ratio: global lighting changes cancel, and a
        product covering less than half the area does not move the median."""
        gain = float(np.median((a + 1) / (b + 1)))
        return np.abs(a - gain * b)

    def update(self, frame: np.ndarray) -> PresenceEvent:
        """Feed the next camera frame (HxWx3 RGB or HxW grey)."""
        c = self.config
        small = self._small(frame)
        if self.background is None or self.background.shape != small.shape:
            self.background, self._learned, self.state = small.copy(), 1, LEARNING
            self._previous = small
            return PresenceEvent(LEARNING, False, None, 0.0, 0.0)
        moving = float((self._difference(small, self._previous) > c.threshold).mean())
        self._previous = small
        if self.state == LEARNING:
            self._learned += 1
            self.background += (small - self.background) / self._learned
            if self._learned >= c.learn_frames:
                self.state = EMPTY
            return PresenceEvent(LEARNING, False, None, 0.0, moving)

        mask = (self._difference(small, self.background) > c.threshold).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        self.mask = mask
        area = float(mask.mean())
        present = area >= c.min_area
        trigger = False
        if self.state == EMPTY:
            if present:
                self.state, self._still, self._empty = ARRIVING, 0, 0
            else:  # follow slow changes of the empty area
                cv2.accumulateWeighted(small, self.background, c.learn_rate)
        elif self.state == ARRIVING:
            if not present:
                self._empty += 1
                if self._empty >= c.empty_frames:  # it left before holding still: a hand
                    self.state = EMPTY
            else:
                self._empty = 0
                self._still = self._still + 1 if moving < c.motion else 0
                if self._still >= c.still_frames:
                    self.state, trigger = HELD, True
        elif self.state == HELD:
            self._empty = self._empty + 1 if not present else 0
            self._still += 1
            if self._empty >= c.empty_frames:
                self.state = EMPTY
            elif self._still >= c.absorb_frames:
                self.background, self.state = small.copy(), EMPTY
        box = self._box(mask, frame.shape) if present else None
        return PresenceEvent(self.state, trigger, box, area, moving)

    @staticmethod
    def _box(mask: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
        """Bounding box, in frame pixels, of the foreground blobs at least a tenth the size of
        the largest (specks of noise and far-off shadows are left out)."""
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if count <= 1:
            return None
        blobs = stats[1:]
        keep = blobs[blobs[:, cv2.CC_STAT_AREA] >= 0.1 * blobs[:, cv2.CC_STAT_AREA].max()]
        x0 = keep[:, cv2.CC_STAT_LEFT].min()
        y0 = keep[:, cv2.CC_STAT_TOP].min()
        x1 = (keep[:, cv2.CC_STAT_LEFT] + keep[:, cv2.CC_STAT_WIDTH]).max()
        y1 = (keep[:, cv2.CC_STAT_TOP] + keep[:, cv2.CC_STAT_HEIGHT]).max()
        sy, sx = shape[0] / mask.shape[0], shape[1] / mask.shape[1]
        return (int(x0 * sx), int(y0 * sy), int(np.ceil(x1 * sx)), int(np.ceil(y1 * sy)))
