"""Shop-like views of a studio product photo: the product cut off its white or light grey
backdrop and placed, held alone or (for training) as a pile of copies, on a dark one.

A catalog photo is one product, centred, on plain white or a light grey sweep; the kiosk's
camera sees the product in a hand, or a crate of them, against whatever is behind. A product
enrolled from its catalog photo alone is matched against that one studio shot, and shop photos
of it often land nearer some trained product's prototype. Adding a few of these views as extra
references brings its references closer to what the camera sees (bench/enrolment_views.py
measures how much). The kiosk's views hold the product alone, close up and often cut off by the
edge: on two Lite2 held-out models they found new products' other training photos 1.6 and 2.0
pp more often than views that also pile copies as in a crate, and trained products lost nothing
(val top-1 +0.9 pp on both). Piles stay for training (`storyscan train --shop-views`), as
measured there.

Only numpy and OpenCV, and deterministic for a given photo and seed: every kiosk computes the
same references, and the trainer can draw random ones. A photo that is not a studio shot (no
light grey or white border around the product) has no shop views.

    >>> views = shop_views(load_image("Granny-Smith_Iconic.jpg"), 4)
    >>> [v.shape for v in views]
    [(384, 384, 3), (384, 384, 3), (384, 384, 3), (384, 384, 3)]
"""

from __future__ import annotations

import cv2
import numpy as np

LIGHT = 200  # a studio backdrop is light: every channel at least this on the border...
NEUTRAL = 24  # ...and grey, not coloured: channels at most this apart
BACKDROP_TOLERANCE = 8  # a backdrop pixel: every channel this near the fitted backdrop
MIN_BORDER = 0.7  # share of the photo's border that must be backdrop: the product is inside
MIN_BACKGROUND = 0.2  # share of the photo that must be backdrop around the product
SIDE = 384  # pixels of a view's side: more than any network input, less than a camera frame
PER_ROW = (1, 2, 3, 4)  # copies across a piled view, cycled: alone, then ever denser piles
# names the views shop_views draws: change it whenever they change (backdrop, placement, mask),
# so that kiosks embed their references again instead of keeping views of the old kind
KIOSK_VIEWS = "held-alone-1"


def _near_backdrop(img: np.ndarray) -> np.ndarray | None:
    """Pixels (uint8 0/1) of the backdrop's colour, or None when the photo's border is not a
    light grey backdrop. A studio sweep is white or light grey and often shades from top to
    bottom, so the backdrop is a plane per channel fitted to the border: pure white is the
    plane 255, and a 246 -> 229 sweep is found as well as it."""
    h, w = img.shape[:2]
    ys = np.concatenate([np.zeros(w, int), np.full(w, h - 1), np.arange(h), np.arange(h)])
    xs = np.concatenate([np.arange(w), np.arange(w), np.zeros(h, int), np.full(h, w - 1)])
    border = img[ys, xs].astype(np.float32)
    light = (border.min(axis=1) >= LIGHT) & (np.ptp(border, axis=1) <= NEUTRAL)
    if light.mean() < MIN_BORDER:
        return None
    at = np.stack([np.ones(light.sum()), xs[light] / w, ys[light] / h], axis=1)
    coefficients, *_ = np.linalg.lstsq(at, border[light], rcond=None)
    c0, cx, cy = coefficients.astype(np.float32)  # float32 throughout: big photos stay small
    gx = (np.arange(w, dtype=np.float32) / w)[None, :]
    gy = (np.arange(h, dtype=np.float32) / h)[:, None]
    off = np.zeros((h, w), np.float32)  # channel by channel
    for c in range(3):
        backdrop = np.minimum(c0[c] + gx * cx[c] + gy * cy[c], 255)
        np.maximum(off, np.abs(img[..., c] - backdrop), out=off)
    return (off <= BACKDROP_TOLERANCE).astype(np.uint8)


def studio_mask(img: np.ndarray) -> np.ndarray | None:
    """The product's pixels (uint8 0/1, holes filled) in an RGB photo of it on a white or
    light grey backdrop, or None when the photo is not such a shot: backdrop connected to the
    border is background; backdrop colour enclosed by the product (a milk carton's white
    label) stays product."""
    near = _near_backdrop(img)
    if near is None:
        return None
    _, label = cv2.connectedComponents(near, connectivity=4)
    edge = np.unique(np.concatenate([label[0], label[-1], label[:, 0], label[:, -1]]))
    background = np.isin(label, edge) & (near > 0)
    if background.mean() < MIN_BACKGROUND:
        return None
    product = cv2.morphologyEx((~background).astype(np.uint8), cv2.MORPH_OPEN,
                               np.ones((3, 3), np.uint8))
    outlines, _ = cv2.findContours(product, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not outlines:
        return None
    return cv2.drawContours(np.zeros_like(product), outlines, -1, 1, cv2.FILLED)


def _backdrop(rng: np.random.Generator) -> np.ndarray:
    """A dark, softly lit, slightly grainy surface of a random colour (float32 RGB)."""
    light = np.linspace(0.6, 1.4, SIDE, dtype=np.float32)[:, None, None]
    canvas = rng.uniform(15, 110, 3).astype(np.float32) * light
    canvas = canvas + rng.normal(0, 12, (SIDE, SIDE, 3)).astype(np.float32)
    return cv2.GaussianBlur(canvas, (0, 0), 3)


def _paste(canvas: np.ndarray, product: np.ndarray, alpha: np.ndarray, centre: tuple[float, float],
           scale: float, angle: float, gain: float) -> None:
    """Blend `product` (its `alpha`), scaled, turned and lit by `gain`, into `canvas` in place."""
    h, w = product.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (centre[0] - w / 2, centre[1] - h / 2)
    pixels = cv2.warpAffine(product * np.float32(gain), m, (SIDE, SIDE))
    a = cv2.warpAffine(alpha, m, (SIDE, SIDE))[..., None]
    canvas *= 1 - a
    canvas += pixels * a


def _cutout(img: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The product's box of a studio photo (float32 RGB) and its soft-edged alpha, or None."""
    mask = studio_mask(img)
    if mask is None:
        return None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (5, 5), 0)[y0:y1, x0:x1]
    return img[y0:y1, x0:x1].astype(np.float32), alpha


def _compose(product: np.ndarray, alpha: np.ndarray, per_row: int, rng: np.random.Generator
             ) -> np.ndarray:
    """One view with `per_row` copies across: one held product, or a pile whose copies overlap
    and run off the edges, each copy a little scaled, turned and dimmed."""
    canvas = _backdrop(rng)
    size = float(np.sqrt(alpha.shape[0] * alpha.shape[1]))  # long and round products alike
    step = SIDE / per_row
    if per_row == 1:  # one product, held up: most of the view, not all of it
        cells, scale = [(0, 0)], step / size * rng.uniform(0.6, 0.8)
    else:  # a pile: copies larger than their cell, drawn back (top) to front
        cells = [(r, c) for r in range(-1, per_row + 1) for c in range(-1, per_row + 1)]
        scale = step / size * rng.uniform(1.2, 1.5)
    for r, c in cells:
        centre = ((c + 0.5) * step + rng.normal(0, 0.15 * step),
                  (r + 0.5) * step + rng.normal(0, 0.15 * step))
        _paste(canvas, product, alpha, centre, scale * rng.uniform(0.85, 1.15),
               rng.uniform(-12, 12), rng.uniform(0.75, 1.05))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def shop_views(img: np.ndarray, n: int, seed: int = 0, piles: bool = False
               ) -> list[np.ndarray]:
    """`n` SIDE x SIDE RGB views of the product in studio photo `img`, each held alone (the
    kiosk's), or with `piles` the i-th with PER_ROW[i % 4] copies across; [] when `img` is no
    studio shot."""
    cut = _cutout(img) if n > 0 else None
    if cut is None:
        return []
    rng = np.random.default_rng(seed)
    return [_compose(*cut, PER_ROW[i % len(PER_ROW)] if piles else 1, rng) for i in range(n)]


def random_shop_view(img: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One shop view of studio photo `img` with a random number of copies across (training),
    or None when `img` is no studio shot."""
    cut = _cutout(img)
    return None if cut is None else _compose(*cut, int(rng.choice(PER_ROW)), rng)
