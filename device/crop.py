"""Cut the product out of a camera frame: its foreground box plus a margin, made square.

The network sees a square picture with the product filling most of it, as in training; a wide
720p frame would otherwise be centre-cropped by preprocessing and could cut the product off.
When there is no clear foreground (a handheld photo upload, or presence found nothing) the crop
falls back to the frame's central square.

    >>> box = square_box((500, 200, 700, 520), (720, 1280), margin=0.15)
    >>> crop(frame, box).shape[:2]
    (368, 368)
"""

from __future__ import annotations

import numpy as np

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive

MARGIN = 0.15  # share of the box's longer side added on each side: context, and a loose box


def center_box(shape: tuple[int, ...]) -> Box:
    """The largest square in the middle of a frame of this shape (H, W, ...)."""
    h, w = shape[:2]
    side = min(h, w)
    x0, y0 = (w - side) // 2, (h - side) // 2
    return (x0, y0, x0 + side, y0 + side)


def square_box(box: Box, shape: tuple[int, ...], margin: float = MARGIN) -> Box:
    """`box` grown by `margin` of its longer side on each side, made square around its centre
    and moved (not shrunk) to lie inside the frame; never larger than the frame's shorter side."""
    h, w = shape[:2]
    x0, y0, x1, y1 = box
    side = round(max(x1 - x0, y1 - y0) * (1 + 2 * margin))
    side = max(1, min(side, h, w))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = round(min(max(cx - side / 2, 0), w - side))
    top = round(min(max(cy - side / 2, 0), h - side))
    return (left, top, left + side, top + side)


def crop(frame: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return frame[y0:y1, x0:x1]


def product_crop(frame: np.ndarray, foreground: Box | None, margin: float = MARGIN,
                 min_side: float = 0.1) -> tuple[np.ndarray, Box, bool]:
    """(crop, its box, whether it fell back to the centre): the square around the foreground,
    or the central square when there is none or it is too small to be a product (a box under
    `min_side` of the frame's shorter side is a speck, not a product)."""
    shape = frame.shape
    if foreground is not None:
        x0, y0, x1, y1 = foreground
        if max(x1 - x0, y1 - y0) >= min_side * min(shape[:2]):
            box = square_box(foreground, shape, margin)
            return crop(frame, box), box, False
    box = center_box(shape)
    return crop(frame, box), box, True
