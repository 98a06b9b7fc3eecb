"""Shop views of studio catalog photos (models/studio.py): the product found on its white
background, and views that show it, not the white, reproducibly."""

from __future__ import annotations

import cv2
import numpy as np

from models.preprocess import InputSpec
from models.studio import SIDE, random_shop_view, shop_views, studio_mask
from trainer.augment import augment

GREEN = (40, 160, 60)


def studio_photo(side: int = 200) -> np.ndarray:
    """A green carton with a white label, on white: the label is product, not background."""
    img = np.full((side, side, 3), 255, np.uint8)
    cv2.rectangle(img, (60, 30), (140, 170), GREEN, cv2.FILLED)
    cv2.rectangle(img, (70, 80), (130, 120), (255, 255, 255), cv2.FILLED)  # label, inside
    return img


def test_the_product_and_its_white_label_are_found_the_background_is_not() -> None:
    mask = studio_mask(studio_photo())
    assert mask is not None
    assert mask[100, 100] == 1  # the white label inside the carton
    assert mask[50, 100] == 1 and mask[10, 10] == 0 and mask[100, 20] == 0
    carton = np.zeros((200, 200), np.uint8)
    carton[30:171, 60:141] = 1
    assert (mask != carton).mean() < 0.01


def test_a_light_grey_sweep_is_a_studio_backdrop_a_coloured_or_dark_one_is_not() -> None:
    """Catalog photos are often shot on a grey paper sweep that shades from top to bottom."""
    white = studio_photo() > 250  # the backdrop, and the label it encloses
    sweep = np.linspace(246, 229, 200)[:, None, None] * np.ones((200, 200, 3))
    photo = np.where(white, sweep, studio_photo()).astype(np.uint8)
    mask = studio_mask(photo)
    assert mask is not None and (mask != (studio_mask(studio_photo()))).mean() < 0.01
    assert len(shop_views(photo, 2)) == 2
    for wall in ((250, 220, 180), (120, 120, 120)):  # a peach or a mid-grey wall: no studio
        assert studio_mask(np.where(white, np.array(wall), photo).astype(np.uint8)) is None


def test_a_shop_photo_has_no_shop_views() -> None:
    rng = np.random.default_rng(0)
    shelf = rng.integers(0, 200, (200, 200, 3), dtype=np.uint8)  # no white border
    assert studio_mask(shelf) is None
    assert shop_views(shelf, 4) == []
    assert random_shop_view(shelf, rng) is None
    assert shop_views(np.full((50, 50, 3), 255, np.uint8), 4) == []  # white, no product


def green_share(view: np.ndarray) -> float:
    return float((np.abs(view.astype(int) - GREEN).max(axis=2) < 40).mean())


def test_views_show_the_product_held_alone_on_a_dark_backdrop_and_are_reproducible() -> None:
    views = shop_views(studio_photo(), 8)
    assert [v.shape for v in views] == [(SIDE, SIDE, 3)] * 8
    assert all((a == b).all() for a, b in zip(views, shop_views(studio_photo(), 8), strict=True))
    for i, view in enumerate(views):
        # one carton, close up: a good part of the view, never a crate's worth of them
        assert 0.1 < green_share(view) < 0.6, (i, green_share(view))
        # the label only (close up, up to 15% of the view): no studio white left around it
        white = (view.min(axis=2) >= 248).mean()
        assert white < 0.2, (i, white)
    assert (views[1] != views[2]).any()


def test_piled_views_fill_the_view_with_copies() -> None:
    views = shop_views(studio_photo(), 8, piles=True)
    for i, view in enumerate(views):  # every 4th held alone, the others piles of 2-4 across
        assert green_share(view) > (0.1 if i % 4 == 0 else 0.6), (i, green_share(view))


def test_training_views_of_a_studio_photo_can_be_shop_views() -> None:
    spec = InputSpec(size=64, resize=64)
    studio = [augment(studio_photo(), spec, np.random.default_rng(s), shop=1.0)
              for s in range(8)]
    plain = [augment(studio_photo(), spec, np.random.default_rng(s)) for s in range(8)]
    # white (normalised near +1) is what the shop views take away
    assert np.mean([(x > 0.95).mean() for x in studio]) < 0.5 * np.mean(
        [(x > 0.95).mean() for x in plain])
