"""Training-time augmentation in numpy/OpenCV, ending in the shared `normalize`.

Only the geometry and colour are random; the last step is the same `normalize` the kiosk runs,
so training inputs differ from kiosk inputs only by the augmentation itself.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from models.preprocess import InputSpec, normalize
from models.studio import random_shop_view
from trainer.config import TrainConfig


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """A random patch covering `scale` of the photo's area, resized to size x size."""
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:  # fall back to the central square
        cw = ch = min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    patch = img[top : top + ch, left : left + cw]
    interp = cv2.INTER_AREA if cw > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.3,
                 contrast: float = 0.3, saturation: float = 0.3) -> np.ndarray:
    """Random brightness, contrast and saturation, as shop lighting and cameras vary."""
    x = img.astype(np.float32)
    x *= rng.uniform(1 - brightness, 1 + brightness)
    grey = x.mean(axis=2, keepdims=True)
    x = grey.mean() + (x - grey.mean()) * rng.uniform(1 - contrast, 1 + contrast)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - saturation, 1 + saturation)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def camera_shift(img: np.ndarray, rng: np.random.Generator, gain: float = 0.15,
                 max_sigma: float = 1.5) -> np.ndarray:
    """The photo as another camera in another light takes it: red and blue scaled against
    green by up to `gain` (white balance), then blurred by a Gaussian of sigma up to
    `max_sigma` pixels (focus). Val photos come from other sessions than train photos."""
    x = img.astype(np.float32) * np.array([rng.uniform(1 - gain, 1 + gain), 1.0,
                                           rng.uniform(1 - gain, 1 + gain)], np.float32)
    sigma = rng.uniform(0, max_sigma)
    if sigma > 0.3:  # below that a 3-tap kernel is all but the identity
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def random_erasing(img: np.ndarray, rng: np.random.Generator,
                   scale: tuple[float, float] = (0.02, 0.25),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> np.ndarray:
    """Cover a random box (`scale` of the area) with noise, as a hand, a price sticker or a
    shelf edge hides part of a product: the model must not lean on one patch of the label."""
    h, w = img.shape[:2]
    for _ in range(10):
        target = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        bw, bh = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < bw < w and 0 < bh < h:
            top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            img = img.copy()
            img[top : top + bh, left : left + bw] = rng.integers(0, 256, (bh, bw, img.shape[2]),
                                                                  dtype=np.uint8)
            return img
    return img


def augment(img: np.ndarray, spec: InputSpec, rng: np.random.Generator,
            erasing: float = 0.0, shop: float = 0.0, camera: float = 0.0,
            crop_scale: float = TrainConfig.crop_scale) -> np.ndarray:
    """One random training view of an RGB photo, as the network's float input; `erasing` is
    the chance of a random-erasing box, `shop` the chance that a studio photo is first made a
    shop view (models/studio.py), `camera` the chance of another white balance and focus,
    `crop_scale` the least share of the photo's area a view keeps."""
    if shop and rng.random() < shop:
        view = random_shop_view(img, rng)
        img = img if view is None else view
    x = random_resized_crop(img, spec.size, rng, (crop_scale, 1.0))
    if rng.random() < 0.5:
        x = x[:, ::-1]
    if camera and rng.random() < camera:
        x = camera_shift(x, rng)
    x = color_jitter(x, rng)
    if erasing and rng.random() < erasing:
        x = random_erasing(x, rng)
    return normalize(x, spec)
