"""The synthetic demo catalog must be reproducible, complete and learnable.

`make demo` and the end-to-end tests build on it, so a silent change in layout, a
non-deterministic byte, or products that cannot be told apart would break them downstream.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer.synthetic import (
    CATEGORIES,
    Cutout,
    DemoCatalog,
    catalog_photo,
    generate_demo,
    plan_products,
    render_product,
)

SMALL = {"products": 8, "train": 8, "val": 2, "scans": 6, "size": 96}
SPLIT_COUNTS = {"train": 8, "val": 2, "scans": 6}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoCatalog:
    return generate_demo(tmp_path_factory.mktemp("demo") / "out", **SMALL, seed=3)


def _tree(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(demo: DemoCatalog, tmp_path: Path) -> None:
    again = generate_demo(tmp_path / "again", **SMALL, seed=3, workers=1)
    assert _tree(demo.out) == _tree(again.out)


def test_other_seed_gives_other_files(demo: DemoCatalog, tmp_path: Path) -> None:
    first, other = _tree(demo.out), _tree(generate_demo(tmp_path / "other", **SMALL, seed=4).out)
    assert first.keys() == other.keys()
    assert sum(first[k] != other[k] for k in first) > 0.9 * len(first)


def test_layout_and_counts(demo: DemoCatalog) -> None:
    assert sorted(p.name for p in demo.out.iterdir()) == ["catalog", "scans", "train", "val"]
    for product in demo.products:
        folder = demo.out / "catalog" / product.category / product.sku
        assert sorted(p.name for p in folder.iterdir()) == ["catalog.jpg", "product.json"]
        for split, count in SPLIT_COUNTS.items():
            names = sorted(p.name for p in (demo.out / split / product.category / product.sku)
                           .iterdir())
            assert names == [f"{product.sku}_{i:03d}.jpg" for i in range(count)]


def test_splits_are_different_photos(demo: DemoCatalog) -> None:
    photos = [p.read_bytes() for split in SPLIT_COUNTS for p in (demo.out / split).rglob("*.jpg")]
    assert len(set(photos)) == len(photos)


def test_product_json(demo: DemoCatalog) -> None:
    for product in demo.products:
        path = demo.out / "catalog" / product.category / product.sku / "product.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        assert set(data) == {"sku", "name", "category", "price", "currency", "story", "images",
                             "attributes"}
        assert data["attributes"] == [product.palette.en.lower(), product.motif]
        assert data["attributes"][0] in data["story"]["en"].lower()  # the colour it is drawn in
        assert data["sku"] == product.sku
        assert re.fullmatch(r"(PLT|VAS|RNG|SHT)-\d{3}", data["sku"])
        assert data["category"] in {c.folder for c in CATEGORIES}
        assert data["currency"] == "EUR"
        assert data["price"] > 0 and round(data["price"], 2) == data["price"]
        assert data["images"] == ["catalog.jpg"]
        assert data["name"] in data["story"]["en"]
        assert len(data["story"]["en"].split(". ")) >= 3
        assert len(re.findall(r"[\u4e00-\u9fff]", data["story"]["zh"])) >= 30


def test_skus_and_names_are_distinct_and_all_categories_appear() -> None:
    small = plan_products(6)
    assert {p.category for p in small} == {c.folder for c in CATEGORIES}
    full = plan_products(30)
    assert [p.sku for p in full[:6]] == [p.sku for p in small]
    assert len({p.sku for p in full}) == len({p.name for p in full}) == 30
    assert len({(p.category, p.motif) for p in full}) == 30  # no pattern twice in a category
    assert len({(p.category, p.palette.en) for p in full}) == 30  # nor a colour scheme


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plan_products(0)
    with pytest.raises(ValueError):
        generate_demo(tmp_path, products=2, seed=-1)


def test_images_decode_to_requested_size(demo: DemoCatalog) -> None:
    photos = list(demo.out.rglob("*.jpg"))
    assert len(photos) == SMALL["products"] * (1 + sum(SPLIT_COUNTS.values()))
    for path in photos:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (96, 96, 3)


def test_catalog_photos_differ_between_products() -> None:
    thumbs = np.array([
        cv2.resize(catalog_photo(Cutout.from_sprite(render_product(p, 64)), 64), (16, 16),
                   interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        for p in plan_products(30)
    ])
    distance = np.abs(thumbs[:, None] - thumbs[None]).mean(axis=-1)
    np.fill_diagonal(distance, np.inf)
    assert distance.min() > 1.0  # about 2.5 today: the closest pair still differs visibly


def _colour_signature(path: Path) -> np.ndarray:
    """Hue/saturation histogram of the middle of the photo, where the product mostly is."""
    img = cv2.imread(str(path))
    q = img.shape[0] // 4
    hsv = cv2.cvtColor(img[q:-q, q:-q], cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [12, 4], [0, 180, 0, 256]).ravel()
    return np.sqrt(hist / hist.sum())


def test_scans_are_recognisable_from_training_photos(demo: DemoCatalog) -> None:
    """Even a colour-histogram nearest neighbour beats chance widely; a CNN will do better."""

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        paths = sorted((demo.out / split).rglob("*.jpg"))
        return np.array([_colour_signature(p) for p in paths]), np.array([p.parent.name
                                                                         for p in paths])

    scans, scan_labels = load("scans")
    train, train_labels = load("train")
    nearest = ((scans[:, None] - train[None]) ** 2).sum(axis=-1).argmin(axis=1)
    accuracy = (train_labels[nearest] == scan_labels).mean()
    chance = 1 / SMALL["products"]
    assert accuracy >= 3 * chance  # 0.6-0.8 across seeds today
