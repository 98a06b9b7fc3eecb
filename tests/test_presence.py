"""Presence and crop on synthetic frame sequences: a placement is one scan, nothing else is."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from device.crop import center_box, product_crop, square_box
from device.presence import EMPTY, HELD, Presence, PresenceConfig

H, W = 180, 320


def counter(seed: int = 0) -> np.ndarray:
    """A textured, static counter top (RGB float)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(60, 200, (12, 20, 3)).astype(np.float32)
    return cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC)


def frame(background: np.ndarray, rng: np.random.Generator, product: tuple | None = None,
          gain: float = 1.0) -> np.ndarray:
    """background with an optional product (x, y, radius, colour) and sensor noise."""
    img = background.copy()
    if product is not None:
        x, y, r, colour = product
        cv2.circle(img, (int(x), int(y)), int(r), colour, -1, cv2.LINE_AA)
        cv2.circle(img, (int(x), int(y)), int(r * 0.5), (250, 250, 250), 3, cv2.LINE_AA)
    img = img * gain + rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def placement(background, rng, colour, at=(160, 90), steps=6, hold=15, empty=10):
    """Empty, slide the product in from the bottom, hold it, slide it out, empty."""
    frames = [frame(background, rng) for _ in range(empty)]
    x, y = at
    for i in range(steps):
        frames.append(frame(background, rng, (x, H + 40 - (H + 40 - y) * (i + 1) / steps, 40,
                                              colour)))
    frames += [frame(background, rng, (x, y, 40, colour)) for _ in range(hold)]
    for i in range(steps):
        frames.append(frame(background, rng, (x + (i + 1) * 60, y, 40, colour)))
    return frames + [frame(background, rng) for _ in range(empty)]


def run(frames: list[np.ndarray], config: PresenceConfig | None = None) -> list:
    presence = Presence(config)
    return [e for e in map(presence.update, frames) if e.trigger]


def test_place_hold_remove_is_exactly_one_scan() -> None:
    rng = np.random.default_rng(0)
    triggers = run(placement(counter(), rng, (200, 40, 40)))
    assert len(triggers) == 1
    x0, y0, x1, y1 = triggers[0].box
    assert x0 < 160 < x1 and y0 < 90 < y1  # the box holds the product
    assert (x1 - x0) < 0.5 * W  # and not the whole frame


def test_two_products_in_turn_are_two_scans() -> None:
    rng = np.random.default_rng(1)
    bg = counter()
    frames = placement(bg, rng, (200, 40, 40)) + placement(bg, rng, (30, 60, 220), at=(100, 80))
    assert len(run(frames)) == 2


def test_a_product_left_in_place_is_scanned_once_only() -> None:
    rng = np.random.default_rng(2)
    bg = counter()
    frames = placement(bg, rng, (200, 40, 40), hold=200)
    assert len(run(frames)) == 1


def test_a_product_left_for_long_becomes_background_and_the_kiosk_re_arms() -> None:
    rng = np.random.default_rng(6)
    bg = counter()
    left_behind = bg.copy()
    cv2.circle(left_behind, (160, 90), 40, (200, 40, 40), -1, cv2.LINE_AA)
    presence = Presence(PresenceConfig(absorb_frames=40))
    events = [presence.update(frame(bg, rng)) for _ in range(12)]
    events += [presence.update(frame(left_behind, rng)) for _ in range(60)]
    assert sum(e.trigger for e in events) == 1 and events[-1].state == EMPTY
    # the next product, placed beside the one left there, is scanned once
    events = [presence.update(f) for f in placement(left_behind, rng, (30, 60, 220),
                                                     at=(260, 60))]
    assert sum(e.trigger for e in events) == 1
    assert events[-1].state == EMPTY


def test_lighting_drift_and_a_lamp_switching_on_are_no_scan() -> None:
    rng = np.random.default_rng(3)
    bg = counter()
    drift = [frame(bg, rng, gain=1 + 0.25 * i / 150) for i in range(150)]  # slow daylight
    lamp = [frame(bg, rng, gain=1.25 * 1.15) for _ in range(30)]  # a sudden 15% step
    assert run(drift + lamp) == []


def test_a_hand_waving_through_is_no_scan() -> None:
    rng = np.random.default_rng(4)
    bg = counter()
    frames = [frame(bg, rng) for _ in range(12)]
    for i in range(10):  # sweeps across without stopping
        frames.append(frame(bg, rng, (-40 + i * 45, 100, 35, (205, 150, 120))))
    frames += [frame(bg, rng) for _ in range(12)]
    assert run(frames) == []


def test_the_kiosk_re_arms_only_after_the_area_is_empty() -> None:
    rng = np.random.default_rng(5)
    bg = counter()
    presence = Presence(PresenceConfig())
    states = [presence.update(f).state for f in placement(bg, rng, (200, 40, 40))]
    assert HELD in states and states[-1] == EMPTY


def test_square_box_adds_the_margin_and_stays_inside_the_frame() -> None:
    assert square_box((100, 100, 200, 150), (720, 1280), margin=0.1) == (90, 65, 210, 185)
    x0, y0, x1, y1 = square_box((1200, 600, 1280, 720), (720, 1280), margin=0.5)
    assert x1 <= 1280 and y1 <= 720 and x1 - x0 == y1 - y0 == 240
    assert square_box((0, 0, 1280, 720), (720, 1280)) == (280, 0, 1000, 720)


@pytest.mark.parametrize("foreground", [None, (10, 10, 14, 14)])
def test_no_clear_foreground_falls_back_to_the_centre(foreground) -> None:
    img = np.zeros((720, 1280, 3), np.uint8)
    cropped, box, fallback = product_crop(img, foreground)
    assert fallback and box == center_box(img.shape) == (280, 0, 1000, 720)
    assert cropped.shape == (720, 720, 3)


def test_the_crop_is_the_square_around_the_product() -> None:
    img = np.zeros((720, 1280, 3), np.uint8)
    cropped, _, fallback = product_crop(img, (600, 300, 800, 500))
    assert not fallback and cropped.shape[0] == cropped.shape[1] == 260
